"""The global context: the same answers from map parts on disk and from one table in memory; first reason wins."""

import os

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.config import Config
from engine.run.context import MemoryContext, PartsContext
from engine.run.finalize import finalize, run_global


def _table(n=10, shard=0):
    return pa.table({
        "_shard": pa.array(np.full(n, shard, np.int32)),
        "row": pa.array(np.arange(n, dtype=np.int64) * 2),  # row numbers need not be contiguous
        "verdict": pa.array(["kept"] * (n - 1) + ["too_short"], pa.large_string()),
        "detail": pa.nulls(n, pa.large_string()),
        "duplicate_of": pa.nulls(n, pa.large_string()),
        "label": pa.array([None if i % 3 == 0 else f"c{i % 2}" for i in range(n)], pa.large_string()),
        "x": pa.array(np.arange(n, dtype=np.float64) + 100 * shard),
    })  # fmt: skip


def _parts(tmp_path, tables, split_at=4):
    """Each shard as two Parquet parts (published columns) plus a work file (column ``w``)."""
    parts, work = {}, {}
    for t in tables:
        s = t.column("_shard")[0].as_py()
        pub = t.drop_columns(["_shard"])
        files = []
        for c, piece in enumerate((pub.slice(0, split_at), pub.slice(split_at))):
            f = tmp_path / f"part-{s:05d}-{c:04d}.parquet"
            pq.write_table(piece, f)
            files.append(f)
        w = pa.table({"row": t.column("row"), "w": pa.array(np.arange(t.num_rows, dtype=np.int32) + 1000 * s)})
        wf = tmp_path / f"work-{s:05d}.arrow"
        with pa.OSFile(str(wf), "wb") as sink, pa.ipc.new_file(sink, w.schema) as wr:
            wr.write_table(w)
        parts[s], work[s] = files, wf
    return parts, work


def test_parts_and_memory_contexts_agree(tmp_path):
    tables = [_table(10, 0), _table(7, 1)]
    parts, work = _parts(tmp_path, tables)
    disk = PartsContext(Config(), parts, work)
    mem = MemoryContext(
        pa.concat_tables(tables).append_column(
            "w", pa.array(np.concatenate([np.arange(10) + 0, np.arange(7) + 1000]).astype(np.int32))
        )
    )
    for kw in (
        {},
        {"kept_only": True},
        {"where": pl.col("label").is_not_null()},
        {"keys": pl.DataFrame({"_shard": [1, 0], "row": [4, 2]})},
    ):
        a = disk.frame(["x", "w", "label", "missing"], **kw)
        b = mem.frame(["x", "w", "label", "missing"], **kw)
        assert a.select("_shard", "row", "verdict", "x", "w", "label").equals(
            b.select("_shard", "row", "verdict", "x", "w", "label")
        ), kw
        assert a["missing"].is_null().all()
    assert disk.frame([], kept_only=True).height == 10 + 7 - 2
    # streamed one part at a time
    assert len(list(disk.iter_frames(["x"]))) == 4


def test_first_reason_wins_and_counts():
    ctx = MemoryContext(_table(10))
    upd = pl.DataFrame({"_shard": [0, 0, 0], "row": [0, 18, 2], "verdict": ["exact_duplicate"] * 3})
    took = ctx.apply_verdicts(upd)
    assert sorted(took["row"].to_list()) == [0, 2]  # row 18 was already too_short
    took = ctx.apply_verdicts(pl.DataFrame({"_shard": [0], "row": [0], "verdict": ["near_duplicate"]}))
    assert took.height == 0
    assert ctx.verdict_counts() == {"kept": 7, "exact_duplicate": 2, "too_short": 1}
    assert ctx.frame([], kept_only=True).height == 7


class _Upd:
    name = "upd"
    stats: dict = {}  # noqa: RUF012 - a test double

    def __init__(self, frame):
        self.frame = frame

    def run(self, ctx):
        return self.frame


def test_finalize_links_untouched_parts_and_patches_the_rest(tmp_path):
    tables = [_table(10, 0), _table(7, 1)]
    parts, work = _parts(tmp_path, tables)
    # every part already has the global column (the map phase writes it as nulls)
    for files in parts.values():
        for f in files:
            t = pq.read_table(f)
            pq.write_table(t.append_column(pa.field("score", pa.float64()), pa.nulls(t.num_rows, pa.float64())), f)
    ctx = PartsContext(Config(), parts, work)
    upd = pl.DataFrame(
        {
            "_shard": [1, 1],
            "row": [0, 8],
            "verdict": ["near_duplicate", None],
            "duplicate_of": ["a", None],
            "score": [0.5, 2.0],
        }
    )
    updates = run_global(ctx, [_Upd(upd)], {}, {})
    out = tmp_path / "scores"
    counts = finalize(ctx, out, updates, Config())
    assert counts == {"kept": 14, "too_short": 2, "near_duplicate": 1}
    # shard 0 untouched: hard links; shard 1 holds updates in both parts (rows 0 and 8): rewritten
    assert os.stat(out / "part-00000-0000.parquet").st_ino == os.stat(parts[0][0]).st_ino
    assert os.stat(out / "part-00001-0000.parquet").st_ino != os.stat(parts[1][0]).st_ino
    df = pl.scan_parquet(out / "*.parquet").collect().sort("x")
    assert df.height == 17 and "w" not in df.columns  # work columns are never published
    r = df.filter(pl.col("x") == 100.0)
    assert r["verdict"].item() == "near_duplicate" and r["duplicate_of"].item() == "a" and r["score"].item() == 0.5
    r = df.filter(pl.col("x") == 104.0)  # row 8: a score, no verdict change
    assert r["verdict"].item() == "kept" and r["score"].item() == 2.0
    assert df["score"].is_null().sum() == 15
