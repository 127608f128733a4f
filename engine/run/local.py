"""The local runner: map phase over shards, global stages, finalize, manifest.

1. **Map** (streaming, bounded memory): each shard is read in batches, canonicalised, passed through the map
   stages (a fold: ``for s in stages: batches = s(batches)``) and written to ``OUT/work/map/part-*.parquet``.
   Shards run in parallel processes (one per core); a single shard overlaps reading with compute in a prefetch
   thread (pyarrow and the Numba kernels release the GIL). A completion marker per shard
   (``work/map/done-SSSSS.json``, written last) makes a rerun skip finished shards; a killed shard leaves no
   marker and is redone from scratch, so a resume neither loses nor duplicates rows.
2. **Global** stages read back only the columns they need and return update tables keyed by (shard, row).
3. **Finalize** writes ``OUT/scores/`` from the map parts plus the updates (parts without updates are
   hard-linked, not rewritten), counts the verdicts and checks ``sum(verdicts) == rows_in``.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine import __version__
from engine.config import Config
from engine.errors import UserError
from engine.io.readers import Shard, discover, estimate_rows, read_shard
from engine.io.schema import CANONICAL_TYPES, canonicalize, detect_format, required_columns
from engine.stage import GlobalStage, Stage
from engine.io.writers import META_FORMAT, META_INPUT_COLUMNS, PartWriter, write_json_atomic

# Sections of the config that change what the map phase writes: a finished shard is reused only if they match.
MAP_SECTIONS = ("read", "normalize", "rules", "clean", "dedup", "contamination", "embed")
STR = pa.large_string()


# ---------------------------------------------------------------------------------------------------- stages
def validate(config: Config) -> None:
    """Option errors are user errors: one line, exit 2."""
    try:
        config.dedup.validate()
    except ValueError as e:
        raise UserError(str(e)) from None
    if config.contamination.against:
        from engine.stages.contamination import eval_files

        try:
            eval_files(config.contamination.against)
        except (FileNotFoundError, ValueError) as e:
            raise UserError(f"--against: {e}") from None


def build_map_stages(config: Config, work_dir: str | None = None, n_rows: int | None = None) -> list[Stage]:
    """The map stages in order; ``work_dir`` (OUT/work) and ``n_rows`` (the corpus size, an estimate) are for the
    embedder (its cache, and ``auto``'s choice by corpus size)."""
    from engine.stages.clean import CleanStage
    from engine.stages.exact import ContentHashStage
    from engine.stages.normalize import NormalizeStage
    from engine.stages.rules import RulesStage

    stages: list[Stage] = [
        NormalizeStage(config.normalize),
        RulesStage(config.rules),
        CleanStage(config.clean),
        ContentHashStage(),
    ]
    if config.contamination.against:
        from engine.stages.contamination import ContaminationStage

        stages.append(ContaminationStage(config.contamination))
    if config.dedup.enabled:
        from engine.stages.dedup import MinHashStage

        stages.append(MinHashStage(config.dedup))
    if config.embed.embedder != "none" and "embed" not in config.run.skip_stages:
        from engine.stages.embed import EmbedStage

        stages.append(EmbedStage(config.embed, work_dir=work_dir, n_rows=n_rows))
    return [s for s in stages if s.name not in config.run.skip_stages]


def loss_enabled(config: Config) -> bool:
    """LM losses run when asked (``loss.enabled = on``) or, with ``auto``, when a CUDA GPU is present: on CPU the
    reference model costs seconds per batch, so there they are opt-in and bounded by ``--loss-budget``."""
    mode = config.loss.enabled
    if mode not in ("auto", "on", "off"):
        raise UserError(f"loss.enabled must be auto, on or off, got {mode!r}")
    if mode != "auto":
        return mode == "on"
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False


def build_global_stages(config: Config) -> list[GlobalStage]:
    from engine.stages.exact import ExactDedup

    stages: list[GlobalStage] = []
    if config.exact.enabled:
        stages.append(ExactDedup(config.exact))
    if config.dedup.enabled:  # after exact dedup, so exact copies take no part in near-duplicate clusters
        from engine.stages.dedup import NearDedup

        stages.append(NearDedup(config.dedup))
    if config.semdedup.enabled:
        from engine.stages.semdedup import SemDedup

        stages.append(SemDedup(config.semdedup))
    if config.labels.enabled:
        from engine.stages.labels import LabelNoise

        stages.append(LabelNoise(config.labels))
    if loss_enabled(config):
        from engine.stages.loss import LossGlobalStage

        stages.append(LossGlobalStage(config))
    skip = set(config.run.skip_stages) | ({"near_dedup"} if "minhash" in config.run.skip_stages else set())
    return [s for s in stages if s.name not in skip]


# ---------------------------------------------------------------------------------------------------- map phase
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


def file_hash(path: str, block: int = 8 << 20) -> str:
    """xxh3-128 of the file's bytes (streamed), for the manifest's ``inputs``."""
    import xxhash

    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return "xxh3_128:" + h.hexdigest()


def _shard_key(shard: Shard, config: Config) -> str:
    blob = (f"{shard.path}|{shard.size}|{shard.mtime_ns}|{config.section_hash(*MAP_SECTIONS)}|"
            f"{sorted(config.run.skip_stages)}|{__version__}")
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def process_shard(index: int, shard: Shard, config: Config, map_dir: str, stages: list[Stage] | None = None,
                  on_rows: Callable[[int], None] | None = None, n_rows: int | None = None) -> dict[str, Any]:
    """Map phase of one shard; returns its stats (also written as the completion marker)."""
    t0 = time.perf_counter()
    map_dir = Path(map_dir)
    for stale in map_dir.glob(f"part-{index:05d}-*"):
        stale.unlink()
    stages = stages if stages is not None else build_map_stages(config, str(map_dir.parent), n_rows)
    for s in stages:
        s.stats = {}
        s.begin_shard(index, str(map_dir.parent))
    rc = config.read
    fmt_box: dict[str, Any] = {}
    counts = {"rows": 0, "malformed": 0}

    def canonical() -> Iterator[pa.RecordBatch]:
        for batch in read_shard(shard, rc.batch_rows, rc.jsonl_block_bytes):
            if not any(not c.startswith("__") for c in batch.schema.names):
                # Every row of this batch was unreadable: nothing to detect a format from yet.
                out = canonicalize(batch, "unknown", shard.path, None)
                counts["rows"] += out.num_rows
                yield out
                continue
            if "fmt" not in fmt_box:
                try:
                    fmt_box["fmt"] = detect_format(
                        [c for c in batch.schema.names if not c.startswith("__")], rc.format, rc.map or None
                    )
                except UserError as e:
                    raise UserError(f"{shard.path}: {e}") from None
                need = required_columns(fmt_box["fmt"], rc.map)
                have = [c for c in batch.schema.names if not c.startswith("__")]
                if have and need and not any(c in have for c in need):
                    raise UserError(f"{shard.path}: format {fmt_box['fmt']} needs column(s) {need}, found {have}")
            out = canonicalize(batch, fmt_box["fmt"], shard.path, rc.map or None)
            if "input_cols" not in fmt_box:
                fmt_box["input_cols"] = out.schema.names[len(CANONICAL_TYPES):]
            counts["rows"] += out.num_rows
            yield out

    # Inclusive seconds spent pulling from each step of the fold; a stage's own time is its inclusive time minus
    # its upstream's (reported per stage in the manifest as ``seconds``).
    inclusive: list[float] = []
    # The reader thread also runs the first stage (normalisation, a nogil kernel): with the main thread on the
    # other stages and the writer thread on Parquet encoding, the three keep 2 cores busy (Parquet I/O bench:
    # 0.35 s -> 0.30 s per 52k-row Alpaca shard).
    head = stages[:1] if stages and stages[0].name == "normalize" else []
    in_thread: list[float] = []  # inclusive seconds of the steps run in the reader thread
    batches: Iterator[pa.RecordBatch] = _timed(canonical(), in_thread)
    for s in head:
        batches = _timed(s(batches), in_thread)
    batches = _timed(_prefetch(batches), inclusive)
    for s in stages[len(head):]:
        batches = _timed(s(batches), inclusive)
    writer = None
    verdicts: dict[str, int] = {}

    def write(batch: pa.RecordBatch) -> None:
        writer.write(batch)
        _count_verdicts(batch, verdicts)

    # Write-behind: Parquet encoding + zstd of batch k (GIL released) overlaps the stages on batch k+1; one writer
    # thread keeps the order. With the prefetch thread that makes reading, compute and writing a 3-step pipeline.
    pending: list[cf.Future] = []
    with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="winnow-write") as wpool:
        try:
            for batch in batches:
                if writer is None:
                    writer = PartWriter(map_dir, index, config.run.compression, config.run.compression_level,
                                        {META_INPUT_COLUMNS: json.dumps(fmt_box.get("input_cols", [])).encode(),
                                         META_FORMAT: fmt_box.get("fmt", "").encode()})
                while len(pending) >= 2:
                    pending.pop(0).result()
                pending.append(wpool.submit(write, batch))
                if on_rows:
                    on_rows(batch.num_rows)
            for f in pending:
                f.result()
            files = writer.close() if writer else []
        except BaseException:
            for f in pending:
                f.cancel()
            wpool.shutdown(wait=True)
            if writer:
                writer.abort()
            raise
    for s in stages:
        s.end_shard()
    for k, s in enumerate(head):
        s.stats["seconds"] = round(in_thread[k + 1] - in_thread[k], 3)
    for k, s in enumerate(stages[len(head):]):
        s.stats["seconds"] = round(inclusive[k + 1] - inclusive[k], 3)
    content = file_hash(shard.path)
    stats = {
        "index": index,
        "path": shard.path,
        "kind": shard.kind,
        "size": shard.size,
        "hash": content,
        "format": fmt_box.get("fmt"),
        "rows": counts["rows"],
        "map_verdicts": verdicts,
        "parts": files,
        "stages": {s.name: dict(s.stats) for s in stages},
        "seconds": round(time.perf_counter() - t0, 3),
        "key": _shard_key(shard, config),
    }
    if shard.size and counts["rows"] == 0:
        stats["warning"] = "no rows"
    write_json_atomic(map_dir / f"done-{index:05d}.json", stats)
    return stats


