"""Semantic near-duplicates (SemDeDup, Abbas et al. 2023): rows whose embeddings are nearly parallel.

Method: spherical k-means (faiss) splits the unit vectors into clusters of ~``cluster_size`` rows; inside each
cluster every pair's cosine is computed (BLAS, in row blocks) and pairs at or above ``threshold`` are joined by
union-find into duplicate groups (connected components). A row near a cluster boundary is also placed in its
second-nearest cluster when that centroid is within ``boundary`` cosine of the first, so a pair split by the
partition is still compared: on 12,000 alpaca rows (MiniLM, threshold 0.95, 24 clusters) k-means alone found 24 of
the 25 duplicate rows that exact all-pairs search finds, boundary 0.05 found all 25, for at most 1.2x the time.
One row per group is kept by the quality key shared with MinHash dedup: fewest rule violations, then the longer
response, then the earliest (shard, row). The others get verdict ``semantic_duplicate``, ``duplicate_of`` = the
keeper's id, ``detail`` = the cosine to the keeper.

Groups are connected components, so a chain a~b~c joins a and c even if cos(a, c) < threshold; at the thresholds
below groups are small (12,000 alpaca rows: 18 pairs, two triples, one group of 4; the lowest cosine to a keeper
through a chain was 0.936), and ``detail`` reports each row's cosine to its keeper, so a chain shows up there.

Threshold (cosine, unit vectors), calibrated on /work/shared/data with bench/calibrate_semdedup.py (every row's
exact nearest neighbour; 8 pairs read per cosine band per set): alpaca_52k (first 12,000 rows), code_alpaca_2k,
gsm8k train (first 3,000), financial_phrasebank.
- MiniLM (all-MiniLM-L6-v2 over prompt + response): **0.95**. At >= 0.95, 15 of the 16 pairs read in alpaca and
  code_alpaca were the same task with an equivalent answer ("Define entropy" / "Give a definition for entropy";
  two quicksort implementations); the exception was Celsius->Fahrenheit vs Fahrenheit->Celsius (0.958). At
  0.90-0.93 about half were different tasks on one topic ("Remove the redundant verb" vs "Reorganize the
  sentence"), which must stay. Known misses at 0.95: GSM8K's inverted problems (same story, known and unknown
  swapped: 0.95-0.98, 12 of 3,000 rows) and financial_phrasebank template sentences with different figures
  (0.95-0.99), which MiniLM barely tells apart. Rows whose nearest neighbour is >= 0.95: alpaca 0.4% (of 12k),
  code_alpaca 1.0%, gsm8k 0.4%, financial_phrasebank 4.4%.
- static tier (model2vec distillation of the same model): **0.99**. Static vectors are bags of weighted tokens:
  at 0.98-0.99 only 6 of 10 pairs read were duplicates (the rest: one template with different numbers, "8X+6=14"
  vs "2X+4=14"); >= 0.99 all 6 read were. Against MiniLM >= 0.95 as reference, the static tier at 0.97 had
  precision 0.23 and recall 0.12 on alpaca pairs: it finds lexical near-duplicates (MinHash's job), not
  paraphrases, so semantic dedup should run on encoder vectors where the budget allows.
The stage is off by default (``SemDedupConfig.enabled``): it removes real data on a judgement about meaning.

Memory: the embeddings of kept rows as float16 (n x d x 2 B: 768 MB per million MiniLM rows), plus one cluster's
float32 block (``block_rows`` x cluster rows x 4 B). Time: k-means trains on <= 256 points per centroid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl
from numba import njit

from engine.registry import Option, Range, check_fields, register
from engine.stage import GlobalStage
from engine.stages.embed import embed_tier
from kernels.union_find import all_roots, union

SEMANTIC_DUPLICATE = "semantic_duplicate"
# Calibrated cosine thresholds per embedder tier (see the module docstring).
DEFAULT_THRESHOLDS = {"encoder": 0.95, "static": 0.99}


@dataclass
class SemDedupConfig:
    # Run semantic dedup at all (off by default: it removes data on a judgement about meaning).
    enabled: bool = False
    # Cosine at or above which two rows are duplicates; -1 = the calibrated default for the embedder tier
    # (0.95 MiniLM / any encoder, 0.99 static).
    threshold: float = -1.0
    # Target rows per k-means cluster; clusters = ceil(kept rows / cluster_size). Pair work ~ n x cluster_size.
    cluster_size: int = 500
    # k-means iterations (faiss default 20 is plenty for a partition that only bounds the pair search).
    niter: int = 20
    # A row also joins its 2nd-nearest cluster when cos(row, c2) >= cos(row, c1) - boundary; 0 = never.
    boundary: float = 0.05
    # Seed of k-means initialisation.
    seed: int = 0
    # Rows per block of the within-cluster similarity matrix (block x cluster x 4 B of memory).
    block_rows: int = 2048
    # Column counting a row's rule violations (null or absent = 0; "" = none, as MinHash dedup's default): the
    # quality key's first part. Set it to the same column as dedup.violations_column.
    violations_column: str = ""
    # Column with the response length (rules stage: response_chars, code points; MinHash uses bytes, which orders
    # rows the same way except on non-ASCII text): the quality key's second part.
    length_column: str = "response_chars"

    def validate(self) -> None:
        check_fields(
            self,
            "semdedup",
            cluster_size=Range(2),
            niter=Range(1),
            boundary=Range(0, 2),
            seed=Range(0),
            block_rows=Range(1),
        )


# ---------------------------------------------------------------------------------------------------------------
# Union-find over pairs above the threshold


@njit(cache=True)
def _union_block(parent, sims, rows, cols, threshold, upper_only):
    """Union rows[a] with cols[b] wherever sims[a, b] >= threshold (b > a offset when upper_only)."""
    n_pairs = 0
    for a in range(sims.shape[0]):
        start = a + 1 if upper_only else 0
        for b in range(start, sims.shape[1]):
            if sims[a, b] >= threshold:
                union(parent, rows[a], cols[b])
                n_pairs += 1
    return n_pairs


def kmeans_assign(
    x: np.ndarray, n_clusters: int, niter: int = 20, seed: int = 0, boundary: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(primary cluster per row, secondary cluster per row or -1) by spherical k-means on unit rows ``x``.

    faiss-cpu when importable (``Kmeans(spherical=True)``), else scikit-learn MiniBatchKMeans on the same vectors.
    """
    n = x.shape[0]
    k = int(max(1, min(n_clusters, n)))
    if k == 1:
        return np.zeros(n, np.int64), np.full(n, -1, np.int64)
    xf = np.ascontiguousarray(x, dtype=np.float32)
    try:
        import faiss

        km = faiss.Kmeans(
            xf.shape[1], k, niter=niter, seed=seed % 2**31, spherical=True, verbose=False, max_points_per_centroid=256
        )
        km.train(xf)
        sims, assign = km.index.search(xf, 2)
        c1, c2 = assign[:, 0].astype(np.int64), assign[:, 1].astype(np.int64)
        s1, s2 = sims[:, 0], sims[:, 1]
    except ImportError:
        from sklearn.cluster import MiniBatchKMeans

        km = MiniBatchKMeans(n_clusters=k, random_state=seed % 2**31, n_init=1, max_iter=niter, batch_size=4096).fit(
            xf
        )
        cent = km.cluster_centers_ / np.maximum(np.linalg.norm(km.cluster_centers_, axis=1, keepdims=True), 1e-12)
        s = xf @ cent.T
        top = np.argsort(-s, axis=1)[:, :2]
        c1, c2 = top[:, 0].astype(np.int64), top[:, 1].astype(np.int64)
        s1, s2 = s[np.arange(n), c1], s[np.arange(n), c2]
    second = np.where((boundary > 0) & (s2 >= s1 - boundary) & (c2 != c1), c2, -1)
    return c1, second


