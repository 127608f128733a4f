"""``--method facility``: quality and coverage together.

    f(S) = sum_j w_j max_{i in S} sim(i, j)  +  lambda * sum_{i in S} quality_i

``sim`` is cosine on a sparse k-nearest-neighbour graph (engine/select/knn.py: faiss, exact up to 50k rows, IVF
above), clipped at 0; ``lambda`` is ``--quality-weight`` (0 = pure facility location); ``w_j`` is 1, or the number
of rows a candidate stands for in GreeDi's final round (engine/select/greedi.py). Lazy greedy by default
(identical to plain greedy); ``--epsilon E`` > 0 switches to stochastic greedy ((1 - 1/e - E) of the optimum in
expectation, fewer evaluations). Loops in Numba (kernels/facility_greedy.py). Memory O(n k).

A pick's gain is its coverage gain plus lambda * quality: the first picks are the centres of dense regions; once a
region is covered, the next pick there gains little, so the selection spreads out, and among rows that cover
alike the better one wins.
"""

from __future__ import annotations

import numpy as np

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from engine.select.knn import knn_graph
from kernels.facility_greedy import facility_lazy, facility_stochastic, reverse_csr, stochastic_sample_size


def graph_of(cands: Candidates, config, seed: int):
    nbr, sim, info = knn_graph(cands.emb, k=config.neighbours, seed=seed)
    indptr, point, value = reverse_csr(nbr, sim, len(cands))
    return (indptr, point, value), info


@selector
class FacilityLocation(Selector):
    name = "facility"
    needs_embeddings = True
    params = ("quality_weight", "neighbours", "epsilon")

    def select(
        self,
        cands: Candidates,
        k: int,
        limits: Limits,
        init: np.ndarray | None = None,
        graph=None,
        point_weight: np.ndarray | None = None,
    ) -> Picked:
        """``graph`` (reverse CSR over these candidates, points possibly other rows: GreeDi's final round) and
        ``point_weight`` (one per point) replace the candidates' own kNN graph and weights."""
        n = len(cands)
        if graph is None:
            graph, info = graph_of(cands, self.config, self.seed)
        else:
            info = {}
        indptr, point, value = graph
        if point_weight is not None:
            w = np.asarray(point_weight, np.float64)
        else:
            w = np.ones(n) if cands.weight is None else np.asarray(cands.weight, np.float64)
        q = np.asarray(cands.quality, np.float64)
        lam = float(self.config.quality_weight)
        init = np.zeros(0, np.int64) if init is None else np.asarray(init, np.int64)
        lim = limits.copy()
        if self.config.epsilon > 0:
            sample = stochastic_sample_size(n, k, self.config.epsilon)
            order, gains, cur, who, evals = facility_stochastic(
                indptr, point, value, w, q, lam, k, init, *lim.args(), sample, self.seed
            )
            info["greedy"] = f"stochastic (sample {sample})"
        else:
            order, gains, cur, who, evals = facility_lazy(indptr, point, value, w, q, lam, k, init, *lim.args())
            info["greedy"] = "lazy"
        info["evaluations"] = int(evals)
        chosen = np.concatenate([init, order])
        objective = float((w * cur).sum() + lam * q[chosen].sum())
        info["coverage"] = float((w * cur).sum() / max(w.sum(), 1e-12))
        return Picked(order, gains, objective, info, cover=who)
