"""Union-find over int64 parent arrays (Numba): the connected components of candidate pairs.

Used by semantic dedup (engine/stages/semdedup.py) and the leak-free split (engine/train/split.py). The smaller index
always becomes the root, so a component's root is its first row and the result does not depend on pair order.
Memory: the caller's parent array (8 B per row); path compression keeps ``find`` near O(1) amortised.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True)
def find(parent, i):
    """Root of ``i``, compressing the path to it."""
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        nxt = parent[i]
        parent[i] = root
        i = nxt
    return root


@njit(cache=True)
def union(parent, a, b):
    """Join the components of ``a`` and ``b``; True when they were apart."""
    ra = find(parent, a)
    rb = find(parent, b)
    if ra == rb:
        return False
    if ra < rb:
        parent[rb] = ra
    else:
        parent[ra] = rb
    return True


@njit(cache=True)
def union_pairs(parent, a, b):
    """Union a[k] with b[k] for every k; returns the merges made."""
    merged = 0
    for k in range(a.shape[0]):
        if union(parent, a[k], b[k]):
            merged += 1
    return merged


@njit(cache=True)
def all_roots(parent):
    """Every row's root (a component label per row)."""
    out = np.empty(parent.shape[0], np.int64)
    for i in range(parent.shape[0]):
        out[i] = find(parent, i)
    return out
