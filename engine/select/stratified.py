"""``--method stratified``: a random sample that keeps the corpus's shape, with less luck in it.

Within each label (all rows together when there are none), the candidates are cut into strata by spherical k-means
on their embeddings, about one stratum per ``--strata-rows`` picks (at most ``MAX_STRATA`` in all), and the budget is
spread over the strata in proportion to their size: every region of the embedding space gets its share, no more and
no less, and which rows of a region are taken is drawn at random (seeded). This is stratified sampling with
proportional allocation: unbiased like ``random`` (the selection has the corpus's label mix and topic mix), with a
lower variance, since no draw can over- or under-sample a region by chance.

Why it is the default for labelled rows, and why not facility location there: facility location starts with the
centres of dense regions and spreads out from them, so among the rows of one class it favours typical, easy ones;
a classifier trained on them learns less of the boundary. Measured with ``cli.py compare`` (bench/RESULTS.md, the
compare section): on phrasebank and TweetEval emotion with 20% flipped labels, after dropping ``label_issue`` rows
and with proportional quotas, stratified sampling recovered 91% / 78% (phrasebank, class-weighted / unweighted) and
97% / 72% (emotion) of the oracle's gain over random, facility location 54% / 66% and 43% / 79%.

The order handed to the constraints (label quotas, source caps, a token budget) is a stratified permutation: a row
at position r of its stratum's random permutation (size m) gets the key (r + u) / m, u drawn once per stratum, and
rows are taken by increasing key. Any prefix of that order holds each stratum in proportion to its size (within
one row), so the allocation holds whatever the constraints cut. Cost: k-means on at most 64 sampled rows per centroid
(faiss, 10 iterations) and one assignment pass, O(n d strata); memory O(n).
"""

from __future__ import annotations

import math

import numpy as np

from engine.select.base import Candidates, Picked, Selector, selector
from engine.select.budget import Limits
from kernels.quota import take_in_order

MAX_STRATA = 2048  # k-means centroids over all labels together (each label has at least one, so more labels than
# this give one stratum per label): past it, strata hold more than --strata-rows picks
ASSIGN_BLOCK = 65_536  # rows per assignment block (float32 copies of the float16 embeddings)


def strata_of(emb: np.ndarray, m: int, seed: int) -> np.ndarray:
    """(n,) int64 stratum of each row: spherical k-means with ``m`` centroids (faiss), each row to its nearest."""
    n = emb.shape[0]
    if m <= 1 or n <= m:
        return np.zeros(n, np.int64) if m <= 1 else np.arange(n, dtype=np.int64)
    import faiss

    rng = np.random.default_rng(seed)
    fit = emb[np.sort(rng.choice(n, min(n, 64 * m), replace=False))].astype(np.float32)
    km = faiss.Kmeans(
        emb.shape[1],
        m,
        niter=10,
        seed=seed % 2**31,
        spherical=True,
        max_points_per_centroid=64,
        min_points_per_centroid=1,
    )  # fmt: skip  (seed: faiss takes a C int)
    km.train(fit)
    out = np.empty(n, np.int64)
    for s in range(0, n, ASSIGN_BLOCK):
        _, a = km.index.search(np.ascontiguousarray(emb[s : s + ASSIGN_BLOCK], dtype=np.float32), 1)
        out[s : s + ASSIGN_BLOCK] = a[:, 0]
    return out


def stratified_order(strata: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Positions ordered so that every prefix holds each stratum in proportion to its size (module docstring)."""
    n = strata.shape[0]
    if n == 0:
        return np.zeros(0, np.int64)
    perm = rng.permutation(n)
    by = perm[np.argsort(strata[perm], kind="stable")]  # grouped by stratum, random within
    s = strata[by]
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    u = rng.random(len(starts))
    key = np.empty(n)
    key[by] = (rank + np.repeat(u, sizes)) / np.repeat(sizes, sizes)
    return np.argsort(key, kind="stable").astype(np.int64)


@selector
class Stratified(Selector):
    name = "stratified"
    needs_embeddings = True
    params = ("strata_rows",)
    partitioned = False  # linear in the rows: no GreeDi rounds

    def strata(self, cands: Candidates, k: int) -> np.ndarray:
        """(n,) int64 stratum of each candidate: k-means within each label, never across two."""
        n = len(cands)
        if cands.labels is not None:
            _, group = np.unique(np.asarray(cands.labels).astype(str), return_inverse=True)
        else:
            group = np.zeros(n, np.int64)
        total = max(1, min(MAX_STRATA, math.ceil(k / max(1, self.config.strata_rows))))
        strata = np.zeros(n, np.int64)
        base = 0
        for g in np.unique(group):
            idx = np.flatnonzero(group == g)
            m = max(1, min(len(idx), round(total * len(idx) / max(n, 1))))
            strata[idx] = base + strata_of(cands.emb[idx], m, self.seed)
            base += m
        return strata

    def select(self, cands: Candidates, k: int, limits: Limits, init: np.ndarray | None = None) -> Picked:
        strata = self.strata(cands, k)
        order = stratified_order(strata, np.random.default_rng(self.seed))
        if init is not None and len(init):
            order = order[~np.isin(order, init)]
        picked = take_in_order(order, k, *limits.copy().args())
        info = {"strata": len(np.unique(strata)), "strata_picked": len(np.unique(strata[picked]))}
        return Picked(picked, np.zeros(len(picked)), None, info)
