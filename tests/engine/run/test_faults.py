"""Faults: a second run on a locked folder, kill -9 of the main process (at known moments), Ctrl-C, a full disk.

The killed runs are real ``cli.py score`` subprocesses stopped at a known moment by the ``WINNOW_PAUSE_AT`` hook
(engine/run/lock.py); every rerun must equal an uninterrupted run, column for column, every row once.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from engine.config import load_config
from engine.errors import UserError
from engine.run.local import score
from engine.run.lock import RunLock

ROOT = Path(__file__).resolve().parents[3]
# The cheapest run that still has a map phase over workers and a global phase that changes verdicts (exact and
# near duplicates): no embedder, no LM, no tokenizer.
CHEAP = ["--embedder", "none", "--no-loss", "--no-token-count", "-q"]
CHEAP_CONFIG = {
    "embed": {"embedder": "none"},
    "loss": {"enabled": "off"},
    "tokens": {"enabled": False},
    "run": {"workers": 1},
}
WORDS = [
    "alpha",
    "beta",
    "gamma",
    "delta",
    "epsilon",
    "zeta",
    "eta",
    "theta",
    "iota",
    "kappa",
    "lambda",
    "mu",
    "nu",
    "xi",
    "omicron",
    "pi",
    "rho",
    "sigma",
    "tau",
    "upsilon",
    "phi",
    "chi",
    "psi",
    "omega",
]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kill -9 / /proc tests need Linux")


def _write_corpus(d: Path, shards: int, rows: int) -> Path:
    """``shards`` JSONL files of ``rows`` rows; shard 0's every 10th row reappears in each later shard, once exactly
    and once with the last word of an 80-word answer changed (Jaccard 71/81 on word 5-grams: a near duplicate)."""
    rng = random.Random(0)
    d.mkdir(parents=True)
    planted = {}
    for s in range(shards):
        lines = []
        for i in range(rows):
            if s and i % 10 == 0:
                q, a = planted[i]
                if i % 20 == 10:
                    a = a.rsplit(" ", 1)[0] + f" changed{s}"
            else:
                q = f"question {s} {i} " + " ".join(rng.choice(WORDS) for _ in range(6))
                a = " ".join(rng.choice(WORDS) for _ in range(80))
                if s == 0:
                    planted[i] = (q, a)
            lines.append(json.dumps({"instruction": q, "input": "", "output": a}))
        (d / f"s{s}.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("faults") / "in", shards=6, rows=300)


@pytest.fixture(scope="module")
def baseline(corpus, tmp_path_factory):
    """An uninterrupted run (in this process: the same config as the CLI's CHEAP flags)."""
    out = tmp_path_factory.mktemp("faults") / "baseline"
    score([str(corpus)], out, load_config(None, CHEAP_CONFIG))
    df = _scores(out)
    verdicts = set(df["verdict"].unique())
    assert {"kept", "exact_duplicate", "near_duplicate"} <= verdicts, verdicts  # the planted truth is there
    return df


def _cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "cli.py", *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def _start(*args, env, log: Path) -> subprocess.Popen:
    """``cli.py`` in a session of its own (its process group is what a terminal's Ctrl-C reaches)."""
    with open(log, "w") as f:
        return subprocess.Popen(
            [sys.executable, "cli.py", *map(str, args)],
            cwd=ROOT,
            stdout=f,
            stderr=f,
            env={**os.environ, **{k: str(v) for k, v in env.items()}},
            start_new_session=True,
        )


def _scores(out: Path) -> pl.DataFrame:
    files = sorted((out / "scores").glob("part-*.parquet"))
    return pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed").sort(["source", "row"])


def _assert_same_as(out: Path, baseline: pl.DataFrame) -> None:
    got = _scores(out)
    assert got.height == baseline.height and got["id"].n_unique() == got.height  # every row once
    assert got.columns == baseline.columns
    for c in baseline.columns:  # ids, verdicts, duplicate_of, detail and every score column
        assert got[c].equals(baseline[c]), c
    assert not list(out.rglob("*.tmp"))


def _wait_for(path: Path, proc: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before pausing: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no pause within {timeout} s: {log.read_text()[-2000:]}"
        time.sleep(0.05)


def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of ``pid`` from /proc, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(pid: int) -> dict[int, int]:
    """{pid: start time} of every live descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (st := _proc_stat(int(entry.name))):
            children.setdefault(st[0], []).append(int(entry.name))
            starts[int(entry.name)] = st[2]
    out, todo = {}, [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out[c] = starts[c]
            todo.append(c)
    return out


def _alive(procs: dict[int, int]) -> list[int]:
    return [p for p, start in procs.items() if (st := _proc_stat(p)) and st[1] != "Z" and st[2] == start]


def _wait_gone(procs: dict[int, int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := _alive(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def _kill_left(procs: dict[int, int]) -> None:
    for p in _alive(procs):  # only what this test started, by pid: never let a failed test leave a worker behind
        os.kill(p, signal.SIGKILL)


def _snapshot(out: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(out)): (p.stat().st_size, p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}


def _said(stderr: str) -> list[str]:
    """What a run printed, less the stages' notes about their choices ("[embed] embedder = none: ...")."""
    return [line for line in stderr.strip().splitlines() if not re.match(r"\[\w+\] ", line)]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ------------------------------------------------------------------------------------------------------- lock
def test_a_second_run_on_a_locked_folder_is_refused_in_one_line(corpus, tmp_path):
    out = tmp_path / "out"
    with RunLock(out):
        r = _cli("score", corpus, "--out", out, *CHEAP)
        with pytest.raises(UserError, match=f"another winnow run \\(pid {os.getpid()}\\)"):
            score([str(corpus / "s0.jsonl")], out, load_config(None, CHEAP_CONFIG))
    assert r.returncode == 2, r.stderr
    lines = _said(r.stderr)
    assert len(lines) == 1 and str(out) in lines[0] and f"pid {os.getpid()}" in lines[0], r.stderr
    assert not (out / "scores").exists() and not (out / "manifest.json").exists()  # the refused run wrote nothing
    with RunLock(out):  # released with the `with`; a killed holder's lock goes with its process (tests below)
        pass


# ----------------------------------------------------------------------------------------------------- kill -9
def test_kill_9_mid_map_takes_every_worker_along_and_a_rerun_matches(corpus, baseline, tmp_path):
    out, marker, log = tmp_path / "out", tmp_path / "paused", tmp_path / "log"
    pause_s = 2  # the worker on shard 3 sleeps this long with its temp files open, then would go on writing
    p = _start(
        "score",
        corpus,
        "--out",
        out,
        "--workers",
        2,
        *CHEAP,
        log=log,
        env={"WINNOW_PAUSE_AT": "shard:3", "WINNOW_PAUSE_FILE": marker, "WINNOW_PAUSE_S": pause_s},
    )
    procs: dict[int, int] = {}
    try:
        _wait_for(marker, p, log)
        t_pause = time.monotonic()
        procs = _descendants(p.pid)
        assert int(marker.read_text()) in procs  # the paused worker is a process of this run
        assert len(procs) >= 3, procs  # forkserver, two workers (and the resource tracker)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        left = _wait_gone(procs)
        assert not left, f"processes of the killed run still alive: {left}"
        snap = _snapshot(out)
        time.sleep(max(0.0, t_pause + pause_s + 1.5 - time.monotonic()))  # past the paused worker's wake-up
        assert _snapshot(out) == snap, "the run folder changed after its run was killed"
    finally:
        _kill_left(procs)
        if p.poll() is None:
            p.kill()
    r = _cli("score", corpus, "--out", out, *CHEAP)  # no stale lock: the kernel dropped it with the process
    assert r.returncode == 0, r.stderr
    t = _manifest(out)["timings"]
    assert t["shards_reused"] >= 2 and t["shards_done"] >= 1, t  # shard 3 was paused, shards 0 and 1 finished
    _assert_same_as(out, baseline)


def _kill_9_at(moment: str, corpus: Path, out: Path, tmp: Path) -> None:
    """Start a run, wait until it pauses at ``moment`` (a WINNOW_PAUSE_AT point), kill -9 it."""
    marker, log = tmp / f"paused-{moment}", tmp / f"log-{moment}"
    p = _start(
        "score",
        corpus,
        "--out",
        out,
        *CHEAP,
        log=log,
        env={"WINNOW_PAUSE_AT": moment, "WINNOW_PAUSE_FILE": marker, "WINNOW_PAUSE_S": 60},
    )
    try:
        _wait_for(marker, p, log)
        if moment == "finalize":
            assert list((out / "scores").glob("*.tmp"))  # killed with parts of scores/ half written
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    assert not (out / "manifest.json").exists()


def test_kill_9_in_the_global_phase_then_in_finalize_then_a_rerun_matches(corpus, baseline, tmp_path):
    out = tmp_path / "out"
    _kill_9_at("global", corpus, out, tmp_path)  # every shard finished its map phase; nothing in scores/ yet
    _kill_9_at("finalize", corpus, out, tmp_path)  # the rerun of that, killed while writing scores/
    r = _cli("score", corpus, "--out", out, *CHEAP)
    assert r.returncode == 0, r.stderr
    assert _manifest(out)["timings"]["shards_reused"] == 6
    _assert_same_as(out, baseline)


# ------------------------------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_mid_map_stops_within_seconds_and_a_rerun_matches(corpus, baseline, tmp_path):
    out, marker, log = tmp_path / "out", tmp_path / "paused", tmp_path / "log"
    # shard 2 takes 60 s (the pause stands for a long shard: Ctrl-C does not cut it short, see pause_point)
    p = _start(
        "score",
        corpus,
        "--out",
        out,
        "--workers",
        2,
        *CHEAP,
        log=log,
        env={"WINNOW_PAUSE_AT": "shard:2", "WINNOW_PAUSE_FILE": marker, "WINNOW_PAUSE_S": 60},
    )
    procs: dict[int, int] = {}
    try:
        _wait_for(marker, p, log)
        procs = _descendants(p.pid)
        t0 = time.monotonic()
        os.killpg(p.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground process group
        try:
            rc = p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pytest.fail("Ctrl-C did not stop the run within 20 s")
        took = time.monotonic() - t0
        assert rc == 130, log.read_text()
        assert took < 8, f"Ctrl-C took {took:.1f} s"
        lines = _said(log.read_text())
        assert len(lines) == 1 and "interrupted" in lines[0], lines
        assert not list(out.rglob("*.tmp"))
        assert not _wait_gone(procs), "processes of the interrupted run still alive"
    finally:
        _kill_left(procs)
        if p.poll() is None:
            p.kill()
    assert not (out / "work" / "map" / "done-00002.json").exists()
    r = _cli("score", corpus, "--out", out, *CHEAP)
    assert r.returncode == 0, r.stderr
    _assert_same_as(out, baseline)


# -------------------------------------------------------------------------------------------------- full disk
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return _write_corpus(tmp_path_factory.mktemp("faults") / "small", shards=3, rows=40)


@pytest.mark.parametrize(
    "where", ["map/part-00001", "map/work-00001", "map/done-00001", "scores/part-00002", "manifest.json"]
)
def test_a_full_disk_is_one_user_error_naming_the_file_and_leaves_no_temp_file(small, tmp_path, monkeypatch, where):
    out = tmp_path / "out"
    monkeypatch.setenv("WINNOW_DISK_FULL_AT", where)
    with pytest.raises(UserError, match="no space left on device writing ") as e:
        score([str(small)], out, load_config(None, CHEAP_CONFIG))
    assert str(out) in str(e.value) and where in str(e.value) and ".tmp" not in str(e.value)
    assert not list(out.rglob("*.tmp"))
    monkeypatch.delenv("WINNOW_DISK_FULL_AT")
    m = score([str(small)], out, load_config(None, CHEAP_CONFIG))
    assert m["rows_in"] == 120 and _scores(out)["id"].n_unique() == 120


def test_a_full_disk_in_a_worker_is_one_line_and_exit_2(corpus, tmp_path):
    out = tmp_path / "out"
    r = _cli("score", corpus, "--out", out, "--workers", 2, *CHEAP, env={"WINNOW_DISK_FULL_AT": "map/part-00002"})
    assert r.returncode == 2, r.stderr
    lines = _said(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        f"winnow: error: no space left on device writing {out}/work/map/part-00002-0000.arrow"
    ), r.stderr
    assert not list(out.rglob("*.tmp"))


def _unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, check=False, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def test_a_real_full_tmpfs(small, tmp_path):
    """A 64 KiB tmpfs as the run folder, mounted in a user namespace (where the kernel allows it, else skipped)."""
    if not _unshare_works():
        pytest.skip("unprivileged user namespaces (unshare -rm) are not available here")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = (
        'mount -t tmpfs -o size=64k tmpfs "$1" || exit 99; cd "$2"; "$3" cli.py score "$4" --out "$1/out" '
        '--embedder none --no-loss --no-token-count -q; echo "rc=$?"; find "$1" -name "*.tmp"'
    )
    r = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script, "sh", mnt, ROOT, sys.executable, small],
        text=True,
        capture_output=True,
        check=False,
        timeout=120,
    )
    if r.returncode == 99:
        pytest.skip(f"tmpfs cannot be mounted here: {r.stderr.strip()}")
    assert r.stdout.strip() == "rc=2", (r.stdout, r.stderr)  # exit 2 and no temp file left (find printed nothing)
    lines = _said(r.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"winnow: error: no space left on device writing {mnt}/out"), lines


def _nap(i: int) -> int:
    time.sleep(0.2 * (i % 3))
    return i


def test_stop_pool_leaves_no_manager_thread_for_the_exit_hook():
    # A stopped pool's manager thread must be finished (and its wake-up pipe closed) when stop_pool returns:
    # otherwise CPython 3.11's exit hook can write to that pipe as it closes and print an OSError traceback after
    # the one-line error (seen in CI after "no space left on device" in a worker).
    import concurrent.futures as cf
    import multiprocessing as mp

    from engine.run.pipeline import stop_pool

    ex = cf.ProcessPoolExecutor(max_workers=2, mp_context=mp.get_context("fork"))
    futs = [ex.submit(_nap, i) for i in range(8)]
    next(cf.as_completed(futs)).result()
    manager, wakeup = ex._executor_manager_thread, ex._executor_manager_thread_wakeup
    stop_pool(ex, futs)
    assert not manager.is_alive() and wakeup._closed
