"""The local executor: discover shards, resolve the config, run the map phase over processes, the global phase,
finalize, manifest. It names no stage: the stage registry (engine/registry.py) says which stages run, in which
order, which config sections make up the resume key and which columns go where.

1. **Map** (streaming, bounded memory, ``engine.run.pipeline``): each shard is read in batches, canonicalised,
   passed through the map stages and written to ``OUT/work/map/``. Shards run in worker processes (one per core),
   each building the map stages once. A completion marker per shard (written last) makes a rerun skip finished
   shards (``engine.run.shards``).
2. **Global** stages read what they need through the global context (``engine.run.context``) and return update
   tables keyed by (shard, row).
3. **Finalize** writes ``OUT/scores/`` (``engine.run.finalize``), counts the verdicts and checks
   ``sum(verdicts) == rows_in``.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

from engine import __version__, registry
from engine.config import Config, validate
from engine.errors import UserError
from engine.io.readers import check_out, discover, estimate_rows
from engine.io.writers import disk_full, write_json_atomic
from engine.run import manifest as mf
from engine.run.context import PartsContext
from engine.run.finalize import finalize, run_global
from engine.run.lock import RunLock, pause_point, start_forkserver
from engine.run.pipeline import completed, init_worker, limit_threads, process_shard, run_in_worker, stop_pool
from engine.run.shards import clean_map_dir, reusable, with_identity
from engine.run.warmup import warm
from engine.stage import GlobalStage, Stage


def build_map_stages(config: Config) -> list[Stage]:
    return registry.build(config, registry.MAP)


def build_global_stages(config: Config) -> list[GlobalStage]:
    return registry.build(config, registry.GLOBAL)


def _workers(config: Config, shards, pending: list[int]) -> int:
    if config.run.workers:
        workers = config.run.workers
    else:
        # One process per core, but only with enough input to pay for starting them (~2 s each, mostly loading
        # the compiled kernels): below ~64 MB per extra process one process with its read/write threads wins.
        pending_bytes = sum(shards[i].size for i in pending)
        workers = min(os.cpu_count() or 1, 1 + pending_bytes // (64 << 20))
    return max(1, min(workers, len(pending)))


def score(
    inputs: list[str],
    out: str | Path,
    config: Config,
    progress: Any = None,
    command: str = "score",
    map_stages: list[Stage] | None = None,
    global_stages: list[GlobalStage] | None = None,
) -> dict:
    """Score ``inputs`` into the run folder ``out``; returns the manifest (also written to OUT/manifest.json).

    ``map_stages`` / ``global_stages`` replace the registry's (tests); they run in this process.

    The folder is locked for the run (a second run on it is a UserError). Whatever stops the run (an error, Ctrl-C,
    a full disk) leaves no temp file in ``out`` and a folder a rerun resumes; a full disk is a one-line UserError
    naming the file."""
    t_start = time.perf_counter()
    validate(config)
    shards, warnings = discover(inputs, exclude=str(out))
    check_out(out, shards)  # --out must be a folder, and none of the inputs winnow's own output
    out = Path(out)
    with RunLock(out):
        _remove_temps(out)  # what a run killed with kill -9 was writing
        try:
            return _score(t_start, shards, warnings, out, config, progress, command, map_stages, global_stages)
        except BaseException as e:
            _remove_temps(out)  # every process that wrote them has stopped (stop_pool)
            if (full := disk_full(e, getattr(e, "filename", None) or out)) is None:
                raise
            raise full from None


def _remove_temps(out: Path) -> None:
    for pattern in ("*.tmp", "scores/*.tmp", "work/**/*.tmp"):
        for p in out.glob(pattern):
            if p.is_file():
                p.unlink(missing_ok=True)


def open_map(shards, out: Path, config: Config):
    """What every executor does before its map phase: ids per shard, ``work/map`` made and cleaned of stale files,
    every ``auto`` resolved once (before the resume key is computed and before any stage is built), and which shards a
    rerun can reuse. Returns (shards, map_dir, resolved, results of reused shards, pending shard indexes)."""
    shards = with_identity(shards)
    work = out / "work"
    map_dir = work / "map"
    map_dir.mkdir(parents=True, exist_ok=True)
    clean_map_dir(map_dir, len(shards))
    resolved = registry.resolve(config, {"n_rows": estimate_rows(shards), "work_dir": str(work)})
    results, pending = reusable(map_dir, shards, config)
    return shards, map_dir, resolved, results, pending


def _score(
    t_start: float,
    shards,
    warnings: list[str],
    out: Path,
    config: Config,
    progress: Any,
    command: str,
    map_stages: list[Stage] | None,
    global_stages: list[GlobalStage] | None,
) -> dict:
    shards, map_dir, resolved, results, pending = open_map(shards, out, config)

    t_map = time.perf_counter()
    crash_after = int(os.environ.get("WINNOW_CRASH_AFTER_SHARDS", "-1"))  # tests: simulate a kill mid-run
    workers = _workers(config, shards, pending)
    task = progress.add_task("map", total=sum(shards[i].size for i in pending) or 1) if progress else None
    cores = os.cpu_count() or 1
    timings_warm: dict[str, float] = {}
    if workers > 1 and map_stages is None:
        # forkserver: workers fork from a clean server process that has the stage modules imported once (spawn
        # would re-import pyarrow/polars/numba per worker, ~1.5 s each; plain fork would copy this process's
        # threads). Each worker builds its stages once and gets cores // workers threads. Started before the
        # warm-up (which forks from it too) so that its preload applies, and tied to this process: a kill -9 of
        # this process takes the forkserver and every worker with it (engine.run.lock).
        ctx = mp.get_context("forkserver")
        start_forkserver(["engine.run.pipeline", *sorted({s.module for s in registry.specs()})])
        timings_warm = warm(config, processes=workers)
        ex = cf.ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=init_worker,
            initargs=(config.to_dict(), max(1, cores // workers), os.getpid()),
        )
        futs: dict[cf.Future, int] = {}
        try:
            futs = {ex.submit(run_in_worker, i, shards[i], str(map_dir)): i for i in pending}
            for done_n, fut in enumerate(completed(futs), 1):
                i = futs[fut]
                results[i] = fut.result()
                if progress:
                    progress.advance(task, shards[i].size)
                if crash_after >= 0 and done_n >= crash_after:
                    raise RuntimeError("WINNOW_CRASH_AFTER_SHARDS: simulated crash")
                pause_point(f"map:{done_n}")
        except BaseException:
            # Ctrl-C or a failed shard: stop now (a pool's own shutdown would first run every queued shard)
            stop_pool(ex, futs)
            raise
        ex.shutdown(wait=True)
    elif pending:
        limit_threads(cores)
        stages = map_stages if map_stages is not None else build_map_stages(config)
        for done_n, i in enumerate(pending, 1):
            results[i] = process_shard(i, shards[i], config, str(map_dir), stages)
            if progress:
                progress.advance(task, shards[i].size)
            if crash_after >= 0 and done_n >= crash_after:
                raise RuntimeError("WINNOW_CRASH_AFTER_SHARDS: simulated crash")
            pause_point(f"map:{done_n}")
    map_seconds = time.perf_counter() - t_map
    return finish_run(
        t_start,
        shards,
        warnings,
        out,
        config,
        command,
        results,
        pending,
        resolved,
        {"map_s": round(map_seconds, 3), "warm_up_s": timings_warm},
        workers,
        map_stages,
        global_stages,
    )


def work_files(map_dir: Path, stats: dict) -> Path | list[Path] | None:
    """A finished shard's work columns: one file for the shard (the local engine's ``work-SSSSS.arrow``), one per
    part (the Ray engine's ``work-SSSSS-CCCC.arrow``, in ``work_parts``), or None."""
    if stats.get("work_parts"):
        return [map_dir / p for p in stats["work_parts"]]
    return (map_dir / stats["work"]) if stats.get("work") else None


def finish_run(
    t_start: float,
    shards,
    warnings: list[str],
    out: Path,
    config: Config,
    command: str,
    results: dict[int, dict],
    pending: list[int],
    resolved: dict,
    timings_map: dict,
    workers: int,
    map_stages: list[Stage] | None = None,
    global_stages: list[GlobalStage] | None = None,
    extra: dict | None = None,
) -> dict:
    """What every executor does once each shard's map phase has its stats in ``results``: count the rows, run the
    global stages over a ``PartsContext``, finalize ``scores/`` and write the manifest (``extra`` adds top-level
    entries: the Ray engine's ``engine`` and ``ray``)."""
    map_dir = out / "work" / "map"

    rows_in = sum(results[i]["rows"] for i in range(len(shards)))
    for i in range(len(shards)):
        if shards[i].size == 0:
            warnings.append(f"{shards[i].path}: empty file (0 rows)")
        elif results[i]["rows"] == 0:
            warnings.append(f"{shards[i].path}: no rows")
    if rows_in == 0:
        raise UserError(f"no rows in {len(shards)} input file(s): {', '.join(s.path for s in shards[:3])}")

    nonempty = [i for i in range(len(shards)) if results[i]["rows"]]
    parts = {i: [map_dir / p for p in results[i]["parts"]] for i in nonempty}
    works = {i: work_files(map_dir, results[i]) for i in nonempty}
    t_glob = time.perf_counter()
    gctx = PartsContext(config, parts, works)
    timings_global: dict[str, float] = {"load_s": round(time.perf_counter() - t_glob, 3)}
    global_stats: dict[str, dict] = {}
    gstages = global_stages if global_stages is not None else build_global_stages(config)
    updates = run_global(gctx, gstages, timings_global, global_stats)

    t_fin = time.perf_counter()
    verdicts = finalize(gctx, out / "scores", updates, config)
    fin_seconds = time.perf_counter() - t_fin
    if sum(verdicts.values()) != rows_in:
        raise RuntimeError(f"internal error: verdicts sum to {sum(verdicts.values())} but rows_in is {rows_in}")

    stats = mf.stage_stats(results, global_stats)
    manifest = {
        "winnow_version": __version__,
        "command": command,
        "rows_in": rows_in,
        "verdicts": dict(sorted(verdicts.items(), key=lambda kv: (-kv[1], kv[0]))),
        "kept": verdicts.get("kept", 0),
        "inputs": [
            {k: results[i].get(k) for k in ("path", "kind", "size", "hash", "format", "rows", "parts", "reused")}
            for i in range(len(shards))
        ],
        "config": config.to_dict(),
        "resolved": resolved,
        "stages_run": {
            "map": [s.name for s in (map_stages or registry.active(config, registry.MAP))],
            "global": [s.name for s in gstages],
        },
        "versions": mf.versions(),
        "seed": config.run.seed,
        "timings": {
            **timings_map,
            "global_s": timings_global,
            "finalize_s": round(fin_seconds, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "shards_done": len(pending),
            "shards_reused": len(shards) - len(pending),
            "workers": workers if pending else 0,
        },
        "stages": stats,
        # what model stages report of themselves: models, devices, which kernel path ran (GPU self-checks)
        "stage_info": {st.name: info for st in gstages if (info := getattr(st, "manifest_info", dict)())},
        **mf.summaries(stats),
        "warnings": warnings,
        "scores": sorted(p.name for p in (out / "scores").glob("part-*.parquet")),
        **(extra or {}),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
