"""``--method random``: a seeded uniform sample of the kept rows (constraints applied in the sampled order): the
arm every method is compared against."""

from __future__ import annotations

import numpy as np

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from kernels.quota import take_in_order


@selector
class Random(Selector):
    name = "random"

    def select(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None = None) -> Picked:
        order = np.random.default_rng(self.seed).permutation(len(cands))
        if init is not None and len(init):
            order = order[~np.isin(order, init)]
        picked = take_in_order(order, k, *limits.copy().args())
        return Picked(picked, np.zeros(len(picked)), None, {})
