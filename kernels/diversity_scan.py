"""DEITA's diversity filter on a kNN graph (Numba): rows in a given order (quality descending), each accepted when
no accepted row among its neighbours (forward list or reverse CSR) reaches cosine ``tau``; constraints as
kernels/quota.py. Used by engine/select/deita.py; ``diversity_scan_reference`` is DEITA's plain scan over the full
similarity matrix, for tests."""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.quota import admits, take


@njit(cache=True)
def diversity_scan(
    order, nbr, sim, indptr, point, value, tau, k, init, group, label_left, source_left, cost, cost_left
):
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


def diversity_scan_reference(order: np.ndarray, x: np.ndarray, tau: float, k: int) -> np.ndarray:
    """DEITA's sequential scan: accept a row when its cosine to every accepted row is below ``tau`` (dense)."""
    accepted: list[int] = []
    for i in order:
        if len(accepted) >= k:
            break
        if not accepted or float(np.max(x[accepted] @ x[i])) < tau:
            accepted.append(int(i))
    return np.array(accepted, np.int64)