def _count_verdicts(batch: pa.RecordBatch, acc: dict[str, int]) -> None:
    vc = pc.value_counts(batch.column("verdict"))
    for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        acc[v] = acc.get(v, 0) + c


def _process_shard_entry(args):
    index, shard, config_dict, map_dir, threads, n_rows = args
    # One worker process per core already fills the machine: more threads per process only oversubscribe it.
    import numba

    numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
    pa.set_cpu_count(max(1, threads))
    config = _config_from_dict(config_dict)
    return process_shard(index, shard, config, map_dir, n_rows=n_rows)


def _config_from_dict(d: dict) -> Config:
    from engine.config import _update

    cfg = Config()
    _update(cfg, d, "config")
    return cfg


# ---------------------------------------------------------------------------------------------------- global phase
@dataclass
class GlobalContext:
    out_dir: Path
    work_dir: Path
    config: Config
    parts: dict[int, list[Path]]  # shard index -> its map-phase part files
    verdicts: pl.DataFrame = field(default=None)  # _shard, row, verdict (current, after earlier global stages)

    def frame(self, columns: list[str]) -> pl.DataFrame:
        """``_shard``, ``row``, current ``verdict`` and the requested map-phase columns of every row."""
        cols = [c for c in columns if c not in ("_shard", "row", "verdict")]
        frames = []
        for idx, files in self.parts.items():
            for f in files:
                avail = pq.read_schema(f).names
                t = pq.read_table(f, columns=["row"] + [c for c in cols if c in avail])
                df = pl.from_arrow(t)
                for c in cols:
                    if c not in avail:
                        df = df.with_columns(pl.lit(None).alias(c))
                frames.append(df.with_columns(pl.lit(idx, dtype=pl.Int32).alias("_shard")))
        if not frames:
            return pl.DataFrame(schema={"_shard": pl.Int32, "row": pl.Int64, "verdict": pl.String})
        df = pl.concat(frames, how="diagonal_relaxed")
        return df.join(self.verdicts, on=["_shard", "row"], how="left").select(["_shard", "row", "verdict"] + cols)


