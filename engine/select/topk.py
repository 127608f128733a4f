"""``--method topk``: the best rows by one column (``--score COL``, highest first, or lowest with ``--ascending``),
or by ``quality`` when no column is named. Nulls last, ties in input order. The baseline every diversity method
must beat; NeMo Curator's, DataTrove's and Data-Juicer's selectors are this."""

from __future__ import annotations

import numpy as np

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from kernels.quota import take_in_order


@selector
class TopK(Selector):
    name = "topk"
    params = ("score", "ascending")

    def select(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None = None) -> Picked:
        s = np.asarray(cands.quality if cands.score is None else cands.score, np.float64)
        key = np.where(np.isnan(s), np.inf, -s if not self.config.ascending else s)
        order = np.argsort(key, kind="stable")
        if init is not None and len(init):
            order = order[~np.isin(order, init)]
        picked = take_in_order(order, k, *limits.copy().args())
        return Picked(picked, s[picked], None, {"ranked_by": self.config.score or "quality"})
