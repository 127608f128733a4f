"""The global phase and the final ``scores/``.

``run_global`` runs the global stages in order over the context; each returns a narrow update table keyed by
(``_shard``, ``row``): new verdicts (applied only to rows still kept: the first reason wins) and score columns.

``finalize`` writes ``scores/``: each map part (Arrow IPC, lz4, memory-mapped) is read once, patched column by
column where updates touch it, and written once as Parquet, parts in parallel threads; the map phase already wrote
the global stages' columns as nulls, so every part has every column and ``scores/`` loads with one
``pyarrow.dataset`` / ``polars.scan_parquet`` call. A Parquet source part that no update touches is hard-linked.
Updates are split by shard once (O(rows), not O(shards x rows)).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.io.writers import disk_full, inject_disk_full, parquet_options, read_part
from engine.run.context import PartsContext
from engine.run.lock import pause_point

VERDICT_COLUMNS = ("verdict", "detail", "duplicate_of")


def run_global(ctx, stages: list, timings: dict, stage_stats: dict) -> list[pl.DataFrame]:
    """Run global stages in order; returns their update frames (verdict updates already filtered to rows that were
    still kept and applied to ``ctx``)."""
    updates: list[pl.DataFrame] = []
    for k, st in enumerate(stages):
        t0 = time.perf_counter()
        upd = st.run(ctx)
        timings[st.name] = round(time.perf_counter() - t0, 3)
        if k == 0:
            pause_point("global")  # tests: a kill between global stages
        stage_stats[st.name] = dict(st.stats)
        if upd is None or upd.height == 0:
            continue
        upd = upd.with_columns(pl.col("_shard").cast(pl.Int32), pl.col("row").cast(pl.Int64))
        if "verdict" in upd.columns:
            v = upd.select(
                ["_shard", "row"]
                + [
                    pl.col(c).cast(pl.String) if c in upd.columns else pl.lit(None, dtype=pl.String).alias(c)
                    for c in VERDICT_COLUMNS
                ]
            )
            v = ctx.apply_verdicts(v)
            if v.height:
                updates.append(v)
        other = [c for c in upd.columns if c not in ("_shard", "row", *VERDICT_COLUMNS)]
        if other:
            updates.append(
                upd.select(["_shard", "row"] + other).filter(
                    pl.any_horizontal([pl.col(c).is_not_null() for c in other])
                )
            )
    return updates


def _patch(batch: pa.Table, upd_rows: np.ndarray, upd: pa.Table) -> pa.Table:
    """Set the columns of ``upd`` on the rows of ``batch`` whose ``row`` is in ``upd_rows`` (sorted, unique);
    other rows keep their values (nulls in ``upd`` never overwrite)."""
    rows = batch.column("row").to_numpy()
    pos = np.searchsorted(upd_rows, rows)
    pos_c = np.minimum(pos, len(upd_rows) - 1)
    hit = (pos < len(upd_rows)) & (upd_rows[pos_c] == rows)
    if not hit.any():
        return batch
    take = pa.array(np.where(hit, pos_c, 0), pa.int64())
    names = batch.schema.names
    for name in upd.column_names:
        col = upd.column(name).combine_chunks()
        new = pc.take(col, take)
        mask = pa.array(hit) if col.null_count == 0 else pc.and_(pa.array(hit), pc.is_valid(new))
        if name in names:
            old = batch.column(name)
            patched = pc.if_else(mask, new.cast(old.type), old)
            batch = batch.set_column(names.index(name), name, patched)
        else:
            batch = batch.append_column(name, pc.if_else(mask, new, pa.nulls(len(rows), col.type)))
            names = batch.schema.names
    return batch


def _patch_range(t: pa.Table, upd: list[tuple[np.ndarray, pa.Table]]) -> pa.Table:
    """``t`` (rows ascending) with the updates that fall inside its row range applied; ``t`` itself if none do."""
    if not upd or t.num_rows == 0:
        return t
    first, last = t.column("row")[0].as_py(), t.column("row")[-1].as_py()
    for rows, u in upd:
        lo, hi = np.searchsorted(rows, [first, last + 1])
        if hi > lo:
            t = _patch(t, rows[lo:hi], u.slice(lo, hi - lo))
    return t


def _by_shard(updates: list[pl.DataFrame]) -> dict[int, list[tuple[np.ndarray, pa.Table]]]:
    out: dict[int, list[tuple[np.ndarray, pa.Table]]] = {}
    for u in updates:
        for (shard,), g in u.sort(["_shard", "row"]).partition_by("_shard", as_dict=True).items():
            cols = [c for c in g.columns if c not in ("_shard", "row")]
            out.setdefault(int(shard), []).append((g["row"].to_numpy(), g.select(cols).to_arrow()))
    return out


def finalize(ctx: PartsContext, scores_dir: Path, updates: list[pl.DataFrame], config: Any) -> dict[str, int]:
    """Write ``scores/`` and return the verdict counts."""
    scores_dir.mkdir(parents=True, exist_ok=True)
    by_shard = _by_shard(updates)
    keep_names: set[str] = set()
    jobs = []
    for idx, files in ctx.parts.items():
        for f in files:
            dest = scores_dir / (f.stem + ".parquet")
            keep_names.add(dest.name)
            jobs.append((f, dest, by_shard.get(idx, [])))

    def one(job) -> None:
        src, dest, upd = job
        tmp = dest.with_name(dest.name + ".tmp")
        try:
            write_one(src, dest, tmp, upd)
        except BaseException as e:
            tmp.unlink(missing_ok=True)
            if (full := disk_full(e, dest)) is None:
                raise
            raise full from None

    def write_one(src: Path, dest: Path, tmp: Path, upd) -> None:
        if src.suffix == ".arrow":  # a map part: patched and written as Parquet batch by batch (memory: one batch)
            with pa.memory_map(str(src)) as mm:
                reader = pa.ipc.open_file(mm)
                schema = reader.schema
                for _rows, u in upd:  # a column no stage declared (tests' ad hoc stages): added to every batch
                    for f in u.schema:
                        if f.name not in schema.names:
                            schema = schema.append(f)
                writer = None
                try:
                    for k in range(reader.num_record_batches):
                        b = pa.Table.from_batches([reader.get_batch(k)])
                        b = _patch_range(b, upd)
                        for f in schema:
                            if f.name not in b.column_names:
                                b = b.append_column(f, pa.nulls(b.num_rows, f.type))
                        if writer is None:
                            writer = pq.ParquetWriter(
                                tmp,
                                schema,
                                **parquet_options(schema, config.run.compression, config.run.compression_level),
                            )
                        writer.write_table(b.select(schema.names).cast(schema))
                        inject_disk_full(dest)
                        if k == 0:
                            pause_point("finalize")  # tests: a kill while parts of scores/ are half written
                except BaseException:
                    if writer is not None:
                        with contextlib.suppress(Exception):  # closing flushes: on a full disk it fails again
                            writer.close()
                    raise
                if writer is not None:
                    writer.close()
            if writer is not None:
                os.replace(tmp, dest)
                return
        elif upd:
            t = read_part(src)
            patched = _patch_range(t, upd)
            if patched is not t:
                kw = parquet_options(t.schema, config.run.compression, config.run.compression_level)
                pq.write_table(patched, tmp, row_group_size=config.read.batch_rows, **kw)
                inject_disk_full(dest)
                os.replace(tmp, dest)
                return
        if dest.exists():
            dest.unlink()
        try:
            os.link(src, dest)
        except OSError:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)

    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with cf.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="winnow-final") as pool:
        for _ in pool.map(one, jobs):
            pass
    for stale in scores_dir.glob("part-*"):
        if stale.name not in keep_names:
            stale.unlink()
    return ctx.verdict_counts()
