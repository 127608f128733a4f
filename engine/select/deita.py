"""``--method deita``: DEITA's score-first, diversity-aware filter (Liu et al. 2024, "What Makes Good Data for
Alignment"): rows by quality descending (ties in input order); a row is accepted when its cosine to every accepted
row is below ``--tau`` (default 0.9).

DEITA scans the accepted set row by row (O(n k d)). Here the check runs on the kNN graph (engine/select/knn.py):
a row is refused when an accepted row among its k nearest neighbours, or one that has it among theirs, reaches tau.
This equals DEITA's scan whenever a row has fewer than k neighbours at or above tau; a row with k or more such
neighbours sits in a near-duplicate cloud, where the graph may miss an accepted member beyond its k nearest (the
manifest counts these dense rows). Gain = the row's quality. Loop in Numba (kernels/diversity_scan.py); memory
O(n k).
"""

from __future__ import annotations

import numpy as np

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from engine.select.knn import knn_graph
from kernels.diversity_scan import diversity_scan
from kernels.facility_greedy import reverse_csr


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
        picked, refused = diversity_scan(
            order, nbr, sim, indptr, point, value, float(self.config.tau), k, init, *limits.copy().args()
        )
        info.update(
            {
                "refused_as_similar": int(refused),
                "dense_rows": int((np.where(nbr >= 0, sim, 0).min(axis=1) >= self.config.tau).sum()),
            }
        )
        return Picked(picked, q[picked], None, info)
