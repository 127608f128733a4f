"""Selection past one machine's memory: GreeDi (Mirzasoleiman, Karbasi, Sarkar and Krause 2013, "Distributed
Submodular Maximization").

Split the candidates into P partitions, run the selector on each for k picks, then run it once more over the union of
the P * k picks for the final k. Partitions are blocks of a seeded random permutation (or, with ``contiguous``,
blocks in input order, so memory-mapped embeddings are read sequentially, one partition at a time).

Guarantees, for a monotone submodular objective such as facility location: the worst case is
(1 - 1/e)^2 / min(P, k) of the optimum; with random partitions (Barbosa, Ene, Nguyen and Ward 2015) the expected
value is at least (1 - 1/e) / 2, and in practice it is within a few percent of the centralised greedy
(bench/RESULTS.md). For k-center, two rounds of farthest point are a 4-approximation (Malkomes et al. 2015).
For facility location the final round still scores coverage of every row: each row's k nearest union rows
(engine/select/knn.py ``search_against``: cells over the union, the rows read a block at a time) form the final
graph, so the final greedy optimises the whole corpus's objective over the union's candidates (memory O(n k) for
those edges, the union's vectors, one block of rows at a time). The Ray executor runs the
partitions in parallel; here they run one after another.
"""

from __future__ import annotations

import numpy as np

from engine.select.base import Candidates, Picked, Selector
from engine.select.budget import Limits
from engine.select.facility import FacilityLocation
from engine.select.knn import search_against
from kernels.facility_greedy import reverse_csr


def partitions(n: int, parts: int, seed: int, contiguous: bool = False) -> list[np.ndarray]:
    """P sorted index arrays covering range(n)."""
    order = np.arange(n) if contiguous else np.random.default_rng(seed).permutation(n)
    return [np.sort(b) for b in np.array_split(order, parts)]


def greedi(sel: Selector, cands: Candidates, k: int, limits: Limits, parts: int, contiguous: bool = False) -> Picked:
    union: list[np.ndarray] = []
    info_parts = []
    w_all = np.ones(len(cands)) if cands.weight is None else np.asarray(cands.weight, np.float64)
    for p, idx in enumerate(partitions(len(cands), parts, sel.seed, contiguous)):
        if not len(idx):
            continue
        got = sel.select(cands.take(idx), min(k, len(idx)), limits.take(idx))
        union.append(idx[got.order])
        info_parts.append({"partition": p, "rows": len(idx), "picked": len(got.order),
                           "objective": got.objective})
    pool = np.sort(np.concatenate(union)) if union else np.zeros(0, np.int64)
    sub = cands.take(pool)
    if isinstance(sel, FacilityLocation) and cands.emb is not None:
        graph = _union_graph(cands, pool, sel.config.neighbours, sel.seed)
        final = sel.select(sub, k, limits.take(pool), graph=graph, point_weight=w_all)
    else:
        final = sel.select(sub, k, limits.take(pool))
    info = dict(final.info)
    info.update({"partitions": len(info_parts), "union_rows": len(pool), "partition_runs": info_parts})
    return Picked(pool[final.order], final.gains, final.objective, info)


def _union_graph(cands: Candidates, pool: np.ndarray, k: int, seed: int):
    """Reverse CSR over the union's candidates of every row's k nearest union rows (knn.search_against: the
    cell-by-cell search, the rows read a block at a time)."""
    nbr, sim = search_against(cands.emb[pool], cands.emb, k=k, seed=seed)
    return reverse_csr(nbr, sim, len(pool))
