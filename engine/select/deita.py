"""``--method deita``: DEITA's score-first, diversity-aware filter (Liu et al. 2024, "What Makes Good Data for
Alignment"): rows by quality descending (ties in input order); a row is accepted when its cosine to every accepted
row is below ``--tau`` (default 0.9).

DEITA scans the accepted set row by row (O(n k d)). Here the check runs on the kNN graph (engine/select/knn.py):
a row is refused when an accepted row among its k nearest neighbours, or one that has it among theirs, reaches tau.
This equals DEITA's scan whenever a row has fewer than k neighbours at or above tau; a row with k or more such
neighbours sits in a near-duplicate cloud, where the graph may miss an accepted member beyond its k nearest (the
manifest counts these dense rows). Gain = the row's quality. Loop in Numba; memory O(n k).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from engine.select.knn import knn_graph
from kernels.facility_greedy import reverse_csr
from kernels.quota import admits, take


@njit(cache=True)
def _scan(order, nbr, sim, indptr, point, value, tau, k, init, group, label_left, source_left, cost, cost_left):
    n = nbr.shape[0]
    accepted = np.zeros(n, np.bool_)
    for t in range(init.shape[0]):
        accepted[init[t]] = True
    out = np.empty(min(k, n), np.int64)
    got = 0
    refused = 0
    for t in range(n):
        if got >= k:
            break
        i = order[t]
        if accepted[i]:
            continue
        close = False
        for s in range(nbr.shape[1]):
            j = nbr[i, s]
            if j >= 0 and j != i and accepted[j] and sim[i, s] >= tau:
                close = True
                break
        if not close:
            for e in range(indptr[i], indptr[i + 1]):
                j = point[e]
                if j != i and accepted[j] and value[e] >= tau:
                    close = True
                    break
        if close:
            refused += 1
            continue
        if not admits(i, group, label_left, source_left, cost, cost_left):
            continue
        take(i, group, label_left, source_left, cost, cost_left)
        accepted[i] = True
        out[got] = i
        got += 1
    return out[:got], refused


@selector
class Deita(Selector):
    name = "deita"
    needs_embeddings = True
    params = ("tau", "neighbours")

    def select(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None = None) -> Picked:
        nbr, sim, info = knn_graph(cands.emb, k=self.config.neighbours, seed=self.seed)
        indptr, point, value = reverse_csr(nbr, sim, len(cands))
        q = np.asarray(cands.quality, np.float64)
        order = np.argsort(-q, kind="stable")
        init = np.zeros(0, np.int64) if init is None else np.asarray(init, np.int64)
        picked, refused = _scan(order, nbr, sim, indptr, point, value, float(self.config.tau), k, init,
                                *limits.copy().args())
        info.update({"refused_as_similar": int(refused),
                     "dense_rows": int((np.where(nbr >= 0, sim, 0).min(axis=1) >= self.config.tau).sum())})
        return Picked(picked, q[picked], None, info)
