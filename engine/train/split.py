"""Train / validation / test splits of a run's kept rows in which no semantic neighbourhood crosses splits.

**Groups.** Two kept rows must share a split when
- their embeddings (the embed stage's ``embedding`` column, unit vectors) have cosine >= ``threshold``, or
- they share a ``minhash_cluster`` (near-duplicate text), a ``content_hash`` (the same prompt + response) or the
  same non-empty prompt (one question with two answers: the test question would have been trained on).
Groups are the connected components of that graph (union-find over the pairs), and whole groups are assigned to
splits. So a pair at cosine >= ``threshold`` never crosses splits: exactly so when the search is exact, the
default up to ``exact_max_rows`` kept rows. MinHash clusters alone are not enough: dedup leaves at most one kept
row per cluster, so "no MinHash cluster crosses splits" holds for any split while paraphrases still cross.

**Search.** Every pair at cosine >= threshold (a radius search, not top-k: a top-k graph misses edges inside dense
regions where a row has more than k neighbours above the threshold), with faiss, in blocks of ``block_rows``
queries. Up to ``exact_max_rows`` rows (50,000): ``IndexFlatIP``, exact brute force, n^2 x d multiply-adds
(alpaca, 10,000 MiniLM rows: 4 s on this project's shared 2-core box, so ~100 s at 50,000). Above:
``IndexIVFScalarQuantizer`` (fp16 codes; nlist = 4 sqrt(n) lists, at most n / 39; ``nprobe`` 16 probed), which can
miss a pair whose rows fall in lists not probed: on the same alpaca rows at 0.85 it found all 684 pairs with 256
lists and nprobe 4; on 20,000 random 64-d rows with planted pairs, 99.8% at nlist 565 / nprobe 8, 10x faster than
exact. The manifest then says ``exact: false`` and the cross-split check below measures what leaked.

**Threshold** (cosine). Default per embedder tier (the run manifest's ``resolved.embed.tier``), calibrated on
/work/shared/data (MiniLM over prompt + response as the embed stage does; exact components; pairs read by eye):
- encoder (MiniLM): **0.85**. Semantic dedup removes pairs at >= 0.95 (engine/stages/semdedup.py). For a split the
  question is what leaks, and much more does: on alpaca_52k (first 10,000 rows) the pairs read in 0.85-0.90 were
  the same task reworded with an equivalent answer ("Name 5 famous composers from the Baroque era" / "Name three
  composers of the Baroque period"; two Fibonacci printers; "five items for a camping trip" / "10 items for an
  outdoor camping trip"), a few one topic ("a use case for recommender systems" / "how a recommender system
  works"); on financial_phrasebank near-copies of one report (0.865, 0.883) and one template with other figures
  and usually the same label; on gsm8k (first 3,000) one problem template with other numbers ("Ray has 95 cents in
  nickels..." / "Ray has 175 cents in nickels..."), GSM8K's known near-copies. Grouping a same-topic pair costs
  only group size; letting a paraphrase cross inflates the test score. Below 0.85 chaining grows fast. Rows in
  groups of >= 2 / largest group:

  | MiniLM t | alpaca 10,000 | financial_phrasebank 4,846 | gsm8k 3,000 | demo corpus 1,990 kept |
  |---|---|---|---|---|
  | 0.80 | 12.7% / 53 | 20.0% / 253 | 5.1% / 9 | 76% / 63 |
  | 0.85 | 6.6% / 18 | 14.6% / 140 | 1.0% / 3 | 22% / 47 |
  | 0.90 | 2.4% / 13 | 9.7% / 45 | 0.5% / 2 | 0.7% / 4 |
  | 0.95 | 0.3% / 4 | 5.1% / 8 | 0.4% / 2 | 0% / 1 |

  (the 140-row financial_phrasebank component at 0.85 is over the default cap of 1% and is broken up, below).
- static tier (model2vec-style bag of weighted tokens: lexical, not semantic): **0.90**. Against MiniLM >= 0.85
  pairs as reference, static pairs at 0.90 have recall 0.38 / 0.45 and precision 0.24 / 0.69 (alpaca /
  financial_phrasebank); at 0.95 recall falls to 0.03 / 0.11, at 0.85 alpaca chains into one 708-row (7%) group.
  Static vectors miss paraphrases whatever the threshold: embed with the encoder where the budget allows.

**Giant components (chaining).** a~b~c joins a and c even when cos(a, c) is low, and at a low threshold or on a
templated corpus one component can swallow a large part of the corpus, which would then go to one split whole.
A component larger than ``max_group`` x kept rows (at least ``min_group_cap`` rows) is detected and broken up by
raising the threshold for its rows only: its rows are re-clustered at threshold + ``cap_step``, + 2 ``cap_step``,
... (each piece that is still too big is re-clustered one step higher) up to cosine 0.9999; what is still too big
then (identical vectors, or must-link text groups) is cut into chunks of the cap in a seeded order. Pairs inside
such a component may then cross splits at a cosine below the raised threshold; the manifest lists every capped
component (rows, pieces, the highest threshold used) and each row's group threshold is in ``assignment.parquet``.

**Assignment.** Groups are visited largest first (ties in a seeded order: a hash of (seed, the group's smallest
id-hash), independent of row order and platform); each goes to the split furthest below its target, measured
per label: a group with label counts c_l goes to the split s maximising sum_l c_l (T_sl - F_sl) / T_sl, where
T_sl = fraction_s x rows of label l and F_sl what split s holds so far (group-aware stratification; a null label is
a stratum of its own, no label column = one stratum). Ties go to a seeded choice weighted by the fractions. A zero
fraction gets nothing. With singletons only, every label's targets are met up to rounding; with groups, within
about the largest group's size.

**Check.** Up to ``check_sample`` kept rows (seeded sample, 10,000) get their exact nearest neighbour in the other
splits (blocked numpy matrix products against all kept rows: sample x n x d multiply-adds, bounded by
``check_max_work``, which shrinks the sample on very large runs): the manifest reports the largest such cosine and
its pair, which is below the threshold by construction when the search is exact and no component was capped
(``guaranteed``; otherwise ``max_cosine_between_components`` leaves out pairs inside a capped component).

**No embeddings** (a run with ``--embedder none``): groups are MinHash clusters + exact (content hash, same prompt)
groups only; the manifest says so (``grouping.method = "minhash+exact"``) and there is no cosine check.

**Memory.** The kept rows' embeddings as float16 (n x d x 2 B: 768 MB per million 384-d rows; 2x that while the
parts are concatenated), plus the faiss index (exact: n x d x 4 B, 1.5 GB per million; IVF: n x d x 2 B and a
float32 training sample of 64 x nlist rows, 390 MB at a million rows), plus per query block the pairs found (12 B
each: block_rows x neighbours above the threshold), plus O(n) small arrays (union-find parents, groups, keys,
labels, ids). Never an n x n matrix: the check's tiles are 2,048 x 8,192 float32 (67 MB, a few alive at once).
Measured: 100,000 random 384-d rows with 5,000 planted pairs, from a frame: 854 MB peak RSS, 116 s on the shared
2-core box (IVF, 1,265 lists, nprobe 16: all 5,000 pairs joined, 3 found from one side only; the 10,000-row check
is 3.8e11 multiply-adds of the time).

**Outputs** (``out_dir``): ``<split>.parquet`` per split (the kept rows, every column, as before),
``assignment.parquet`` (id, split, group, group_rows, group_threshold) and ``manifest.json`` (rows per split and
per label per split, the threshold and where it came from, the search, groups: count, sizes, largest, capped
components, and the cross-split check). Deterministic per seed.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from engine.registry import Range
from kernels.strings import combine_hashes, hash_strings
from kernels.union_find import all_roots, union_pairs

SPLIT_NAMES = ("train", "val", "test")
# Calibrated cosine thresholds per embedder tier (module docstring).
DEFAULT_THRESHOLDS = {"encoder": 0.85, "static": 0.90}
NULL_LABEL = "(none)"
# Labels listed per split in the manifest (the rest are summed under "(other)").
MANIFEST_LABELS = 50
_MAX_U64 = np.uint64((1 << 64) - 1)


@dataclass
class SplitConfig:
    # Cosine at or above which two rows share a group; -1 = the calibrated default for the run's embedder tier
    # (0.85 encoder / unknown, 0.90 static).
    threshold: float = -1.0
    # Largest group as a fraction of the kept rows (at least min_group_cap rows); a bigger component is broken up by
    # raising the threshold for its rows (module docstring). 1 = never cap. 0.025 = a quarter of a 10% split: a
    # bigger group could not land in the smallest split without overshooting its target by a quarter.
    max_group: float = 0.025
    # Floor of the cap in rows, so that a tiny run does not break up small paraphrase groups.
    min_group_cap: int = 32
    # Threshold step when breaking up a giant component.
    cap_step: float = 0.01
    # auto | exact | ivf: the pair search. auto = exact up to exact_max_rows kept rows, else ivf.
    search: str = "auto"
    # Largest number of rows searched exactly under search = auto (n^2 x d work).
    exact_max_rows: int = 50_000
    # IVF inverted lists; -1 = 4 sqrt(rows).
    nlist: int = -1
    # IVF lists probed per query (recall against time).
    nprobe: int = 16
    # Queries per range-search block (memory: block_rows x neighbours above the threshold x 12 B).
    block_rows: int = 4096
    # Rows sampled for the cross-split nearest-neighbour check; 0 = no check. Work: sample x rows x dim.
    check_sample: int = 10_000
    # Bound on the check's work in multiply-adds (sample x rows x dim): the sample shrinks (to >= 1,000 rows) where
    # check_sample rows would cost more. 4e12 is ~1 minute at 70 GFLOP/s: 10,000 rows x 1M x 384 = 3.8e12.
    check_max_work: float = 4e12
    # Same non-empty prompt = same group.
    same_prompt: bool = True


# What the fields that cli.py exposes may hold (checked before any work, engine.registry.expected).
SPLIT_ALLOWED = {
    "threshold": Range(0, 1, lo_open=True, also=(-1,)),
    "max_group": Range(0, 1, lo_open=True),
    "search": ("auto", "exact", "ivf"),
    "check_sample": Range(0),
}


# ---------------------------------------------------------------------------------------------------------------
# Pairs at cosine >= threshold


def _radius(threshold: float) -> float:
    # faiss keeps inner products strictly above the radius; the float32 just below t makes it ">= t".
    return float(np.nextafter(np.float32(threshold), np.float32(-2)))


def _search_mode(n: int, cfg: SplitConfig) -> str:
    if cfg.search not in ("auto", "exact", "ivf"):
        raise ValueError(f"split search {cfg.search!r}: expected auto, exact or ivf")
    if cfg.search != "auto":
        return cfg.search
    return "exact" if n <= cfg.exact_max_rows else "ivf"


def _build_index(emb: np.ndarray, rows: np.ndarray, mode: str, cfg: SplitConfig, seed: int):
    import faiss

    d = emb.shape[1]
    n = rows.size
    chunk = 65536  # float16 -> float32 in chunks: no full float32 copy besides the index's own storage
    if mode == "exact" or n < 1024:
        index = faiss.IndexFlatIP(d)
        info = {"search": "exact", "index": "IndexFlatIP"}
    else:
        nlist = cfg.nlist if cfg.nlist > 0 else max(1, round(4 * math.sqrt(n)))
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)  # fmt: skip
        rng = np.random.default_rng(seed)
        # 64 training points per list (faiss warns under 39): the float32 training copy is 64 x nlist x d x 4 B.
        train = rows if n <= 64 * nlist else np.sort(rng.choice(rows, 64 * nlist, replace=False))
        index.cp.seed = int(seed) & 0x7FFFFFFF
        index.train(np.ascontiguousarray(emb[train], dtype=np.float32))
        index.nprobe = min(cfg.nprobe, nlist)
        info = {"search": "ivf", "index": "IndexIVFScalarQuantizer(fp16)", "nlist": nlist, "nprobe": index.nprobe}
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(emb[rows[s : s + chunk]], dtype=np.float32))
    info["exact"] = info["search"] == "exact"
    return index, info


def _pairs(emb: np.ndarray, rows: np.ndarray, threshold: float, cfg: SplitConfig, seed: int, info: dict):
    """Yield (a, b) global row-index arrays: every pair among ``rows`` at cosine >= threshold, self pairs dropped.
    Exact search finds each pair from both sides and keeps a < b (``info["pairs"]`` = the pairs); IVF may find a
    pair from one side only, so both directions are kept (a pair found from both sides counts twice)."""
    index, meta = _build_index(emb, rows, _search_mode(rows.size, cfg), cfg, seed)
    info.update(meta)
    radius = _radius(threshold)
    n_pairs = 0
    for s in range(0, rows.size, cfg.block_rows):
        q = rows[s : s + cfg.block_rows]
        lims, _, nbr = index.range_search(np.ascontiguousarray(emb[q], dtype=np.float32), radius)
        a = np.repeat(np.arange(s, s + q.size, dtype=np.int64), np.diff(lims).astype(np.int64))
        keep = a < nbr if meta["exact"] else a != nbr
        a, b = a[keep], nbr[keep]
        n_pairs += a.size
        yield rows[a], rows[b]
    info["pairs"] = n_pairs


def _equal_key_pairs(keys: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(a, b): consecutive rows of each run of equal keys among the valid ones (a chain links the whole run)."""
    idx = np.flatnonzero(valid)
    if idx.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    order = idx[np.argsort(keys[idx], kind="stable")]
    same = keys[order[1:]] == keys[order[:-1]]
    return order[:-1][same].astype(np.int64), order[1:][same].astype(np.int64)


