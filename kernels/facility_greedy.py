"""Facility location greedy on a sparse similarity graph (Numba): lazy greedy and stochastic greedy.

Objective (Mirchandani and Francis; Lin and Bilmes 2011 for data selection):

    f(S) = sum_j w_j * max_{i in S} s(i, j)  +  lam * sum_{i in S} q_i

with ``s(i, j)`` the similarity of candidate ``i`` to point ``j`` when ``i`` is among ``j``'s k nearest neighbours,
else 0 (similarities clipped at 0, so f is monotone submodular). The graph comes in reverse CSR form: for each
candidate ``i``, the points ``j`` whose neighbour lists hold ``i`` and the similarity (``reverse_csr`` builds it from
the (n, k) neighbour lists). Memory: O(n k): the graph, one float64 coverage per point and a heap of n entries.

- Lazy greedy (Minoux 1978): marginal gains only shrink, so a stale gain is an upper bound; pop the best bound,
  recompute, and take it when it still beats the next bound. Identical selections to plain greedy (ties: lowest
  index), usually with a few evaluations per pick.
- Stochastic greedy (Mirzasoleiman et al. 2015, "Lazier than lazy greedy"): each step evaluates a random sample of
  ceil(n / k * ln(1 / eps)) remaining candidates and takes the best; (1 - 1/e - eps) of the optimum in expectation.

Both respect kernels/quota.py's constraints: a row the constraints refuse is discarded for good.
``facility_greedy_reference`` is the plain greedy over the same graph (every gain at every step), for tests.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from kernels.heap import before as _before
from kernels.heap import heap_pop as _pop
from kernels.heap import heap_push as _push
from kernels.quota import admits, take


@njit(cache=True)
def reverse_csr(nbr, sim, n_candidates, positive=True):
    """(indptr, point, similarity) by candidate from ``nbr``/``sim`` (n_points, k): point j's neighbours (candidate
    indices, -1 = none) and their similarities. With ``positive`` (facility location) edges of similarity <= 0 are
    dropped (they add nothing); without (k-center's distances), every edge is kept."""
    n, k = nbr.shape
    counts = np.zeros(n_candidates + 1, np.int64)
    for j in range(n):
        for t in range(k):
            i = nbr[j, t]
            if i >= 0 and (sim[j, t] > 0 or not positive):
                counts[i + 1] += 1
    for i in range(n_candidates):
        counts[i + 1] += counts[i]
    indptr = counts.copy()
    fill = counts[:-1].copy()
    point = np.empty(indptr[-1], np.int32)
    value = np.empty(indptr[-1], np.float32)
    for j in range(n):
        for t in range(k):
            i = nbr[j, t]
            if i >= 0 and (sim[j, t] > 0 or not positive):
                p = fill[i]
                point[p] = j
                value[p] = sim[j, t]
                fill[i] = p + 1
    return indptr, point, value


@njit(cache=True, inline="always")
def _gain(i, indptr, point, value, w, cur, q, lam):
    g = lam * q[i]
    for e in range(indptr[i], indptr[i + 1]):
        d = value[e] - cur[point[e]]
        if d > 0:
            g += w[point[e]] * d
    return g


@njit(cache=True, inline="always")
def _cover(i, indptr, point, value, cur, who):
    for e in range(indptr[i], indptr[i + 1]):
        j = point[e]
        if value[e] > cur[j]:
            cur[j] = value[e]
            who[j] = i


@njit(cache=True)
def facility_lazy(indptr, point, value, w, q, lam, k, init, group, label_left, source_left, cost, cost_left):
    """Lazy greedy: up to ``k`` picks after the rows ``init`` (already chosen: they cover, they are not returned).
    Returns (order int64, gains float64, coverage float64 per point, the pick covering each point (-1: none),
    evaluations)."""
    n = indptr.shape[0] - 1
    n_points = w.shape[0]
    cur = np.zeros(n_points, np.float64)
    who = np.full(n_points, -1, np.int64)
    chosen = np.zeros(n, np.bool_)
    for t in range(init.shape[0]):
        chosen[init[t]] = True
        _cover(init[t], indptr, point, value, cur, who)
    hk = np.empty(n, np.float64)
    hi = np.empty(n, np.int64)
    size = 0
    for i in range(n):
        if not chosen[i]:
            size = _push(hk, hi, size, _gain(i, indptr, point, value, w, cur, q, lam), i)
    order = np.empty(k, np.int64)
    gains = np.empty(k, np.float64)
    got = 0
    evals = n
    while got < k and size > 0:
        _key, i, size = _pop(hk, hi, size)
        if not admits(i, group, label_left, source_left, cost, cost_left):
            continue
        g = _gain(i, indptr, point, value, w, cur, q, lam)
        evals += 1
        if size == 0 or not _before(hk[0], hi[0], g, i):
            take(i, group, label_left, source_left, cost, cost_left)
            _cover(i, indptr, point, value, cur, who)
            order[got] = i
            gains[got] = g
            got += 1
        else:
            size = _push(hk, hi, size, g, i)
    return order[:got], gains[:got], cur, who, evals


@njit(cache=True)
def facility_stochastic(
    indptr, point, value, w, q, lam, k, init, group, label_left, source_left, cost, cost_left, sample, seed
):
    """Stochastic greedy: each step evaluates ``sample`` random remaining candidates (drawn without replacement)
    and takes the best (ties: lowest index). Same returns as ``facility_lazy``."""
    np.random.seed(seed)
    n = indptr.shape[0] - 1
    cur = np.zeros(w.shape[0], np.float64)
    who = np.full(w.shape[0], -1, np.int64)
    pool = np.empty(n, np.int64)
    chosen = np.zeros(n, np.bool_)
    for t in range(init.shape[0]):
        chosen[init[t]] = True
        _cover(init[t], indptr, point, value, cur, who)
    m = 0
    for i in range(n):
        if not chosen[i]:
            pool[m] = i
            m += 1
    order = np.empty(k, np.int64)
    gains = np.empty(k, np.float64)
    got = 0
    evals = 0
    while got < k and m > 0:
        best, best_pos, best_g = -1, -1, -np.inf
        s = min(sample, m)
        t = 0
        while t < s and m > 0:
            # a partial Fisher-Yates step: pool[t] becomes a uniform draw from pool[t:m]
            r = t + np.random.randint(m - t)
            pool[t], pool[r] = pool[r], pool[t]
            i = pool[t]
            if not admits(i, group, label_left, source_left, cost, cost_left):
                m -= 1  # refused now, refused for good
                pool[t] = pool[m]
                s = min(s, m)
                continue
            g = _gain(i, indptr, point, value, w, cur, q, lam)
            evals += 1
            if g > best_g or (g == best_g and i < best):
                best, best_pos, best_g = i, t, g
            t += 1
        if best < 0:
            break
        take(best, group, label_left, source_left, cost, cost_left)
        _cover(best, indptr, point, value, cur, who)
        order[got] = best
        gains[got] = best_g
        got += 1
        m -= 1
        pool[best_pos] = pool[m]
    return order[:got], gains[:got], cur, who, evals


def stochastic_sample_size(n: int, k: int, eps: float) -> int:
    """ceil(n / k * ln(1 / eps)), at least 1 and at most n."""
    return int(min(n, max(1, math.ceil(n / max(k, 1) * math.log(1.0 / eps)))))


def facility_greedy_reference(indptr, point, value, w, q, lam, k):
    """Plain greedy, every candidate's gain at every step (pure Python over the same graph, same summation order):
    the yardstick the lazy loop must equal pick for pick. Tiny inputs only."""
    n = len(indptr) - 1
    cur = [0.0] * len(w)
    chosen: list[int] = []
    gains: list[float] = []
    for _ in range(min(k, n)):
        best, best_g = -1, -math.inf
        for i in range(n):
            if i in chosen:
                continue
            g = lam * float(q[i])
            for e in range(indptr[i], indptr[i + 1]):
                d = float(value[e]) - cur[point[e]]
                if d > 0:
                    g += float(w[point[e]]) * d
            if g > best_g:
                best, best_g = i, g
        chosen.append(best)
        gains.append(best_g)
        for e in range(indptr[best], indptr[best + 1]):
            cur[point[e]] = max(cur[point[e]], float(value[e]))
    return np.array(chosen, np.int64), np.array(gains)
