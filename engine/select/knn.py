"""The sparse similarity graph selection runs on: each row's k nearest neighbours by cosine (faiss), never n x n.

Up to ``exact_max`` rows the search is exact (``IndexFlatIP``); above, an inverted file (``IndexIVFFlat``, about
4 sqrt(n) lists trained on a sample, ``nprobe`` lists searched, exact within them). Rows are searched in chunks, so
memory is the float32 copy of the embeddings (faiss's working type) plus O(n k) for the graph.
Every row is its own first neighbour (similarity 1), so facility location always credits a pick with covering
itself.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np

CHUNK = 16384


def _threads() -> None:
    import faiss

    faiss.omp_set_num_threads(max(1, len(os.sched_getaffinity(0))))


def as_float32(emb: np.ndarray) -> np.ndarray:
    """A C-contiguous float32 copy (faiss's type), L2-normalised again (float16 storage loses a little norm)."""
    x = np.ascontiguousarray(emb, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, np.maximum(norms, 1e-12), out=x)
    return x


def build_index(x: np.ndarray, exact_max: int = 50_000, nprobe: int = 12, seed: int = 0):
    """A faiss inner-product index over ``x`` (float32, normalised): flat up to ``exact_max`` rows, else IVF."""
    import faiss

    _threads()
    n, d = x.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(d)
        index.add(x)
        return index
    nlist = int(min(max(64, 4 * math.sqrt(n)), n // 39))
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=min(n, 40 * nlist), replace=False))]
    index.cp.seed = seed
    index.train(sample)
    index.add(x)
    index.nprobe = min(nprobe, nlist)
    return index


def knn_graph(emb: np.ndarray, k: int = 16, exact_max: int = 50_000, nprobe: int = 12, seed: int = 0,
              x: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(neighbours int32 (n, k), similarities float32 (n, k), info): row j's k most similar rows, itself first.
    Missing neighbours (an IVF probe with fewer than k rows) are -1 with similarity 0."""
    t0 = time.perf_counter()
    x = as_float32(emb) if x is None else x
    n = x.shape[0]
    k = max(1, min(k, n))
    index = build_index(x, exact_max, nprobe, seed)
    nbr = np.empty((n, k), np.int32)
    sim = np.empty((n, k), np.float32)
    for s in range(0, n, CHUNK):
        D, I = index.search(x[s:s + CHUNK], k)
        nbr[s:s + CHUNK] = I
        sim[s:s + CHUNK] = D
    # the row itself first, whatever faiss's tie order: put it in place of the least similar neighbour if missing
    rows = np.arange(n, dtype=np.int32)
    has_self = (nbr == rows[:, None]).any(axis=1)
    nbr[~has_self, -1] = rows[~has_self]
    sim[~has_self, -1] = 1.0
    sim[nbr < 0] = 0.0
    kind = type(index).__name__
    info = {"graph": kind, "neighbours": k, "nprobe": getattr(index, "nprobe", None),
            "lists": getattr(index, "nlist", None), "graph_seconds": round(time.perf_counter() - t0, 3)}
    return nbr, sim, info
