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
those edges, the union's vectors, one block of rows at a time). Here the partitions run one after another; under
``partition_runner(fn)`` (``select --engine ray``: ``engine.run.ray.partition_map``, one Ray task per partition)
``fn`` runs them, in parallel, and the final round stays on the driver. Each partition's selection depends only on
its rows, the selector's seed and the limits, so the picks are the same either way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

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


# fn(sel, cands, k, limits, [index arrays]) -> [Picked per partition]: who runs the partitions (None: this process)
_RUNNER: Callable | None = None


@contextlib.contextmanager
def partition_runner(fn: Callable) -> Iterator[None]:
    """Run GreeDi's partitions with ``fn`` inside the block (the Ray executor's parallel tasks)."""
    global _RUNNER
    old, _RUNNER = _RUNNER, fn
    try:
        yield
    finally:
        _RUNNER = old


def _in_process(sel: Selector, cands: Candidates, k: int, limits: Limits, parts: list[np.ndarray]) -> list[Picked]:
    return [sel.select(cands.take(idx), min(k, len(idx)), limits.take(idx)) for idx in parts]


def greedi(sel: Selector, cands: Candidates, k: int, limits: Limits, parts: int, contiguous: bool = False) -> Picked:
    union: list[np.ndarray] = []
    info_parts = []
    w_all = np.ones(len(cands)) if cands.weight is None else np.asarray(cands.weight, np.float64)
    todo = [(p, idx) for p, idx in enumerate(partitions(len(cands), parts, sel.seed, contiguous)) if len(idx)]
    runner = _RUNNER or _in_process
    picks = runner(sel, cands, k, limits, [idx for _p, idx in todo])
    for (p, idx), got in zip(todo, picks):
        union.append(idx[got.order])
        info_parts.append({"partition": p, "rows": len(idx), "picked": len(got.order), "objective": got.objective})
    pool = np.sort(np.concatenate(union)) if union else np.zeros(0, np.int64)
    sub = cands.take(pool)
    if isinstance(sel, FacilityLocation) and cands.emb is not None:
        graph = _union_graph(cands, pool, sel.config.neighbours, sel.seed)
        final = sel.select(sub, k, limits.take(pool), graph=graph, point_weight=w_all)
    else:
        final = sel.select(sub, k, limits.take(pool))
    info = dict(final.info)
    info.update({"partitions": len(info_parts), "union_rows": len(pool), "partition_runs": info_parts})
    if _RUNNER is not None:
        info["partitions_ran_on"] = getattr(_RUNNER, "where", _RUNNER.__module__)
    return Picked(pool[final.order], final.gains, final.objective, info)


def _union_graph(cands: Candidates, pool: np.ndarray, k: int, seed: int):
    """Reverse CSR over the union's candidates of every row's k nearest union rows (knn.search_against: the
    cell-by-cell search, the rows read a block at a time)."""
    nbr, sim = search_against(cands.emb[pool], cands.emb, k=k, seed=seed)
    return reverse_csr(nbr, sim, len(pool))
