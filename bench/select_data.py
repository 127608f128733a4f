"""Synthetic sentence-embedding-like data for the selection benchmarks: a Gaussian mixture on the unit sphere.

    python bench/select_data.py --n 10000000 --out /tmp/emb_10m.f16     # raw float16 memmap, (n, 384)
    python bench/select_data.py --n 50000 --out /tmp/emb_50k.npy        # .npy (np.load-able, mmap_mode="r")

Shape of the data (so that selection has something to find, as in real MiniLM embeddings):
- ``clusters`` centres c_k = normalize(a_k * g + sqrt(1 - a_k^2) * u_k), with g one shared direction and u_k random
  directions that are almost orthogonal to it and to each other (|cos| ~ 1/sqrt(384) = 0.05). Then
  cos(c_k, c_l) ~ a_k * a_l. Real sentence embeddings are anisotropic like this: unrelated texts still score 0.1-0.3.
- a point of cluster k is x = normalize(sqrt(r) * c_k + sqrt(1 - r) * z), z a random unit direction and
  r = r_k + N(0, 0.04) per point, r_k ~ U(0.6, 0.8). Two points of one cluster then have cos ~ r_k (0.6-0.8) and
  points of clusters k and l have cos ~ sqrt(r_k r_l) a_k a_l. a_k ~ U(0.4, 0.65) gives 0.11-0.30. Measured at
  n = 50,000 (``cosine_profile``): intra mean 0.69 (p10-p90 0.59-0.78), inter mean 0.20 (0.12-0.27).
- cluster sizes are uneven: weights ~ lognormal(sigma=1.2), so the largest cluster is 11-15x the median (measured);
  a 2% tail of loose points (r ~ 0.25) plays the outliers that facility location should not waste picks on.

Rows are generated in fixed chunks of ``CHUNK`` rows, each from its own ``np.random.default_rng([seed, chunk])``,
so memory is O(CHUNK * d) whatever n is (n = 10,000,000 at d = 384 writes 7.7 GB of float16 with < 0.5 GB resident)
and, for the same ``(d, clusters, seed)``, row i is identical whatever n is (prefixes are stable).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

CHUNK = 65_536  # rows per generated chunk: 65,536 x 384 float32 = 96 MiB of noise at a time
OUTLIER_FRACTION = 0.02  # share of loosely attached points (r ~ 0.25)


def default_clusters(n: int) -> int:
    """sqrt(n) clusters (100 at 10k, 224 at 50k, 3,163 at 10M): mean cluster size grows with n like real corpora."""
    return max(2, int(math.isqrt(n) + (0 if math.isqrt(n) ** 2 == n else 1)))


class _Mixture:
    """Cluster centres and per-cluster parameters, drawn once from ``seed`` (independent of n)."""

    def __init__(self, d: int, clusters: int, seed: int):
        rng = np.random.default_rng([seed, 0xC1])
        g = rng.standard_normal(d)
        g /= np.linalg.norm(g)
        u = rng.standard_normal((clusters, d))
        u -= np.outer(u @ g, g)  # u_k orthogonal to g, so cos(c_k, c_l) = a_k a_l + O(1/sqrt(d))
        u /= np.linalg.norm(u, axis=1, keepdims=True)
        self.a = rng.uniform(0.4, 0.65, clusters)
        centres = self.a[:, None] * g[None, :] + np.sqrt(1 - self.a**2)[:, None] * u
        self.centres = (centres / np.linalg.norm(centres, axis=1, keepdims=True)).astype(np.float32)
        self.r = rng.uniform(0.6, 0.8, clusters)  # intra-cluster cosine of cluster k
        w = rng.lognormal(0.0, 1.2, clusters)
        self.weights = w / w.sum()
        self.cdf = np.cumsum(self.weights)
        self.cdf[-1] = 1.0
        self.d = d

    def chunk(self, seed: int, c: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk c: (rows, d) float32 unit vectors and their int32 cluster labels (always drawn for CHUNK rows)."""
        rng = np.random.default_rng([seed, c])
        labels = np.searchsorted(self.cdf, rng.random(CHUNK), side="right").astype(np.int32)
        r = np.clip(self.r[labels] + rng.normal(0.0, 0.04, CHUNK), 0.3, 0.95)
        loose = rng.random(CHUNK) < OUTLIER_FRACTION
        r[loose] = rng.uniform(0.15, 0.35, int(loose.sum()))
        z = rng.standard_normal((CHUNK, self.d), dtype=np.float32)
        labels, r, z = labels[:rows], r[:rows].astype(np.float32), z[:rows]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        z *= np.sqrt(1 - r)[:, None]
        z += np.sqrt(r)[:, None] * self.centres[labels]
        z /= np.linalg.norm(z, axis=1, keepdims=True)
        return z, labels


def _chunks(n: int, d: int, clusters: int | None, seed: int):
    mix = _Mixture(d, clusters or default_clusters(n), seed)
    for c, start in enumerate(range(0, n, CHUNK)):
        rows = min(CHUNK, n - start)
        x, lab = mix.chunk(seed, c, rows)
        yield start, x, lab


