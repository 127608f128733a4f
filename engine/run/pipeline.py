"""The map phase of one shard: read -> canonical batches -> the fold of map stages -> parts on disk.

Three threads keep two cores busy: a reader thread (reading, canonicalising and the first map stage, a nogil
kernel), the calling thread (the other stages) and a write-behind thread (Parquet encoding + zstd, GIL released).
Published columns go to ``work/map/part-SSSSS-CCCC.arrow`` (Arrow IPC, lz4; finalize writes them as Parquet); the registry's *work columns* (for global stages only)
go, with ``row``, to ``work/map/work-SSSSS.arrow`` (Arrow IPC, uncompressed: MinHash values do not compress). The
columns the active global stages will add are written as nulls, so every part has every column of ``scores/``.

Worker processes build the map stages once (``init_worker``) and run many shards with them.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from engine import registry
from engine.errors import UserError
from engine.io.hashing import file_hash
from engine.io.readers import Shard, read_shard
from engine.io.schema import CANONICAL_TYPES, canonicalize, detect_format, required_columns
from engine.io.writers import (
    META_FORMAT,
    META_INPUT_COLUMNS,
    PartWriter,
    inject_disk_full,
    write_json_atomic,
    writing,
)
from engine.run.lock import die_with_parent, pause_point, watch_process
from engine.run.shards import shard_key
from engine.stage import Stage


def _prefetch(it: Iterator, depth: int = 2) -> Iterator:
    """Run ``it`` in a thread, ``depth`` items ahead; exceptions re-raised in the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def work():
        try:
            for x in it:
                if stop.is_set():
                    return
                q.put(x)
            q.put(done)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(e)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    try:
        while True:
            x = q.get()
            if x is done:
                return
            if isinstance(x, BaseException):
                raise x
            yield x
    finally:
        stop.set()
        while t.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                t.join(0.05)


def _timed(it: Iterator, acc: list[float]) -> Iterator:
    """Yield from ``it``, adding the seconds spent inside ``next(it)`` to a new slot of ``acc``."""
    slot = len(acc)
    acc.append(0.0)

    def gen():
        src = iter(it)
        while True:
            t0 = time.perf_counter()
            try:
                x = next(src)
            except StopIteration:
                acc[slot] += time.perf_counter() - t0
                return
            acc[slot] += time.perf_counter() - t0
            yield x

    return gen()


def count_verdicts(batch: pa.RecordBatch, acc: dict[str, int]) -> None:
    vc = pc.value_counts(batch.column("verdict"))
    for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        acc[v] = acc.get(v, 0) + c


