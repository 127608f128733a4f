"""Train / validation / test splits in which no near-duplicate cluster crosses splits.

``assign_splits(ids, clusters, fractions, seed)`` works on arrays: every row of a cluster (``minhash_cluster`` from
engine/stages/dedup.py; a null / negative cluster means a singleton) goes to the same split. Clusters are visited in a
seeded random order (a hash of (seed, cluster key), so the result does not depend on row order or platform) and
each goes to the split whose row count is furthest below its target ``fraction x rows``, relative to that target.
Targets are met to within the largest cluster's size; with singletons only, exactly up to rounding.

``split_run(scores, out_dir, ...)`` applies it to a run's kept rows and writes ``train/val/test.parquet``.
Deterministic per seed. Memory: O(rows) small arrays plus the kept rows' columns when writing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from kernels.strings import combine_hashes, hash_strings

SPLIT_NAMES = ("train", "val", "test")


def _cluster_keys(ids: np.ndarray | pa.Array, clusters: np.ndarray | None) -> np.ndarray:
    """uint64 key per row: its cluster, or a hash of its id for singletons (null / negative cluster)."""
    id_arr = ids if isinstance(ids, (pa.Array, pa.ChunkedArray)) else pa.array(np.asarray(ids).astype(str))
    id_hash = hash_strings(id_arr.cast(pa.large_string()), seed=7) | np.uint64(1 << 63)  # top bit: singleton space
    if clusters is None:
        return id_hash
    if isinstance(clusters, (pa.Array, pa.ChunkedArray)):
        valid = ~np.asarray(clusters.is_null().to_numpy(zero_copy_only=False), bool)
        c = np.asarray(clusters.fill_null(-1).to_numpy(zero_copy_only=False), np.int64)
    else:
        c = np.asarray(clusters)
        if c.dtype == object:
            valid = np.array([x is not None and not (isinstance(x, float) and np.isnan(x)) for x in c])
            c = np.where(valid, c, -1).astype(np.int64)
        else:
            valid = ~np.isnan(c) if c.dtype.kind == "f" else np.ones(c.shape, bool)
            c = np.where(valid, c, -1).astype(np.int64)
    valid &= c >= 0
    return np.where(valid, c.astype(np.uint64) & np.uint64((1 << 63) - 1), id_hash)


def assign_splits(
    ids: np.ndarray | pa.Array,
    clusters: np.ndarray | pa.Array | None,
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """int8 split index per row (0 = train, 1 = val, 2 = test for three fractions); clusters never cross splits."""
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size < 1 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    keys = _cluster_keys(ids, clusters)
    n = keys.size
    if n == 0:
        return np.zeros(0, np.int8)
    uniq, inverse, sizes = np.unique(keys, return_inverse=True, return_counts=True)
    # Seeded order of clusters: hash (seed, key). Independent of row order, stable across platforms.
    seed_h = np.full(uniq.size, np.uint64(seed & ((1 << 64) - 1)), np.uint64)
    order = np.lexsort((uniq, combine_hashes(seed_h, uniq)))
    target = fr * n
    filled = np.zeros(fr.size, np.float64)
    cluster_split = np.empty(uniq.size, np.int8)
    for ci in order:  # one Python step per cluster; fine up to a few million clusters (~1 us each)
        need = np.where(target > 0, (target - filled) / np.maximum(target, 1e-12), -np.inf)
        s = int(np.argmax(need))
        cluster_split[ci] = s
        filled[s] += sizes[ci]
    return cluster_split[inverse]


def split_run(
    scores: str | Path | pl.DataFrame,
    out_dir: str | Path,
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: tuple[str, ...] = SPLIT_NAMES,
    only_kept: bool = True,
) -> dict[str, int]:
    """Split a run's rows (``scores/`` folder, a Parquet file, or a frame) into ``out_dir/<name>.parquet``.

    Uses ``minhash_cluster`` when present (run with near-duplicate detection), else every row is its own cluster.
    From a folder, the assignment reads only (id, verdict, minhash_cluster); rows are then copied part by part,
    so the text is never all in memory. Returns rows per split."""
    if len(names) != len(fractions):
        raise ValueError(f"{len(names)} split names for {len(fractions)} fractions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(scores, pl.DataFrame):
        df = scores.filter(pl.col("verdict") == "kept") if only_kept and "verdict" in scores.columns else scores
        clusters = df["minhash_cluster"].to_arrow() if "minhash_cluster" in df.columns else None
        split = assign_splits(df["id"].to_arrow(), clusters, fractions, seed)
        counts = {}
        for i, name in enumerate(names):
            part = df.filter(pl.Series(split == i))
            part.write_parquet(out / f"{name}.parquet")
            counts[name] = part.height
        return counts

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from engine.io.writers import align_table

    p = Path(scores)
    files = sorted(p.glob("part-*.parquet")) if p.is_dir() else [p]
    keys = []
    for i, f in enumerate(files):
        avail = pq.read_schema(f).names
        cols = ["id", "row"] + [c for c in ("verdict", "minhash_cluster") if c in avail]
        keys.append(pl.from_arrow(pq.read_table(f, columns=cols)).with_columns(pl.lit(i).alias("_file")))
    df = pl.concat(keys, how="diagonal_relaxed")
    if only_kept and "verdict" in df.columns:
        df = df.filter(pl.col("verdict") == "kept")
    clusters = df["minhash_cluster"].to_arrow() if "minhash_cluster" in df.columns else None
    df = df.with_columns(pl.Series("_split", assign_splits(df["id"].to_arrow(), clusters, fractions, seed)))
    counts = {name: 0 for name in names}
    writers: dict[str, pq.ParquetWriter] = {}
    # One schema for every split file: the union of the parts' columns (a chat shard's `messages` and an alpaca
    # shard's `instruction` both survive; rows lacking a column hold nulls).
    unified = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    try:
        for i, f in enumerate(files):
            mine = df.filter(pl.col("_file") == i)
            for s_idx, name in enumerate(names):
                rows = mine.filter(pl.col("_split") == s_idx)["row"].to_numpy()
                if not len(rows):
                    continue
                t = pq.read_table(f)
                t = t.filter(pc.is_in(t.column("row"), value_set=pa.array(rows)))
                if name not in writers:
                    writers[name] = pq.ParquetWriter(out / f"{name}.parquet", unified, compression="zstd")
                writers[name].write_table(align_table(t, unified))
                counts[name] += t.num_rows
    finally:
        for w in writers.values():
            w.close()
    for name in names:
        if name not in writers:
            pq.write_table(unified.empty_table(), out / f"{name}.parquet")
    return counts

