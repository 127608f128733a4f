"""Farthest-point greedy (Gonzalez 1985; the k-center coreset of Sener and Savarese 2018), exact, with cell pruning
(Numba).

Each step takes the point farthest (Euclidean; on unit vectors sqrt(2 - 2 cos)) from every chosen center, optionally
weighted by quality: score_j = d_j * (1 - qw + qw * q_j). Plain farthest-point (qw = 0) is a 2-approximation of the
optimal k-center radius.

A plain step costs O(n d) (every point's distance to the new center). Here the points are grouped into cells (k-means
centroids c with each point's distance p_j = |x_j - c|), sorted within a cell by p_j descending. By the triangle
inequality |x - x_j| >= | |x - c| - p_j |, so a new center x cannot move point j when that bound is already >= d_j,
and cannot move any point of a cell when |x - c| - max_j p_j >= max_j d_j. The result is the exact farthest-point
sequence (the same picks as ``farthest_point_reference``); only the work shrinks, more as the radius shrinks.
Memory: O(n) floats beside the (n, d) points.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from kernels.heap import heap_pop as _hpop
from kernels.heap import heap_push as _hpush
from kernels.quota import admits, take


@njit(cache=True, inline="always", fastmath=True)
def _dist(x, y):
    # float32 squared distance, vectorised by LLVM (fastmath lets it reorder the sum): about 6x the float64 loop
    s = np.float32(0.0)
    for t in range(x.shape[0]):
        d = x[t] - y[t]
        s += d * d
    return np.sqrt(np.float64(s))


@njit(cache=True)
def _rescore(c, cell_ptr, d, mult, dead, best_s, best_i):
    """Cell ``c``'s best (largest score, then lowest index) living point."""
    bs, bi = -1.0, -1
    for p in range(cell_ptr[c], cell_ptr[c + 1]):
        if dead[p]:
            continue
        s = d[p] * mult[p]
        if s > bs or (s == bs and p < bi):
            bs, bi = s, p
    best_s[c] = bs
    best_i[c] = bi


@njit(cache=True)
def _max_d(c, cell_ptr, d):
    m = 0.0
    for p in range(cell_ptr[c], cell_ptr[c + 1]):
        m = max(m, d[p])
    return m


@njit(cache=True)
def farthest_point(
    x, cell_ptr, centroids, pdist, mult, k, init, first, group, label_left, source_left, cost, cost_left
):
    """Points ``x`` (n, d) in cell order (``cell_ptr`` (n_cells + 1)), ``pdist`` (n,) each point's distance to its
    cell centroid, descending within each cell; ``mult`` (n,) the quality multiplier of the score. Starts from
    ``init`` (chosen already, not returned) or else from ``first``. Indices are in cell order. Returns (order, gains
    = the score of each pick when taken (the first pick without ``init`` has gain inf), final distances d, distance
    evaluations)."""
    n = x.shape[0]
    nc = cell_ptr.shape[0] - 1
    d = np.full(n, np.inf)
    dead = np.zeros(n, np.bool_)
    maxd = np.full(nc, np.inf)
    radius = np.zeros(nc)
    for c in range(nc):
        if cell_ptr[c + 1] > cell_ptr[c]:
            radius[c] = pdist[cell_ptr[c]]
    best_s = np.full(nc, -1.0)
    best_i = np.full(nc, -1, np.int64)
    order = np.empty(k, np.int64)
    gains = np.empty(k, np.float64)
    got = 0
    evals = 0
    n_init = init.shape[0]
    step = 0
    while got < k:
        if step < n_init:
            i = init[step]
            g = 0.0
        elif step == n_init and n_init == 0:
            i = first
            if not admits(i, group, label_left, source_left, cost, cost_left):
                # the caller's first pick is refused: take the first admitted row instead
                i = -1
                for p in range(n):
                    if admits(p, group, label_left, source_left, cost, cost_left):
                        i = p
                        break
                if i < 0:
                    break
            g = np.inf
        else:
            i = -1
            while True:
                bs, bc = -1.0, -1
                for c in range(nc):
                    if best_i[c] >= 0 and (best_s[c] > bs or (best_s[c] == bs and best_i[c] < best_i[bc])):
                        bs, bc = best_s[c], c
                if bc < 0:
                    break
                p = best_i[bc]
                if admits(p, group, label_left, source_left, cost, cost_left):
                    i = p
                    g = bs
                    break
                dead[p] = True
                _rescore(bc, cell_ptr, d, mult, dead, best_s, best_i)
            if i < 0:
                break
        step += 1
        if step > n_init:
            take(i, group, label_left, source_left, cost, cost_left)
            order[got] = i
            gains[got] = g
            got += 1
        dead[i] = True
        xi = x[i]
        for c in range(nc):
            lo, hi = cell_ptr[c], cell_ptr[c + 1]
            if hi == lo:
                continue
            dc = _dist(xi, centroids[c])
            if dc - radius[c] >= maxd[c]:
                continue
            changed = False
            for p in range(lo, hi):
                if dc - pdist[p] >= maxd[c]:
                    break  # pdist descends: every later point is even farther from x than its d can be
                lb = pdist[p] - dc if pdist[p] > dc else dc - pdist[p]
                if lb >= d[p]:
                    continue
                dp = _dist(xi, x[p])
                evals += 1
                if dp < d[p]:
                    d[p] = dp
                    changed = True
            if changed or best_i[c] == i or maxd[c] == np.inf:
                maxd[c] = _max_d(c, cell_ptr, d)
                _rescore(c, cell_ptr, d, mult, dead, best_s, best_i)
    return order[:got], gains[:got], d, evals


