"""``--method kcenter``: farthest-point greedy, the k-center coreset (Sener and Savarese 2018).

Each pick is the candidate farthest from every pick so far (Euclidean on unit vectors, sqrt(2 - 2 cos)), so the
selection covers the embedding space with the smallest radius it can: a 2-approximation of the optimal k-center
radius (Gonzalez 1985), whatever the data. ``--quality-weight W`` in [0, 1] weighs distances by quality
(score = d * (1 - W + W * quality)); the 2-approximation then holds for the weighted radius only in the limit
W = 0. The first pick (no earlier picks) is the best-quality row.

Two paths (kernels/farthest_point.py), chosen by the work n x k:
- exact (n k <= 5e8 distance evaluations, or ``--kcenter exact``): the plain farthest-point sequence, with
  triangle-inequality pruning over k-means cells to skip work (it skips little on high-dimensional data; the float32
  SIMD distance is what makes it fast). Memory: the float32 points plus O(n).
- graph (above, or ``--kcenter graph``): on the kNN graph of engine/select/knn.py. Once every row has a pick among
  its k nearest neighbours, its distance to the picks is exact from the graph (every other pick is farther than its
  k-th neighbour), and from then on the picks are exactly the farthest-point steps. Before that (phase 1), picks are
  the rows with no pick among their neighbours, farthest first by their k-th-neighbour distance (a lower bound of
  their true distance). Bound: when phase 1 completes, every row j lies within r_k(j) (its k-th-neighbour distance)
  of a pick, and each later pick is the true farthest row; if the budget ends inside phase 1 (k below the size of a
  kNN net, roughly n / neighbours), the picks are such a net and no ratio to the optimum is claimed. The manifest
  records the phase-1 count. O(n k log n); memory O(n k).
"""

from __future__ import annotations

import math

import numpy as np

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from engine.select.knn import _threads, as_float32, knn_graph
from kernels.facility_greedy import reverse_csr
from kernels.farthest_point import farthest_point, farthest_point_graph

EXACT_WORK = 5e8  # n x k distance evaluations the exact path may take (about a minute on one core)


def cells(x: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(perm, cell_ptr, centroids, pdist): positions sorted by cell, then by distance to the centroid descending."""
    import faiss

    _threads()
    n, d = x.shape
    nc = int(min(max(1, round(math.sqrt(n))), 4096, max(1, n // 8)))
    if nc > 1:
        km = faiss.Kmeans(d, nc, niter=10, seed=seed % 2**31, spherical=False, max_points_per_centroid=64)
        rng = np.random.default_rng(seed)
        km.train(x[np.sort(rng.choice(n, size=min(n, 64 * nc), replace=False))])
        dist, assign = km.index.search(x, 1)
        centroids = km.centroids.astype(np.float32)
        pdist = np.sqrt(np.maximum(dist[:, 0], 0)).astype(np.float64)
        assign = assign[:, 0].astype(np.int64)
    else:
        centroids = x.mean(axis=0, keepdims=True)
        assign = np.zeros(n, np.int64)
        pdist = np.linalg.norm(x - centroids, axis=1).astype(np.float64)
    perm = np.lexsort((-pdist, assign))
    counts = np.bincount(assign, minlength=nc)
    cell_ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return perm, cell_ptr, centroids.astype(np.float64), pdist[perm]


@selector
class KCenter(Selector):
    name = "kcenter"
    needs_embeddings = True
    params = ("quality_weight", "kcenter", "neighbours")

    def select(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None = None) -> Picked:
        n = len(cands)
        mode = self.config.kcenter
        if mode == "graph" or (mode == "auto" and n * k > EXACT_WORK):
            return self._graph(cands, k, limits, init)
        return self._exact(cands, k, limits, init)

    def _mult(self, cands: Candidates) -> np.ndarray:
        qw = min(1.0, max(0.0, float(self.config.quality_weight)))
        return 1 - qw + qw * np.asarray(cands.quality, np.float64)

    def _graph(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None) -> Picked:
        x = as_float32(cands.emb)
        nbr, sim, info = knn_graph(cands.emb, k=self.config.neighbours, seed=self.seed, x=x)
        del x
        rk = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * np.where(nbr >= 0, sim, 1.0).min(axis=1).astype(np.float64)))
        indptr, point, value = reverse_csr(nbr, sim, len(cands), False)
        del nbr, sim
        init = np.zeros(0, np.int64) if init is None else np.asarray(init, np.int64)
        order, gains, d, phase1 = farthest_point_graph(
            indptr, point, value, rk, self._mult(cands), k, init, *limits.copy().args()
        )
        covered = np.isfinite(d)
        radius = float(d[covered].max()) if covered.any() else 0.0
        info.update(
            {
                "path": "graph",
                "phase1_picks": int(phase1),
                "uncovered_rows": int((~covered).sum()),
                "radius": radius,
                "radius_cosine": 1 - radius * radius / 2,
            }
        )
        return Picked(order, gains, -radius, info)

    def _exact(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None) -> Picked:
        n = len(cands)
        x = as_float32(cands.emb)
        perm, cell_ptr, centroids, pdist = cells(x, self.seed)
        where = np.empty(n, np.int64)
        where[perm] = np.arange(n)
        q = np.asarray(cands.quality, np.float64)
        mult = self._mult(cands)[perm]
        first = int(where[int(np.argmax(q))])  # the best-quality row (ties: first)
        init_p = np.zeros(0, np.int64) if init is None else where[np.asarray(init, np.int64)]
        lim = limits.take(perm)
        order, gains, d, evals = farthest_point(
            x[perm], cell_ptr, centroids, pdist, mult, k, init_p, first, *lim.args()
        )
        radius = float(d.max()) if n else 0.0
        info = {
            "path": "exact",
            "cells": int(len(cell_ptr) - 1),
            "distance_evaluations": int(evals),
            "dense_evaluations": int(n) * int(len(order) + len(init_p)),
            "radius": radius,
            "radius_cosine": 1 - radius * radius / 2,
        }
        return Picked(perm[order], gains, -radius, info)