def _load_verdicts(parts: dict[int, list[Path]]) -> pl.DataFrame:
    frames = []
    for idx, files in parts.items():
        for f in files:
            t = pq.read_table(f, columns=["row", "verdict"])
            frames.append(pl.from_arrow(t).with_columns(pl.lit(idx, dtype=pl.Int32).alias("_shard")))
    if not frames:
        return pl.DataFrame(schema={"_shard": pl.Int32, "row": pl.Int64, "verdict": pl.String})
    return pl.concat(frames).select("_shard", "row", pl.col("verdict").cast(pl.String))


def run_global(ctx: GlobalContext, stages: list[GlobalStage], timings: dict, stage_stats: dict):
    """Run global stages in order; returns (verdict updates frame, [extra column frames])."""
    vcols = ["verdict", "detail", "duplicate_of"]
    verdict_updates = pl.DataFrame(schema={"_shard": pl.Int32, "row": pl.Int64, **{c: pl.String for c in vcols}})
    extras: list[pl.DataFrame] = []
    for st in stages:
        t0 = time.perf_counter()
        upd = st.run(ctx)
        timings[st.name] = round(time.perf_counter() - t0, 3)
        stage_stats[st.name] = dict(st.stats)
        if upd is None or upd.height == 0:
            continue
        upd = upd.with_columns(pl.col("_shard").cast(pl.Int32), pl.col("row").cast(pl.Int64))
        if "verdict" in upd.columns:
            v = upd.select(["_shard", "row"] + [pl.col(c).cast(pl.String) if c in upd.columns else
                                                pl.lit(None, dtype=pl.String).alias(c) for c in vcols])
            # Only rows still kept take a new verdict: the first reason wins.
            still = ctx.verdicts.filter(pl.col("verdict") == "kept").select("_shard", "row")
            v = v.filter(pl.col("verdict").is_not_null()).join(still, on=["_shard", "row"], how="semi")
            verdict_updates = pl.concat([verdict_updates, v])
            ctx.verdicts = ctx.verdicts.update(v.select("_shard", "row", "verdict"), on=["_shard", "row"])
        other = [c for c in upd.columns if c not in ("_shard", "row", *vcols)]
        if other:
            extras.append(upd.select(["_shard", "row"] + other))
    return verdict_updates, extras