def semantic_duplicates(
    emb: np.ndarray,
    threshold: float,
    order_rank: np.ndarray | None = None,
    cluster_size: int = 500,
    niter: int = 20,
    boundary: float = 0.05,
    seed: int = 0,
    block_rows: int = 2048,
) -> dict[str, np.ndarray | int]:
    """Duplicate groups of rows of ``emb`` ((n, d), unit rows, any float dtype).

    ``order_rank``: the quality key as a rank per row (lower = better keeper; default: row order).
    Returns ``keeper`` (index of the row kept for each row's group; itself for keepers and singletons),
    ``duplicate`` (bool: not the keeper of a group of >= 2), ``group`` (component root), ``sim_to_keeper``
    (float32 cosine to the keeper, 1 for keepers), and ``pairs`` (pairs at or above the threshold, with repeats
    when a pair meets in two clusters).
    """
    n = emb.shape[0]
    rank = np.arange(n) if order_rank is None else np.asarray(order_rank)
    parent = np.arange(n, dtype=np.int64)
    pairs = 0
    if n >= 2:
        c1, c2 = kmeans_assign(emb, math.ceil(n / max(1, cluster_size)), niter, seed, boundary)
        members_rows = np.concatenate([np.arange(n), np.flatnonzero(c2 >= 0)])
        members_cl = np.concatenate([c1, c2[c2 >= 0]])
        order = np.argsort(members_cl, kind="stable")
        members_rows, members_cl = members_rows[order], members_cl[order]
        bounds = np.flatnonzero(np.diff(members_cl)) + 1
        for idx in np.split(members_rows, bounds):
            if len(idx) < 2:
                continue
            x = np.ascontiguousarray(emb[idx], dtype=np.float32)
            for s in range(0, len(idx), block_rows):
                blk = x[s : s + block_rows]
                # Columns from s on only: pairs (a, b) with b < s were seen by an earlier block.
                sims = blk @ x[s:].T
                pairs += _union_block(parent, sims, idx[s : s + block_rows], idx[s:], np.float32(threshold), True)
    roots = all_roots(parent)
    # Keeper of each component: the row with the lowest rank.
    keeper = np.arange(n, dtype=np.int64)
    if n:
        by = np.lexsort((rank, roots))  # grouped by root, best rank first
        first = np.ones(n, bool)
        first[1:] = roots[by][1:] != roots[by][:-1]
        best_of_root = np.empty(n, np.int64)
        best_of_root[roots[by][first]] = by[first]
        keeper = best_of_root[roots]
    duplicate = keeper != np.arange(n)
    sim = np.ones(n, np.float32)
    d = np.flatnonzero(duplicate)
    if len(d):
        a = np.asarray(emb[d], np.float32)
        b = np.asarray(emb[keeper[d]], np.float32)
        sim[d] = (a * b).sum(1)
    return {"keeper": keeper, "duplicate": duplicate, "group": roots, "sim_to_keeper": sim, "pairs": int(pairs)}