class _WorkWriter:
    """``row`` + work columns of a shard, batch by batch, into one Arrow IPC file (temp name until closed)."""

    def __init__(self, path: Path, names: list[str]):
        self.path, self.names = path, names
        self.tmp = path.with_name(path.name + ".tmp")
        self._w = None
        self._f = None

    def split(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Write the batch's work columns; return the batch without them."""
        have = [c for c in self.names if c in batch.schema.names]
        if not have:
            return batch
        side = pa.RecordBatch.from_arrays([batch.column("row"), *[batch.column(c) for c in have]], ["row", *have])
        with writing(self.path):
            if self._w is None:
                self._f = pa.OSFile(str(self.tmp), "wb")
                self._w = pa.ipc.new_file(self._f, side.schema)
            self._w.write_batch(side)
            inject_disk_full(self.path)
        keep = [i for i, n in enumerate(batch.schema.names) if n not in have]
        return batch.select(keep)

    def close(self) -> str | None:
        if self._w is None:
            return None
        with writing(self.path):
            self._w.close()
            self._f.close()
            os.replace(self.tmp, self.path)
        self._w = None
        return self.path.name

    def abort(self) -> None:
        if self._w is not None:
            with contextlib.suppress(Exception):  # best effort on the way out
                self._w.close()
            with contextlib.suppress(Exception):
                self._f.close()
            self._w = None
        self.tmp.unlink(missing_ok=True)


def canonical_batches(
    shard: Shard, rc: Any, fmt_box: dict[str, Any], counts: dict[str, int]
) -> Iterator[pa.RecordBatch]:
    """The shard's rows as canonical batches (``engine.io.schema.canonicalize``): the format detected on the first
    readable batch (``fmt_box["fmt"]``, with the input columns in ``fmt_box["input_cols"]``), rows counted in
    ``counts["rows"]``, malformed rows kept. Both executors read shards through this."""
    for batch in read_shard(shard, rc.batch_rows, rc.jsonl_block_bytes):
        if not any(not c.startswith("__") for c in batch.schema.names):
            # Every row of this batch was unreadable: nothing to detect a format from yet.
            out = canonicalize(batch, "unknown", shard.path, None, shard.id_prefix)
            counts["rows"] += out.num_rows
            yield out
            continue
        if "fmt" not in fmt_box:
            have = [c for c in batch.schema.names if not c.startswith("__")]
            try:
                fmt_box["fmt"] = detect_format(have, rc.format, rc.map or None)
            except UserError as e:
                raise UserError(f"{shard.path}: {e}") from None
            need = required_columns(fmt_box["fmt"], rc.map)
            if have and need and not any(c in have for c in need):
                raise UserError(f"{shard.path}: format {fmt_box['fmt']} needs column(s) {need}, found {have}")
        out = canonicalize(batch, fmt_box["fmt"], shard.path, rc.map or None, shard.id_prefix)
        if "input_cols" not in fmt_box:
            fmt_box["input_cols"] = out.schema.names[len(CANONICAL_TYPES) :]
        counts["rows"] += out.num_rows
        yield out


def process_shard(
    index: int,
    shard: Shard,
    config: Any,
    map_dir: str | Path,
    stages: list[Stage],
    on_rows: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Map phase of one shard with already built ``stages``; returns its stats (also the completion marker)."""
    t0 = time.perf_counter()
    map_dir = Path(map_dir)
    for stale in (*map_dir.glob(f"part-{index:05d}-*"), *map_dir.glob(f"work-{index:05d}.*")):
        stale.unlink()
    for s in stages:
        s.stats = {}
    rc = config.read
    fmt_box: dict[str, Any] = {}
    counts = {"rows": 0}
    null_cols = registry.global_columns(config)

    canonical = partial(canonical_batches, shard, rc, fmt_box, counts)

    # Inclusive seconds spent pulling from each step of the fold; a stage's own time is its inclusive time minus
    # its upstream's (reported per stage in the manifest as ``seconds``).
    inclusive: list[float] = []
    # The reader thread also runs the first stage (normalisation, a nogil kernel): with the main thread on the
    # other stages and the writer thread on Parquet encoding, the three keep 2 cores busy (Parquet I/O bench:
    # 0.35 s -> 0.30 s per 52k-row Alpaca shard).
    head = stages[:1] if len(stages) > 1 else []
    in_thread: list[float] = []
    batches: Iterator[pa.RecordBatch] = _timed(canonical(), in_thread)
    for s in head:
        batches = _timed(s(batches), in_thread)
    batches = _timed(_prefetch(batches), inclusive)
    for s in stages[len(head) :]:
        batches = _timed(s(batches), inclusive)
    writer = None
    work = _WorkWriter(map_dir / f"work-{index:05d}.arrow", registry.work_columns(config))
    verdicts: dict[str, int] = {}

    def write(batch: pa.RecordBatch) -> None:
        batch = work.split(batch)
        n = batch.num_rows
        for name, typ in null_cols.items():
            if name not in batch.schema.names:
                batch = batch.append_column(pa.field(name, typ), pa.nulls(n, typ))
        writer.write(batch)
        count_verdicts(batch, verdicts)

    # Write-behind: Parquet encoding + zstd of batch k (GIL released) overlaps the stages on batch k+1; one writer
    # thread keeps the order.
    pending: list[cf.Future] = []
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-write") as wpool:
        try:
            for n_batch, batch in enumerate(batches):
                if writer is None:
                    writer = PartWriter(
                        map_dir,
                        index,
                        config.run.compression,
                        config.run.compression_level,
                        {
                            META_INPUT_COLUMNS: json.dumps(fmt_box.get("input_cols", [])).encode(),
                            META_FORMAT: fmt_box.get("fmt", "").encode(),
                        },
                        kind="arrow",
                    )
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(wpool.submit(write, batch))
                if on_rows:
                    on_rows(batch.num_rows)
                if n_batch == 0:
                    pause_point(f"shard:{index}")  # tests: a kill while this shard's temp files are open
            for f in pending:
                f.result()
            files = writer.close() if writer else []
            work_file = work.close()
        except BaseException:
            for f in pending:
                f.cancel()
            wpool.shutdown(wait=True)
            if writer:
                writer.abort()
            work.abort()
            raise
    for k, s in enumerate(head):
        s.stats["seconds"] = round(in_thread[k + 1] - in_thread[k], 3)
    for k, s in enumerate(stages[len(head) :]):
        s.stats["seconds"] = round(inclusive[k + 1] - inclusive[k], 3)
    stats = {
        "index": index,
        "path": shard.path,
        "kind": shard.kind,
        "size": shard.size,
        "hash": shard.content_hash or file_hash(shard.path),
        "format": fmt_box.get("fmt"),
        "rows": counts["rows"],
        "map_verdicts": verdicts,
        "parts": files,
        "work": work_file,
        "stages": {s.name: dict(s.stats) for s in stages},
        "seconds": round(time.perf_counter() - t0, 3),
        "key": shard_key(shard, config),
    }
    if shard.size and counts["rows"] == 0:
        stats["warning"] = "no rows"
    write_json_atomic(map_dir / f"done-{index:05d}.json", stats)
    return stats


# ---------------------------------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def limit_threads(threads: int) -> None:
    """Cap every thread pool of this process at ``threads`` (workers x threads <= cores)."""
    threads = max(1, threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(threads)
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    pa.set_cpu_count(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def init_worker(config_dict: dict, threads: int, owner: int | None = None) -> None:
    """Process-pool initializer: tie this worker to the run, limit threads, then build the map stages once for every
    shard of this worker.

    ``owner`` is the pid of the run's main process. The worker dies with its parent, the forkserver, which dies with
    the main process (``engine.run.lock``); where prctl is missing it polls ``owner`` instead. Ctrl-C reaches the
    whole process group: workers ignore SIGINT and the driver stops them (``stop_pool``), so an interrupted shard
    is not half-reported as failed while the others go on."""
    from engine.config import config_from_dict

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _stop_worker)
    if owner is not None:
        if not die_with_parent():
            watch_process(owner)
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(1)  # the run ended before this worker started
        except PermissionError:
            pass
    limit_threads(threads)
    config = config_from_dict(config_dict)
    _WORKER["config"] = config
    _WORKER["stages"] = registry.build(config, registry.MAP)
    if "torch" in sys.modules:  # a model stage imported it while being built
        sys.modules["torch"].set_num_threads(max(1, threads))


def _stop_worker(signum: int, _frame) -> None:
    """SIGTERM (``stop_pool``): exit now, mid-shard, after multiprocessing's exit finalizers. Without them the named
    semaphore numba creates in each worker stays registered, and the resource tracker warns about "leaked
    semaphore objects" on the user's terminal after a Ctrl-C."""
    from multiprocessing import util

    with contextlib.suppress(Exception):
        util._run_finalizers(0)  # what a worker's normal exit runs (multiprocessing.util._exit_function)
    os._exit(128 + signum)


def run_in_worker(index: int, shard: Shard, map_dir: str) -> dict[str, Any]:
    return process_shard(index, shard, _WORKER["config"], map_dir, _WORKER["stages"])


def completed(futures, poll: float = 0.5):
    """``cf.as_completed`` that wakes every ``poll`` s. Linux hands a Ctrl-C to any thread of the process; when the
    pool's manager thread catches it, Python raises KeyboardInterrupt only once the main thread runs Python code
    again, and a wait with no timeout may never return (the Ctrl-C fault test hung 1 run in 6-8 that way)."""
    pending = set(futures)
    while pending:
        done, pending = cf.wait(pending, timeout=poll, return_when=cf.FIRST_COMPLETED)
        yield from done


def stop_pool(ex: cf.ProcessPoolExecutor, futures, timeout: float = 5.0) -> None:
    """Stop a process pool now, not after its queue: cancel what has not started and kill the workers (SIGTERM,
    then SIGKILL after ``timeout`` s). A shard killed midway has no completion marker, so a rerun redoes it; its
    temp files are the caller's to remove once this returns (no worker is left to write them)."""
    for f in futures:
        f.cancel()
    procs = list((getattr(ex, "_processes", None) or {}).values())  # private (3.11); 3.14 has terminate_workers()
    manager = getattr(ex, "_executor_manager_thread", None)  # private too; shutdown() forgets it
    ex.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        with contextlib.suppress(Exception):
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)
    # Let the pool's manager thread finish closing its wake-up pipe now: left running, it races the interpreter's
    # exit hook, which writes to that pipe (CPython 3.11, no lock) and can print an "OSError: Bad file descriptor"
    # traceback after our one-line error (5 of 120 exits of a pool stopped this way, 0 of 200 with this join).
    if manager is not None:
        manager.join(timeout)