# ---------------------------------------------------------------------------------------------------- finalize
def _apply(batch: pa.RecordBatch, upd_rows: np.ndarray, upd_table: pa.Table, only_nulls: bool = False):
    """Replace/add the columns of ``upd_table`` on the rows of ``batch`` whose ``row`` is in ``upd_rows`` (sorted)."""
    rows = batch.column("row").to_numpy()
    pos = np.searchsorted(upd_rows, rows)
    pos_c = np.minimum(pos, max(len(upd_rows) - 1, 0))
    hit = (pos < len(upd_rows)) & (upd_rows[pos_c] == rows) if len(upd_rows) else np.zeros(len(rows), bool)
    take_idx = pa.array(np.where(hit, pos_c, 0), pa.int64())
    mask = pa.array(hit)
    names = batch.schema.names
    for name in upd_table.column_names:
        col = upd_table.column(name).combine_chunks()
        if len(upd_rows):
            new = pc.if_else(mask, pc.take(col, take_idx), pa.nulls(len(rows), col.type))
        else:
            new = pa.nulls(len(rows), col.type)
        if name in names:
            old = batch.column(name)
            new = pc.if_else(mask, new.cast(old.type), old)
            batch = batch.set_column(names.index(name), name, new)
        else:
            batch = batch.append_column(name, new)
            names = batch.schema.names
    return batch