def quality_rank(violations: np.ndarray, length: np.ndarray, shard: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Rank per row under the dedup quality key: fewest violations, longer response, earliest (shard, row)."""
    order = np.lexsort((row, shard, -np.asarray(length, np.int64), np.asarray(violations, np.int64)))
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return rank


@register(
    name="semantic_dedup", kind="global", section="semdedup", config=SemDedupConfig, order=130,
    enabled=lambda sec, cfg: sec.enabled, requires=("embed",),
    options=[
        Option("--semdedup", "enabled", "mark semantic near duplicates (embedding cosine; off by default, see "
               "docs/EMBED.md)", type=None, value=True),
        Option("--semdedup-threshold", "threshold", "cosine for semantic duplicates (default: -1 = calibrated per "
               "tier: 0.95 MiniLM, 0.99 static)", float, allowed=Range(0, 1, lo_open=True, also=(-1,))),
    ],
)  # fmt: skip
class SemDedup(GlobalStage):
    """Global stage: ``semantic_duplicate`` verdicts with ``duplicate_of`` and ``detail`` (cosine to the keeper).

    Reads ``id``, ``embedding`` and the quality-key columns of rows still kept (never the text). Stats:
    ``semantic_duplicate`` (rows marked), ``groups`` (groups of >= 2), ``pairs`` (pairs >= threshold),
    ``threshold``, ``clusters``.
    """

    def __init__(self, config: SemDedupConfig | None = None):
        super().__init__(config or SemDedupConfig())

    def threshold_for(self, embedder: str) -> float:
        """The configured threshold, or the calibrated one for the tier of the (resolved) embedder choice."""
        t = self.config.threshold
        return float(t) if t > 0 else DEFAULT_THRESHOLDS[embed_tier(embedder)]

    def run(self, ctx) -> pl.DataFrame | None:
        cfg = self.config
        if not cfg.enabled:
            return None
        cols = ["id", "embedding"] + [c for c in (cfg.violations_column, cfg.length_column) if c]
        df = ctx.frame(cols, kept_only=True, where=pl.col("embedding").is_not_null())
        if df.height < 2:
            return None
        threshold = self.threshold_for(ctx.config.embed.embedder)
        emb = df["embedding"].to_numpy()
        zeros = np.zeros(df.height, np.int64)

        def column(name: str) -> np.ndarray:
            if not name or name not in df.columns:
                return zeros
            return df[name].cast(pl.Int64, strict=False).fill_null(0).to_numpy()

        viol, length = column(cfg.violations_column), column(cfg.length_column)
        rank = quality_rank(viol, length, df["_shard"].to_numpy(), df["row"].to_numpy())
        res = semantic_duplicates(
            emb, threshold, rank, cfg.cluster_size, cfg.niter, cfg.boundary, cfg.seed, cfg.block_rows
        )
        dup = res["duplicate"]
        self.stats.update(
            semantic_duplicate=int(dup.sum()),
            groups=len(np.unique(res["keeper"][dup])),
            pairs=res["pairs"],
            threshold=threshold,
            clusters=math.ceil(df.height / max(1, cfg.cluster_size)),
        )
        if not dup.any():
            return None
        ids = df["id"].to_numpy()
        d = np.flatnonzero(dup)
        return pl.DataFrame(
            {
                "_shard": df["_shard"].to_numpy()[d],
                "row": df["row"].to_numpy()[d],
                "sim": res["sim_to_keeper"][d],
                "duplicate_of": ids[res["keeper"][d]],
            }
        ).select(
            "_shard",
            "row",
            pl.lit(SEMANTIC_DUPLICATE).alias("verdict"),
            pl.format("cosine {} to {}", pl.col("sim").round(3), pl.col("duplicate_of")).alias("detail"),
            pl.col("duplicate_of").cast(pl.String),
        )
