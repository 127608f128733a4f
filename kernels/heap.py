"""A binary max-heap over two parallel arrays (keys float64, indices int64) for Numba greedy loops: larger key
first, ties by lower index, so lazy greedy picks exactly what plain greedy (argmax, lowest index) would.
The caller owns the arrays (capacity fixed up front) and the size."""

from __future__ import annotations

from numba import njit


@njit(cache=True, inline="always")
def before(ka, ia, kb, ib):
    """Heap order: larger key first, then lower index."""
    return ka > kb or (ka == kb and ia < ib)


@njit(cache=True)
def heap_push(hk, hi, size, key, idx):
    """Insert (key, idx); returns the new size."""
    pos = size
    hk[pos] = key
    hi[pos] = idx
    while pos > 0:
        parent = (pos - 1) // 2
        if before(hk[pos], hi[pos], hk[parent], hi[parent]):
            hk[pos], hk[parent] = hk[parent], hk[pos]
            hi[pos], hi[parent] = hi[parent], hi[pos]
            pos = parent
        else:
            break
    return size + 1


@njit(cache=True)
def heap_pop(hk, hi, size):
    """Remove the top: returns (key, idx, new size)."""
    key, idx = hk[0], hi[0]
    size -= 1
    hk[0], hi[0] = hk[size], hi[size]
    pos = 0
    while True:
        left = 2 * pos + 1
        if left >= size:
            break
        best = left
        if left + 1 < size and before(hk[left + 1], hi[left + 1], hk[left], hi[left]):
            best = left + 1
        if before(hk[best], hi[best], hk[pos], hi[pos]):
            hk[pos], hk[best] = hk[best], hk[pos]
            hi[pos], hi[best] = hi[best], hi[pos]
            pos = best
        else:
            break
    return key, idx, size