def finalize(ctx: GlobalContext, scores_dir: Path, verdict_updates: pl.DataFrame, extras: list[pl.DataFrame],
             config: Config) -> dict[str, int]:
    """Write scores/ and return the verdict counts."""
    scores_dir.mkdir(parents=True, exist_ok=True)
    keep_names = set()
    verdicts: dict[str, int] = {}
    vu = verdict_updates.sort(["_shard", "row"])
    for idx, files in ctx.parts.items():
        v_s = vu.filter(pl.col("_shard") == idx)
        e_s = [e.filter(pl.col("_shard") == idx).sort("row") for e in extras]
        extra_names = [c for e in extras for c in e.columns if c not in ("_shard", "row")]
        for f in files:
            dest = scores_dir / f.name
            keep_names.add(f.name)
            if v_s.height == 0 and not extra_names:
                if dest.exists():
                    dest.unlink()
                try:
                    os.link(f, dest)
                except OSError:
                    shutil.copyfile(f, dest)
                for b in pq.ParquetFile(f).iter_batches(columns=["verdict"]):
                    _count_verdicts(b, verdicts)
                continue
            pf = pq.ParquetFile(f)
            tmp = dest.with_name(dest.name + ".tmp")
            writer = None
            v_rows = v_s["row"].to_numpy()
            v_tab = v_s.select("verdict", "detail", "duplicate_of").to_arrow()
            for b in pf.iter_batches(batch_size=config.read.batch_rows):
                if v_s.height:
                    b = _apply(b, v_rows, v_tab)
                for e in e_s:
                    cols = [c for c in e.columns if c not in ("_shard", "row")]
                    b = _apply(b, e["row"].to_numpy(), e.select(cols).to_arrow())
                if writer is None:
                    kw = {"compression": config.run.compression}
                    if config.run.compression == "zstd":
                        kw["compression_level"] = config.run.compression_level
                    writer = pq.ParquetWriter(tmp, b.schema.with_metadata(pf.schema_arrow.metadata), **kw)
                writer.write_batch(b)
                _count_verdicts(b, verdicts)
            if writer is not None:
                writer.close()
                os.replace(tmp, dest)
    for stale in scores_dir.glob("part-*.parquet"):
        if stale.name not in keep_names:
            stale.unlink()
    return verdicts


