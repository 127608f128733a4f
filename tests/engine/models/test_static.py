"""engine/models/static.py: the static table is built once, under a lock, when several processes ask at once.

The real distillation (torch + transformers in each process, seconds per run) is replaced in the worker processes by
a fake that sleeps and appends one line per call to a marker file: the test is about who builds, not what.
"""

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np

from engine.models import static

WORKERS = 3
# Long enough that every worker reaches the lock while the first one is still building (workers start together,
# released by a barrier), short enough to keep the test around a second or two.
BUILD_S = 0.5


def _fake_distill(marker: Path):
    def distill(model_path, dim=256, sif=1e-4, device="auto", batch_rows=1024):
        with open(marker, "a") as f:  # O_APPEND: one whole line per call even from several processes
            f.write(f"{os.getpid()}\n")
        time.sleep(BUILD_S)
        rng = np.random.default_rng(dim)
        return rng.standard_normal((50, dim)).astype(np.float32), rng.random(50).astype(np.float32)

    return distill


def _load_worker(model_dir, cache_dir, marker, barrier, results):
    static.distill_static = _fake_distill(Path(marker))  # this process only (spawn: a fresh interpreter)
    barrier.wait()
    table, weights, folder = static.load_static_table(model_dir, dim=8, cache_dir=cache_dir, device="cpu")
    results.put((os.getpid(), table.tobytes(), weights.tobytes(), str(folder)))


def _build_worker(paths, marker, barrier, results):
    def build():
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(BUILD_S)
        return [np.full(4, i, np.int64) for i in range(len(paths))]

    barrier.wait()
    built = static.build_once([Path(p) for p in paths], build)
    results.put((built, [np.load(p).tolist() for p in paths]))


def _run(target, args):
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(WORKERS), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, results)) for _ in range(WORKERS)]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return out


def test_concurrent_loads_distil_once(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")  # all model_fingerprint needs
    marker = tmp_path / "builds.txt"
    out = _run(_load_worker, (str(model_dir), str(tmp_path / "cache"), str(marker)))
    assert len(marker.read_text().splitlines()) == 1  # one distillation for three processes
    assert len({o[0] for o in out}) == WORKERS  # three distinct processes asked
    assert len({o[1:] for o in out}) == 1  # and all read the same finished table
    folder = Path(out[0][3])
    assert (folder / "table.npy").exists() and (folder / "weights.npy").exists() and (folder / ".lock").exists()
    assert not [p for p in folder.iterdir() if p.name.startswith(".") and p.name != ".lock"]  # no tmp files left
    table = np.load(folder / "table.npy")
    assert table.dtype == np.float16 and table.shape == (50, 8)


def test_build_once_builds_once_and_not_again(tmp_path):
    paths = [str(tmp_path / "t" / "a.npy"), str(tmp_path / "t" / "b.npy")]
    marker = tmp_path / "builds.txt"
    out = _run(_build_worker, (paths, str(marker)))
    assert len(marker.read_text().splitlines()) == 1
    assert sorted(b for b, _ in out) == [False] * (WORKERS - 1) + [True]
    assert all(arrs == [[0] * 4, [1] * 4] for _, arrs in out)
    # Files present: no lock taken, no build.
    assert static.build_once([Path(p) for p in paths], lambda: 1 / 0) is False


def test_build_once_builds_after_a_partial_table(tmp_path):
    """A folder holding only some of the files (a build that died between its two renames) is built again."""
    a, b = tmp_path / "a.npy", tmp_path / "b.npy"
    np.save(a, np.zeros(2))
    assert static.build_once([a, b], lambda: [np.ones(2), np.full(2, 2.0)]) is True
    assert np.load(a).tolist() == [1.0, 1.0] and np.load(b).tolist() == [2.0, 2.0]