def _fresh_parent(parent_size: int):
    return np.arange(parent_size, dtype=np.int64)


def group_rows(
    emb: np.ndarray | None,
    valid: np.ndarray | None,
    must_a: np.ndarray,
    must_b: np.ndarray,
    threshold: float,
    id_hash: np.ndarray,
    cfg: SplitConfig,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Groups of n rows: (group root per row, component root before capping, group threshold per row, info).

    ``emb`` (n, d) unit vectors (float16 is enough) with ``valid`` rows searched; ``must_a``/``must_b`` pairs are
    joined whatever their cosine. A group's root is its smallest row index. ``group threshold`` is ``threshold``,
    the raised threshold for pieces of a capped component, or NaN for pieces cut by the final chunking."""
    n = id_hash.size
    parent = _fresh_parent(n)
    union_pairs(parent, must_a, must_b)
    info: dict = {"must_link_pairs": int(must_a.size)}
    rows = np.flatnonzero(valid) if emb is not None else np.zeros(0, np.int64)
    if rows.size > 1:
        search: dict = {}
        for a, b in _pairs(emb, rows, threshold, cfg, seed, search):
            union_pairs(parent, a, b)
        info["search"] = search
    comp = all_roots(parent)
    group = comp.copy()
    group_t = np.full(n, threshold, np.float64)
    cap = max(int(cfg.min_group_cap), math.ceil(cfg.max_group * n))
    info["cap_rows"] = cap
    roots, sizes = np.unique(comp, return_counts=True)
    giants = roots[sizes > cap]
    capped = []
    if giants.size:
        # Must-link pairs by component, so that each piece's re-clustering keeps them.
        in_giant = np.isin(comp, giants)
        keep = in_giant[must_a]
        ga, gb = must_a[keep], must_b[keep]
        for r in giants[np.argsort(-sizes[sizes > cap], kind="stable")]:
            members = np.flatnonzero(comp == r)
            capped.append(_break_up(members, ga, gb, emb, valid, threshold, cap, id_hash, cfg, seed, group, group_t))
    info["capped_components"] = capped
    return group, comp, group_t, info


# The last threshold a giant component is re-clustered at (cosine 1 - 1e-4: identical up to float16 rounding).
LAST_LEVEL = 0.9999


def _next_level(t: float, step: float) -> float:
    """threshold + step, clamped once to LAST_LEVEL; past LAST_LEVEL: inf (cut into chunks)."""
    if t >= LAST_LEVEL - 1e-9:
        return math.inf
    return min(round(t + step, 6), LAST_LEVEL)


def _break_up(members, ga, gb, emb, valid, threshold, cap, id_hash, cfg, seed, group, group_t) -> dict:
    """Re-cluster one giant component at rising thresholds until every piece has <= cap rows (writes group and
    group_t of its rows)."""
    pieces = 0
    top = threshold
    chunked = 0
    stack = [(members, _next_level(threshold, cfg.cap_step))]
    while stack:
        mem, t = stack.pop()
        if t == math.inf:
            # Nothing left to raise: identical vectors or must-link text groups. Cut in a seeded order.
            order = mem[np.lexsort((mem, combine_hashes(np.full(mem.size, np.uint64(seed), np.uint64), id_hash[mem])))]
            for s in range(0, order.size, cap):
                piece = order[s : s + cap]
                group[piece] = piece.min()
                group_t[piece] = np.nan
                pieces += 1
                chunked += piece.size
            continue
        top = max(top, t)
        mem = np.sort(mem)
        parent = _fresh_parent(mem.size)
        inside = np.isin(ga, mem) & np.isin(gb, mem)
        if inside.any():
            union_pairs(parent, np.searchsorted(mem, ga[inside]), np.searchsorted(mem, gb[inside]))
        if emb is not None:
            rows = mem[valid[mem]]
            if rows.size > 1:
                for a, b in _pairs(emb, rows, t, cfg, seed, {}):
                    union_pairs(parent, np.searchsorted(mem, a), np.searchsorted(mem, b))
        local_root = all_roots(parent)
        _, inv, sizes = np.unique(local_root, return_inverse=True, return_counts=True)
        for k in np.flatnonzero(sizes > cap):
            stack.append((mem[inv == k], _next_level(t, cfg.cap_step)))
        small = sizes[inv] <= cap
        group[mem[small]] = mem[local_root[small]]
        group_t[mem[small]] = t
        pieces += int((sizes <= cap).sum())
    return {"rows": int(members.size), "pieces": pieces, "max_threshold": round(top, 6), "rows_chunked": chunked}


# ---------------------------------------------------------------------------------------------------------------
# Assignment of groups to splits


@njit(cache=True)
def _greedy_assign(order, ptr, lab, cnt, target, weight, u):
    """Split per group: visit groups in ``order``; each goes to the split maximising its count-weighted relative
    per-label deficit sum_l c_l (T_sl - F_sl) / T_sl / size; ties to a choice by u[g] weighted by ``weight``."""
    n_splits = target.shape[0]
    filled = np.zeros(target.shape, np.float64)
    out = np.zeros(ptr.shape[0] - 1, np.int8)
    need = np.empty(n_splits, np.float64)
    for gi in order:
        size = 0.0
        for k in range(ptr[gi], ptr[gi + 1]):
            size += cnt[k]
        best = -np.inf
        for s in range(n_splits):
            if weight[s] <= 0:
                need[s] = -np.inf
                continue
            v = 0.0
            for k in range(ptr[gi], ptr[gi + 1]):
                t = target[s, lab[k]]
                v += cnt[k] * (t - filled[s, lab[k]]) / t
            need[s] = v / size
            best = max(best, need[s])
        total = 0.0
        for s in range(n_splits):
            if need[s] >= best - 1e-9:
                total += weight[s]
        x = u[gi] * total
        chosen = 0
        for s in range(n_splits):
            if need[s] >= best - 1e-9:
                chosen = s
                x -= weight[s]
                if x < 0:
                    break
        out[gi] = chosen
        for k in range(ptr[gi], ptr[gi + 1]):
            filled[chosen, lab[k]] += cnt[k]
    return out


def _check_fractions(fractions) -> np.ndarray:
    fr = np.asarray(fractions, np.float64)
    if fr.ndim != 1 or fr.size < 1 or (fr < 0).any() or not np.isclose(fr.sum(), 1.0):
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    return fr


def assign_groups(
    group: np.ndarray,
    group_key: np.ndarray,
    label_codes: np.ndarray | None,
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> np.ndarray:
    """int8 split per row. ``group`` (n,) int64 group index 0..G-1 per row; ``group_key`` (G,) uint64 keys that
    do not depend on row order (they seed the visiting order); ``label_codes`` (n,) int64 0..L-1 or None."""
    fr = _check_fractions(fractions)
    n = group.size
    if n == 0:
        return np.zeros(0, np.int8)
    n_groups = group_key.size
    lab = np.zeros(n, np.int64) if label_codes is None else np.asarray(label_codes, np.int64)
    n_labels = int(lab.max()) + 1
    pair = group.astype(np.int64) * n_labels + lab
    uniq, cnt = np.unique(pair, return_counts=True)  # sorted by group, then label: a CSR of label counts per group
    g_of = uniq // n_labels
    ptr = np.searchsorted(g_of, np.arange(n_groups + 1)).astype(np.int64)
    sizes = np.bincount(group, minlength=n_groups)
    target = fr[:, None] * np.bincount(lab, minlength=n_labels)[None, :].astype(np.float64)
    h = combine_hashes(np.full(n_groups, np.uint64(seed & ((1 << 64) - 1)), np.uint64), group_key)
    order = np.lexsort((group_key, h, -sizes)).astype(np.int64)  # largest first, then a seeded order
    u = (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    per_group = _greedy_assign(order, ptr, (uniq % n_labels).astype(np.int64), cnt.astype(np.float64), target, fr, u)
    return per_group[group]


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


def _label_codes(labels) -> tuple[np.ndarray | None, list[str]]:
    """(int64 code per row in sorted label order, the labels) or (None, []) when no row has a label."""
    if labels is None:
        return None, []
    s = labels if isinstance(labels, pl.Series) else pl.Series("label", labels, strict=False)
    if s.null_count() == s.len():
        return None, []
    s = s.cast(pl.String).fill_null(NULL_LABEL)
    codes = (s.rank("dense").cast(pl.Int64) - 1).to_numpy()  # codes in sorted label order
    return np.asarray(codes, np.int64), s.unique().sort().to_list()


def assign_splits(
    ids: np.ndarray | pa.Array,
    clusters: np.ndarray | pa.Array | None,
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 0,
    labels=None,
) -> np.ndarray:
    """int8 split index per row (0 = train, 1 = val, 2 = test for three fractions); clusters never cross splits;
    stratified by ``labels`` when given (nulls are a stratum of their own)."""
    _check_fractions(fractions)
    keys = _cluster_keys(ids, clusters)
    if keys.size == 0:
        return np.zeros(0, np.int8)
    uniq, inverse = np.unique(keys, return_inverse=True)
    codes, _ = _label_codes(labels)
    return assign_groups(inverse.astype(np.int64), uniq, codes, fractions, seed)


# ---------------------------------------------------------------------------------------------------------------
# Cross-split check


def cross_split_check(
    emb: np.ndarray,
    valid: np.ndarray,
    split: np.ndarray,
    component: np.ndarray,
    sample: int,
    seed: int = 0,
    query_rows: int = 2048,
    db_rows: int = 8192,
) -> dict:
    """Exact nearest neighbour in another split of up to ``sample`` valid rows (blocked: tiles of query_rows x
    db_rows float32, never n x n). Returns the largest cosine and its pair (row indices), the same over pairs in
    different components (capping aside, the guarantee), and every sampled row's value (``nn``)."""
    v = np.flatnonzero(valid)
    if sample <= 0 or v.size < 2 or np.unique(split[v]).size < 2:
        return {"sample_rows": 0}
    rng = np.random.default_rng(seed)
    q = v if v.size <= sample else np.sort(rng.choice(v, sample, replace=False))
    best = np.full(q.size, -np.inf, np.float32)
    best_j = np.full(q.size, -1, np.int64)
    best_out = np.full(q.size, -np.inf, np.float32)
    qs_split, qs_comp = split[q], component[q]
    queries = [
        np.ascontiguousarray(emb[q[s : s + query_rows]], dtype=np.float32) for s in range(0, q.size, query_rows)
    ]
    for ds in range(0, v.size, db_rows):
        di = v[ds : ds + db_rows]
        x = np.ascontiguousarray(emb[di], dtype=np.float32).T
        d_split, d_comp = split[di], component[di]
        for k, qm in enumerate(queries):
            s0 = k * query_rows
            sl = slice(s0, s0 + qm.shape[0])
            sims = qm @ x
            sims[qs_split[sl, None] == d_split[None, :]] = -np.inf
            j = np.argmax(sims, axis=1)
            m = sims[np.arange(sims.shape[0]), j]
            better = m > best[sl]
            best[sl] = np.where(better, m, best[sl])
            best_j[sl] = np.where(better, di[j], best_j[sl])
            sims[qs_comp[sl, None] == d_comp[None, :]] = -np.inf
            best_out[sl] = np.maximum(best_out[sl], sims.max(axis=1))
    i = int(np.argmax(best))
    return {
        "sample_rows": int(q.size),
        "max_cosine": float(best[i]),
        "pair": (int(q[i]), int(best_j[i])),
        "max_cosine_between_components": float(best_out.max()),
        "nn": best,
        "rows": q,
    }


# ---------------------------------------------------------------------------------------------------------------
# A run's kept rows


def _embedding_matrix(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """((n, d) float16 unit rows, valid mask) from a fixed-size or variable list column (nulls / zero rows invalid)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks else pa.array([], col.type)
    n = len(col)
    valid = col.is_valid().to_numpy(zero_copy_only=False).astype(bool)
    if pa.types.is_fixed_size_list(col.type):
        d = col.type.list_size
    else:
        lengths = col.value_lengths().to_numpy(zero_copy_only=False)
        ok = lengths[valid] if valid.any() else np.zeros(0)
        d = int(ok.max()) if ok.size else 0
        if ok.size and (ok != d).any():
            raise ValueError(f"embedding column holds vectors of {sorted(set(ok.tolist()))[:5]} dimensions")
    out = np.zeros((n, d), np.float16)
    if valid.any() and d:
        vals = col.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False).astype(np.float32)
        m = vals.reshape(-1, d)
        norms = np.linalg.norm(m, axis=1)
        good = norms > 0
        m[good] /= norms[good, None]
        out[valid] = m.astype(np.float16)
        valid = valid.copy()
        valid[np.flatnonzero(valid)[~good]] = False
    return out, valid


_KEY_COLUMNS = ("id", "row", "verdict", "label", "minhash_cluster", "content_hash", "prompt", "embedding")


def _key_frame(t: pa.Table) -> tuple[pl.DataFrame, np.ndarray | None, np.ndarray | None]:
    """(id, row, label, minhash_cluster, content_hash, prompt_hash frame, embeddings, valid) of one table's rows."""
    cols: dict = {"id": t.column("id").cast(pa.large_string())}
    if "row" in t.column_names:
        cols["row"] = t.column("row")
    for c in ("label", "minhash_cluster", "content_hash"):
        if c in t.column_names:
            cols[c] = t.column(c)
    if "prompt" in t.column_names:
        p = t.column("prompt").cast(pa.large_string())
        h = hash_strings(p, seed=11)
        empty = np.asarray(pc.fill_null(pc.binary_length(p), 0).to_numpy(zero_copy_only=False)) == 0
        cols["prompt_hash"] = pa.array(h, mask=empty)
    df = pl.from_arrow(pa.table(cols))
    if "embedding" in t.column_names:
        emb, valid = _embedding_matrix(t.column("embedding"))
        return df, emb, valid
    return df, None, None


def _must_links(df: pl.DataFrame, cfg: SplitConfig) -> tuple[np.ndarray, np.ndarray, list[str]]:
    aa, bb, used = [], [], []
    specs = [("minhash_cluster", "minhash_cluster"), ("content_hash", "content_hash")]
    if cfg.same_prompt:
        specs.append(("prompt_hash", "same prompt"))
    for col, name in specs:
        if col not in df.columns:
            continue
        s = df[col]
        valid = ~s.is_null().to_numpy()
        if col == "minhash_cluster":
            valid &= s.fill_null(-1).cast(pl.Int64, strict=False).fill_null(-1).to_numpy() >= 0
        keys = s.fill_null(0).cast(pl.UInt64, strict=False).fill_null(0).to_numpy()
        a, b = _equal_key_pairs(keys, valid)
        aa.append(a)
        bb.append(b)
        used.append(name)
    if not aa:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), used
    return np.concatenate(aa), np.concatenate(bb), used


def _read_rows(scores, only_kept: bool):
    """Kept rows of a frame or a scores/ folder (or one Parquet file): (key frame with _file, embeddings, valid,
    files). From a folder only the key columns are read, part by part, filtered to kept rows before gathering."""
    import pyarrow.parquet as pq

    if isinstance(scores, pl.DataFrame):
        df = scores.filter(pl.col("verdict") == "kept") if only_kept and "verdict" in scores.columns else scores
        t = df.select([c for c in _KEY_COLUMNS if c in df.columns]).to_arrow()
        keys, emb, valid = _key_frame(t)
        return keys.with_columns(pl.lit(0).alias("_file")), emb, valid, []
    p = Path(scores)
    files = sorted(p.glob("part-*.parquet")) if p.is_dir() else [p]
    frames, embs, valids = [], [], []
    any_emb = any("embedding" in pq.read_schema(f).names for f in files)
    for i, f in enumerate(files):
        avail = pq.read_schema(f).names
        t = pq.read_table(f, columns=[c for c in _KEY_COLUMNS if c in avail])
        if only_kept and "verdict" in avail:
            t = t.filter(pc.equal(t.column("verdict"), "kept"))
        keys, emb, valid = _key_frame(t)
        frames.append(keys.with_columns(pl.lit(i).alias("_file")))
        if any_emb:
            if emb is None:
                emb, valid = None, np.zeros(t.num_rows, bool)
            embs.append(emb)
            valids.append(valid)
    df = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame({"id": [], "_file": []})
    if not any_emb:
        return df, None, None, files
    dims = {e.shape[1] for e in embs if e is not None and e.size}
    if len(dims) > 1:
        raise ValueError(f"{p}: parts hold embeddings of different dimensions {sorted(dims)}")
    d = dims.pop() if dims else 0
    emb = np.concatenate([e if e is not None and e.shape[1] == d else np.zeros((len(v), d), np.float16)
                          for e, v in zip(embs, valids)]) if embs else np.zeros((0, d), np.float16)  # fmt: skip
    return df, emb, np.concatenate(valids) if valids else np.zeros(0, bool), files


def _run_tier(scores) -> tuple[str | None, str | None]:
    """(embedder tier, embedder choice) from the run's manifest.json beside scores/, if there is one."""
    if isinstance(scores, pl.DataFrame):
        return None, None
    p = Path(scores)
    for m in (p.parent / "manifest.json", p / "manifest.json"):
        if m.is_file():
            try:
                emb = json.loads(m.read_text()).get("resolved", {}).get("embed", {}) or {}
            except (OSError, ValueError):
                return None, None
            return emb.get("tier"), emb.get("choice")
    return None, None


def _size_histogram(sizes: np.ndarray) -> dict[str, int]:
    bins = [(1, 1), (2, 2), (3, 5), (6, 10), (11, 100), (101, 1000), (1001, None)]
    out = {}
    for lo, hi in bins:
        m = (sizes >= lo) & (sizes <= hi) if hi is not None else sizes >= lo
        if m.any():
            out[str(lo) if lo == hi else (f"{lo}-{hi}" if hi else f"{lo}+")] = int(m.sum())
    return out


def _label_table(split: np.ndarray, codes: np.ndarray | None, labels: list[str], names) -> dict:
    out = {}
    for i, name in enumerate(names):
        m = split == i
        if codes is None:
            continue
        cnt = np.bincount(codes[m], minlength=len(labels))
        top = np.argsort(-np.bincount(codes, minlength=len(labels)), kind="stable")
        row = {labels[k]: int(cnt[k]) for k in sorted(top[:MANIFEST_LABELS], key=lambda k: labels[k])}
        if len(labels) > MANIFEST_LABELS:
            row["(other)"] = int(cnt[top[MANIFEST_LABELS:]].sum())
        out[name] = row
    return out


def plan_split(
    df: pl.DataFrame,
    emb: np.ndarray | None,
    valid: np.ndarray | None,
    fractions: tuple[float, ...],
    seed: int,
    names: tuple[str, ...],
    config: SplitConfig,
    tier: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """(split per row, group index per row, group threshold per row, manifest) for the kept rows in ``df``."""
    fr = _check_fractions(fractions)
    if len(names) != fr.size:
        raise ValueError(f"{len(names)} split names for {fr.size} fractions")
    n = df.height
    cfg = config
    if cfg.threshold == -1:
        threshold = DEFAULT_THRESHOLDS.get(tier or "encoder", DEFAULT_THRESHOLDS["encoder"])
        source = f"default for the {tier} embedder tier" if tier else "default (embedder tier unknown: encoder's)"
    else:
        if not 0 < cfg.threshold <= 1:
            raise ValueError(f"split threshold {cfg.threshold}: a cosine in (0, 1], or -1 for the default")
        threshold, source = float(cfg.threshold), "option"
    if not cfg.cap_step > 0 or not 0 < cfg.max_group <= 1:
        raise ValueError(f"split cap_step {cfg.cap_step} must be > 0 and max_group {cfg.max_group} in (0, 1]")
    id_hash = hash_strings(df["id"].cast(pl.String).to_arrow().cast(pa.large_string()), seed=7)
    must_a, must_b, must_used = _must_links(df, cfg)
    has_emb = emb is not None and valid is not None and bool(valid.any())
    group_root, comp, group_t, info = group_rows(
        emb if has_emb else None, valid, must_a, must_b, threshold, id_hash, cfg, seed
    )
    roots, group = np.unique(group_root, return_inverse=True)
    group = group.astype(np.int64)
    gkey = np.full(roots.size, _MAX_U64, np.uint64)
    np.minimum.at(gkey, group, id_hash)
    codes, labels = _label_codes(df["label"] if "label" in df.columns else None)
    split = assign_groups(group, gkey, codes, tuple(fr), seed)

    sizes = np.bincount(group, minlength=roots.size) if n else np.zeros(0, np.int64)
    comp_sizes = np.unique(comp, return_counts=True)[1] if n else np.zeros(0, np.int64)
    grouping: dict = {
        "method": "embedding+minhash+exact" if has_emb else "minhash+exact",
        "must_link": must_used,
        "must_link_pairs": info["must_link_pairs"],
    }
    if has_emb:
        grouping.update(
            threshold=threshold,
            threshold_source=source,
            tier=tier,
            rows_with_embedding=int(valid.sum()),
            rows_without_embedding=int(n - valid.sum()),
            dim=int(emb.shape[1]),
            **{k: v for k, v in info.get("search", {}).items()},
        )
    else:
        what = "no kept row has an embedding"
        if emb is None:
            what = "no embedding column (run scored with --embedder none, or an older run)"
        grouping["note"] = (
            f"{what}: groups are MinHash clusters and exact / same-prompt groups only, so paraphrases may cross "
            "splits; score with an embedder to group them"
        )  # fmt: skip
    capped = info.get("capped_components", [])
    groups = {
        "count": int(roots.size),
        "singletons": int((sizes == 1).sum()),
        "rows_in_groups_of_2_or_more": int(sizes[sizes > 1].sum()),
        "largest": int(sizes.max()) if sizes.size else 0,
        "largest_before_cap": int(comp_sizes.max()) if comp_sizes.size else 0,
        "sizes": _size_histogram(sizes),
        "cap_rows": info["cap_rows"],
        "capped_count": len(capped),
        "capped_components": capped[:20],  # the largest 20
    }
    if capped:
        groups["note"] = (
            f"{len(capped)} component(s) over {info['cap_rows']} rows (chaining) were broken up by raising the "
            "threshold for their rows (max_threshold); pairs inside them may cross splits below that threshold"
        )
    manifest: dict = {
        "rows": n,
        "fractions": dict(zip(names, map(float, fr))),
        "seed": seed,
        "stratified_by_label": codes is not None,
        "grouping": grouping,
        "groups": groups,
        "splits": {name: {"rows": int((split == i).sum())} for i, name in enumerate(names)},
        "config": asdict(cfg),
    }
    for name, row in _label_table(split, codes, labels, names).items():
        manifest["splits"][name]["labels"] = row
    if has_emb and cfg.check_sample > 0:
        n_valid, dim = int(valid.sum()), max(1, emb.shape[1])
        sample = min(cfg.check_sample, max(1000, int(cfg.check_max_work // max(1, n_valid * dim))))
        chk = cross_split_check(emb, valid, split, comp, sample, seed)
        if chk["sample_rows"]:
            ids = df["id"]
            a, b = chk["pair"]
            exact = bool(info.get("search", {}).get("exact", False))
            chk_out = {
                "sample_rows": chk["sample_rows"],
                "sample_asked": cfg.check_sample,
                "exact": True,  # the sample's neighbours are searched exhaustively
                "max_cosine": round(chk["max_cosine"], 6),
                "pair": [ids[a], ids[b]],
                "rows_at_or_above_threshold": int((chk["nn"] >= threshold).sum()),
                "below_threshold": chk["max_cosine"] < threshold,
                "guaranteed": exact and not capped,
            }
            if capped:
                chk_out["max_cosine_between_components"] = round(chk["max_cosine_between_components"], 6)
            why = []
            if not exact:
                why.append("the pair search was approximate (ivf), so a pair it missed may cross")
            if capped:
                why.append("pairs inside a capped component may cross below its raised threshold "
                           "(max_cosine_between_components leaves them out)")  # fmt: skip
            chk_out["note"] = "; ".join(why) or (
                "exact search and no capped component: every pair at cosine >= threshold is inside one group, so "
                "the maximum is below the threshold by construction"
            )
            manifest["cross_split"] = chk_out
    return split, group, group_t, manifest


def split_run(
    scores: str | Path | pl.DataFrame,
    out_dir: str | Path,
    fractions: tuple[float, ...] = (0.8, 0.1, 0.1),
    seed: int = 0,
    names: tuple[str, ...] = SPLIT_NAMES,
    only_kept: bool = True,
    config: SplitConfig | None = None,
    tier: str | None = None,
) -> dict[str, int]:
    """Split a run's kept rows (``scores/`` folder, a Parquet file, or a frame) into ``out_dir/<name>.parquet``,
    with ``assignment.parquet`` and ``manifest.json`` beside them (module docstring). The embedder tier (which
    default threshold) is read from the run's manifest.json unless given. Rows are copied part by part, so the text
    is never all in memory. Returns rows per split."""
    import pyarrow.parquet as pq

    from engine.io.writers import align_table, write_json_atomic

    if len(names) != len(fractions):
        raise ValueError(f"{len(names)} split names for {len(fractions)} fractions")
    cfg = config or SplitConfig()
    run_tier, choice = _run_tier(scores)
    tier = tier or run_tier
    df, emb, valid, files = _read_rows(scores, only_kept)
    split, group, group_t, manifest = plan_split(df, emb, valid, fractions, seed, names, cfg, tier)
    if choice:
        manifest["grouping"]["embedder"] = choice
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = np.bincount(group, minlength=int(group.max()) + 1 if group.size else 0)
    name_arr = np.asarray(names, dtype=object)
    pq.write_table(
        pa.table({
            "id": df["id"].to_arrow().cast(pa.large_string()),
            "split": pa.array(name_arr[split].tolist() if split.size else [], pa.large_string()),
            "group": pa.array(group, pa.int64()),
            "group_rows": pa.array(sizes[group].astype(np.int32) if group.size else [], pa.int32()),
            "group_threshold": pa.array(group_t.astype(np.float32), pa.float32(), mask=np.isnan(group_t)),
        }),
        out / "assignment.parquet",
    )  # fmt: skip
    counts = {name: int((split == i).sum()) for i, name in enumerate(names)}

    if isinstance(scores, pl.DataFrame):
        src = scores.filter(pl.col("verdict") == "kept") if only_kept and "verdict" in scores.columns else scores
        for i, name in enumerate(names):
            src.filter(pl.Series(split == i)).write_parquet(out / f"{name}.parquet")
    else:
        df = df.with_columns(pl.Series("_split", split))
        writers: dict[str, pq.ParquetWriter] = {}
        # One schema for every split file: the union of the parts' columns (a chat shard's `messages` and an alpaca
        # shard's `instruction` both survive; rows lacking a column hold nulls).
        unified = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
        try:
            for i, f in enumerate(files):
                mine = df.filter(pl.col("_file") == i)
                if not mine.height:
                    continue
                t = pq.read_table(f)
                for s_idx, name in enumerate(names):
                    rows = mine.filter(pl.col("_split") == s_idx)["row"].to_numpy()
                    if not len(rows):
                        continue
                    part = t.filter(pc.is_in(t.column("row"), value_set=pa.array(rows)))
                    if name not in writers:
                        writers[name] = pq.ParquetWriter(out / f"{name}.parquet", unified, compression="zstd")
                    writers[name].write_table(align_table(part, unified))
        finally:
            for w in writers.values():
                w.close()
        for name in names:
            if name not in writers:
                pq.write_table(unified.empty_table(), out / f"{name}.parquet")
    write_json_atomic(out / "manifest.json", manifest)
    return counts