def clustered_embeddings(
    n: int,
    d: int = 384,
    clusters: int | None = None,
    seed: int = 0,
    dtype=np.float16,
    return_labels: bool = False,
):
    """(n, d) L2-normalised points of a Gaussian mixture on the sphere (see the module docstring).

    ``clusters=None`` means ``default_clusters(n)`` = ceil(sqrt(n)). With ``return_labels`` also returns the
    (n,) int32 cluster id of each row. float16 rows have norm 1 to ~1e-3.
    """
    out = np.empty((n, d), dtype=dtype)
    labels = np.empty(n, dtype=np.int32)
    for start, x, lab in _chunks(n, d, clusters, seed):
        out[start : start + len(x)] = x
        labels[start : start + len(x)] = lab
    return (out, labels) if return_labels else out


def write_memmap(
    path: str | Path,
    n: int,
    d: int = 384,
    seed: int = 0,
    clusters: int | None = None,
    dtype=np.float16,
    labels_path: str | Path | None = None,
) -> np.memmap:
    """Write ``clustered_embeddings(n, d, clusters, seed)`` to ``path`` chunk by chunk and return it opened read-only.

    A path ending in ``.npy`` gets an .npy header (``np.load(path, mmap_mode="r")`` opens it); any other path is a
    raw C-order memmap of shape (n, d) and ``dtype``. Only one float32 chunk (CHUNK x d) is resident at a time
    (peak RSS measured below).
    ``labels_path`` optionally receives the int32 labels as .npy.
    """
    path = Path(path)
    dtype = np.dtype(dtype)
    # Lay out the file (header + full size, sparse) through numpy, then stream the chunks in with plain writes:
    # assigning into a w+ memmap keeps every written page resident until it is flushed (1.1 GB RSS at 1M rows,
    # 7.7 GB at 10M); sequential writes keep RSS at one chunk and leave the pages to the page cache.
    if path.suffix == ".npy":
        mm = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    else:
        mm = np.memmap(path, mode="w+", dtype=dtype, shape=(n, d))
    offset = mm.offset
    del mm
    labels = []
    with open(path, "r+b") as f:
        f.seek(offset)
        for _, x, lab in _chunks(n, d, clusters, seed):
            f.write(x.astype(dtype).tobytes())
            if labels_path:
                labels.append(lab)
    if labels_path:
        np.save(labels_path, np.concatenate(labels) if labels else np.empty(0, np.int32))  # 4 bytes/row: 40 MB at 10M
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r")
    return np.memmap(path, mode="r", dtype=dtype, shape=(n, d))


def cosine_profile(emb: np.ndarray, labels: np.ndarray, pairs: int = 200_000, seed: int = 1) -> dict:
    """Mean / 10th / 90th percentile cosine of random same-cluster and different-cluster pairs (a data-card check)."""
    rng = np.random.default_rng(seed)
    n = len(emb)
    i, j = rng.integers(0, n, pairs), rng.integers(0, n, pairs)
    keep = i != j
    i, j = i[keep], j[keep]
    cos = np.einsum("ij,ij->i", emb[i].astype(np.float32), emb[j].astype(np.float32))
    same = labels[i] == labels[j]
    # Random pairs rarely share a cluster: draw same-cluster pairs explicitly by sorting on label.
    order = np.argsort(labels, kind="stable")
    lab_sorted = labels[order]
    a = rng.integers(0, n - 1, pairs)
    ok = lab_sorted[a] == lab_sorted[a + 1]
    sc = np.einsum("ij,ij->i", emb[order[a[ok]]].astype(np.float32), emb[order[a[ok] + 1]].astype(np.float32))
    sizes = np.bincount(labels)
    sizes = sizes[sizes > 0]

    def q(v):
        return {
            "mean": round(float(v.mean()), 3),
            "p10": round(float(np.quantile(v, 0.1)), 3),
            "p90": round(float(np.quantile(v, 0.9)), 3),
        }

    return {
        "intra": q(sc),
        "inter": q(cos[~same]),
        "clusters": len(sizes),
        "size_max_over_median": round(float(sizes.max() / np.median(sizes)), 1),
        "norm_err_max": float(np.abs(np.linalg.norm(emb[:10000].astype(np.float32), axis=1) - 1).max()),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, required=True, help="rows")
    ap.add_argument("--d", type=int, default=384, help="dimension (MiniLM: 384)")
    ap.add_argument("--clusters", type=int, default=None, help="mixture components (default ceil(sqrt(n)))")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="output file: .npy gets a header, anything else is a raw memmap")
    ap.add_argument("--labels", default=None, help="optional .npy for the int32 cluster labels")
    ap.add_argument("--check", action="store_true", help="print intra/inter-cluster cosine profile")
    a = ap.parse_args()
    t0 = time.perf_counter()
    mm = write_memmap(a.out, a.n, a.d, a.seed, a.clusters, labels_path=a.labels)
    dt = time.perf_counter() - t0
    info = {"n": a.n, "d": a.d, "out": a.out, "seconds": round(dt, 2), "rows_per_s": round(a.n / dt)}
    if a.check and a.labels:
        info["profile"] = cosine_profile(mm, np.load(a.labels, mmap_mode="r"))
    import json

    print(json.dumps(info))


if __name__ == "__main__":
    main()