@njit(cache=True, inline="always")
def _cover(i, indptr, point, value, d):
    """Pick ``i`` covers the points whose neighbour lists hold it: d_j = min(d_j, |x_i - x_j|)."""
    for e in range(indptr[i], indptr[i + 1]):
        d[point[e]] = min(d[point[e]], np.sqrt(max(0.0, 2.0 - 2.0 * value[e])))
    d[i] = 0.0


@njit(cache=True, inline="always")
def _pick(i, gain, got, order, gains, dead, indptr, point, value, d, group, label_left, source_left, cost, cost_left):
    """Take ``i`` as pick number ``got`` (spending the constraints, covering its graph neighbours); returns got + 1."""
    take(i, group, label_left, source_left, cost, cost_left)
    dead[i] = True
    order[got] = i
    gains[got] = gain
    _cover(i, indptr, point, value, d)
    return got + 1


@njit(cache=True)
def farthest_point_graph(indptr, point, value, rk, mult, k, init, group, label_left, source_left, cost, cost_left):
    """Farthest-point greedy on a kNN graph (reverse CSR of cosine similarities, as kernels/facility_greedy.py's
    ``reverse_csr``; ``rk`` (n,) each point's distance to its k-th neighbour).

    A point j is *covered* once a pick lies among its k nearest neighbours; then its distance to the picks is exact
    from the graph alone, because every other pick is at least ``rk[j]`` away. Phase 1 (a net): while some point is
    uncovered, pick the uncovered point with the largest ``rk * mult`` (its distance to the picks is at least
    ``rk``). Phase 2: every point covered, the exact farthest-point step (a lazy max-heap; distances only shrink).
    O(n k log n) in all. Returns (order, gains, d (inf = uncovered), picks made in phase 1)."""
    n = indptr.shape[0] - 1
    d = np.full(n, np.inf)
    dead = np.zeros(n, np.bool_)
    order = np.empty(k, np.int64)
    gains = np.empty(k, np.float64)
    got = 0
    for t in range(init.shape[0]):
        i = init[t]
        dead[i] = True
        _cover(i, indptr, point, value, d)
    net = np.argsort(-(rk * mult), kind="mergesort")  # stable: ties by index
    for t in range(n):
        if got >= k:
            break
        i = net[t]
        if d[i] < np.inf or dead[i]:
            continue
        if not admits(i, group, label_left, source_left, cost, cost_left):
            dead[i] = True
            continue
        got = _pick(
            i,
            rk[i] * mult[i],
            got,
            order,
            gains,
            dead,
            indptr,
            point,
            value,
            d,
            group,
            label_left,
            source_left,
            cost,
            cost_left,
        )
    phase1 = got
    # phase 2: exact farthest point among covered points, lazy heap keyed by d * mult
    # capacity: one entry per point plus one re-push per distance decrease (at most one per graph edge)
    hk = np.empty(n + point.shape[0] + 1, np.float64)
    hi = np.empty(n + point.shape[0] + 1, np.int64)
    size = 0
    for i in range(n):
        if not dead[i] and d[i] < np.inf:
            size = _hpush(hk, hi, size, d[i] * mult[i], i)
    while got < k and size > 0:
        key, i, size = _hpop(hk, hi, size)
        if dead[i]:
            continue
        now = d[i] * mult[i]
        if now < key:
            size = _hpush(hk, hi, size, now, i)
            continue
        if not admits(i, group, label_left, source_left, cost, cost_left):
            dead[i] = True
            continue
        got = _pick(
            i, now, got, order, gains, dead, indptr, point, value, d, group, label_left, source_left, cost, cost_left
        )
    return order[:got], gains[:got], d, phase1


def farthest_point_reference(x: np.ndarray, mult: np.ndarray, k: int, first: int):
    """Plain farthest-point greedy with dense distance updates (numpy), for tests: (order, gains)."""
    x = np.asarray(x, np.float64)
    d = np.full(len(x), np.inf)
    chosen = np.zeros(len(x), bool)
    order, gains = [first], [np.inf]
    chosen[first] = True
    d = np.minimum(d, np.linalg.norm(x - x[first], axis=1))
    for _ in range(min(k, len(x)) - 1):
        s = np.where(chosen, -1.0, d * mult)
        i = int(np.argmax(s))  # ties: lowest index
        order.append(i)
        gains.append(float(s[i]))
        chosen[i] = True
        d = np.minimum(d, np.linalg.norm(x - x[i], axis=1))
    return np.array(order, np.int64), np.array(gains)
