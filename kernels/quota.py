"""The constraints every greedy selector obeys, as Numba-callable state: a count, per-label and per-source caps and
a token (cost) budget.

A selector calls ``admits(i, state)`` before taking row ``i`` and ``take(i, state)`` when it does. A row that is not
admitted now will never be (caps and budgets only shrink), so a selector may discard it for good.

State (built by engine/select/budget.py): ``group`` (n, 2) int32 (label group, source group; -1 = unconstrained),
``left`` a list of two int64 arrays (places left per label group / per source group), ``cost`` (n,) float64 and
``cost_left`` a one-element float64 array (remaining token budget; inf = none).
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, inline="always")
def admits(i, group, label_left, source_left, cost, cost_left):
    g = group[i, 0]
    if g >= 0 and label_left[g] <= 0:
        return False
    g = group[i, 1]
    if g >= 0 and source_left[g] <= 0:
        return False
    return cost[i] <= cost_left[0]


@njit(cache=True, inline="always")
def take(i, group, label_left, source_left, cost, cost_left):
    g = group[i, 0]
    if g >= 0:
        label_left[g] -= 1
    g = group[i, 1]
    if g >= 0:
        source_left[g] -= 1
    cost_left[0] -= cost[i]


def unconstrained(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group, label_left, source_left, cost, cost_left) that admit every row."""
    return (
        np.full((n, 2), -1, np.int32),
        np.zeros(1, np.int64),
        np.zeros(1, np.int64),
        np.zeros(n, np.float64),
        np.array([np.inf]),
    )


@njit(cache=True)
def take_in_order(order, k, group, label_left, source_left, cost, cost_left):
    """The first ``k`` rows of ``order`` the constraints admit (for selectors that rank first: topk, random)."""
    out = np.empty(min(k, order.shape[0]), np.int64)
    got = 0
    for t in range(order.shape[0]):
        if got >= k:
            break
        i = order[t]
        if admits(i, group, label_left, source_left, cost, cost_left):
            take(i, group, label_left, source_left, cost, cost_left)
            out[got] = i
            got += 1
    return out[:got]