# ---------------------------------------------------------------------------------------------------- entry point
def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version(), "winnow": __version__}
    for pkg in ("pyarrow", "polars", "numpy", "numba", "torch", "transformers", "triton", "datasketch"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def score(inputs: list[str], out: str | Path, config: Config, progress: Any = None, command: str = "score",
          map_stages: list[Stage] | None = None, global_stages: list[GlobalStage] | None = None) -> dict:
    """Score ``inputs`` into the run folder ``out``; returns the manifest (also written to OUT/manifest.json)."""
    t_start = time.perf_counter()
    validate(config)
    shards, warnings = discover(inputs, exclude=str(out))
    out = Path(out)
    work = out / "work"
    map_dir = work / "map"
    map_dir.mkdir(parents=True, exist_ok=True)
    for stale in map_dir.glob("*.tmp"):
        stale.unlink()
    for marker in map_dir.glob("done-*.json"):
        if int(marker.stem.split("-")[1]) >= len(shards):
            marker.unlink()
    for part in map_dir.glob("part-*.parquet"):
        if int(part.name.split("-")[1]) >= len(shards):
            part.unlink()

    results: dict[int, dict] = {}
    pending: list[int] = []
    for i, sh in enumerate(shards):
        marker = map_dir / f"done-{i:05d}.json"
        if marker.exists():
            try:
                st = json.loads(marker.read_text())
            except (OSError, ValueError):
                st = None
            if st and st.get("key") == _shard_key(sh, config) and all((map_dir / p).exists() for p in st["parts"]):
                st["reused"] = True
                results[i] = st
                continue
            marker.unlink()
        pending.append(i)

    t_map = time.perf_counter()
    est_rows = estimate_rows(shards)
    crash_after = int(os.environ.get("WINNOW_CRASH_AFTER_SHARDS", "-1"))  # tests: simulate a kill mid-run
    if config.run.workers:
        workers = config.run.workers
    else:
        # One process per core, but only with enough input to pay for starting them (~2 s each, mostly loading
        # the compiled kernels): below ~64 MB per extra process one process with its read/write threads wins.
        pending_bytes = sum(shards[i].size for i in pending)
        workers = min(os.cpu_count() or 1, 1 + pending_bytes // (64 << 20))
    workers = max(1, min(workers, len(pending)))
    task = progress.add_task("map", total=sum(shards[i].size for i in pending) or 1) if progress else None
    if workers > 1 and map_stages is None:
        # forkserver: workers fork from a clean server process that has the engine imported once (spawn would
        # re-import pyarrow/polars/numba per worker, ~1.5 s each; plain fork would copy this process's threads).
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(
            ["engine.run.local", "engine.stages.normalize", "engine.stages.rules", "engine.stages.exact", "engine.stages.clean", "engine.stages.dedup",
             "engine.stages.embed"]
        )
        threads = max(1, (os.cpu_count() or 1) // workers)
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as ex:
            futs = {ex.submit(_process_shard_entry,
                              (i, shards[i], config.to_dict(), str(map_dir), threads, est_rows)): i
                    for i in pending}
            for done_n, fut in enumerate(cf.as_completed(futs), 1):
                i = futs[fut]
                results[i] = fut.result()
                if progress:
                    progress.advance(task, shards[i].size)
                if crash_after >= 0 and done_n >= crash_after:
                    raise RuntimeError("WINNOW_CRASH_AFTER_SHARDS: simulated crash")
    else:
        stages = map_stages if map_stages is not None else build_map_stages(config, str(work), est_rows)
        for done_n, i in enumerate(pending, 1):
            results[i] = process_shard(i, shards[i], config, str(map_dir), stages)
            if progress:
                progress.advance(task, shards[i].size)
            if crash_after >= 0 and done_n >= crash_after:
                raise RuntimeError("WINNOW_CRASH_AFTER_SHARDS: simulated crash")
    map_seconds = time.perf_counter() - t_map

    rows_in = sum(results[i]["rows"] for i in range(len(shards)))
    nonempty = [i for i in range(len(shards)) if results[i]["rows"]]
    for i in range(len(shards)):
        if shards[i].size == 0:
            warnings.append(f"{shards[i].path}: empty file (0 rows)")
        elif results[i]["rows"] == 0:
            warnings.append(f"{shards[i].path}: no rows")
    if rows_in == 0:
        raise UserError(f"no rows in {len(shards)} input file(s): {', '.join(s.path for s in shards[:3])}")

    parts = {i: [map_dir / p for p in results[i]["parts"]] for i in nonempty}
    ctx = GlobalContext(out, work, config, parts, _load_verdicts(parts))
    timings_global: dict[str, float] = {}
    stage_stats: dict[str, dict] = {}
    gstages = global_stages if global_stages is not None else build_global_stages(config)
    vu, extras = run_global(ctx, gstages, timings_global, stage_stats)

    t_fin = time.perf_counter()
    verdicts = finalize(ctx, out / "scores", vu, extras, config)
    fin_seconds = time.perf_counter() - t_fin
    if sum(verdicts.values()) != rows_in:
        raise RuntimeError(f"internal error: verdicts sum to {sum(verdicts.values())} but rows_in is {rows_in}")

    map_stats: dict[str, dict] = {}
    for i in range(len(shards)):
        for name, st in results[i].get("stages", {}).items():
            agg = map_stats.setdefault(name, {})
            for k, v in st.items():
                agg[k] = agg.get(k, 0) + v
    map_stats.update(stage_stats)
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
        "versions": versions(),
        "seed": config.run.seed,
        "timings": {
            "map_s": round(map_seconds, 3),
            "global_s": timings_global,
            "finalize_s": round(fin_seconds, 3),
            "total_s": round(time.perf_counter() - t_start, 3),
            "shards_done": len(pending),
            "shards_reused": len(shards) - len(pending),
        },
        "stages": map_stats,
        "embedder": json.loads((work / "embed_info.json").read_text()) if (work / "embed_info.json").exists()
        else None,
        "label_issues": {k.split(".", 1)[1]: v for k, v in map_stats.get("label_noise", {}).items()
                         if k.startswith("issues.")},
        "contamination": {k.split(".", 1)[1]: v for k, v in map_stats.get("contamination", {}).items()
                          if k.startswith("contaminated.")},
        "warnings": warnings,
        "scores": sorted(p.name for p in (out / "scores").glob("part-*.parquet")),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest
