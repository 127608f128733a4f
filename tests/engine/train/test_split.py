"""Leak-free splits: no near-duplicate cluster crosses splits; deterministic per seed; fractions respected."""

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.train.split import assign_splits, split_run


def _ids(n):
    return np.array([f"id{i}" for i in range(n)], dtype=object)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(-1, 30), min_size=1, max_size=300),
    st.sampled_from([(0.8, 0.1, 0.1), (0.5, 0.5), (0.7, 0.2, 0.1), (1.0,), (0.6, 0.0, 0.4)]),
    st.integers(0, 2**32),
)
def test_property_no_cluster_crosses(clusters, fractions, seed):
    c = np.array(clusters, dtype=np.int64)  # -1 = singleton
    ids = _ids(len(c))
    s = assign_splits(ids, c, fractions, seed)
    assert s.shape == c.shape and s.min() >= 0 and s.max() < len(fractions)  # every row in exactly one split
    for k in np.unique(c[c >= 0]):
        assert len(set(s[c == k])) == 1
    # a zero fraction gets nothing
    for i, f in enumerate(fractions):
        if f == 0:
            assert not (s == i).any()
    # determinism, and independence from row order
    assert np.array_equal(s, assign_splits(ids, c, fractions, seed))
    p = np.random.default_rng(seed % 1000).permutation(len(c))
    assert np.array_equal(assign_splits(ids[p], c[p], fractions, seed), s[p])


def test_fractions_met_with_clusters():
    rng = np.random.default_rng(0)
    n = 20000
    c = np.where(rng.random(n) < 0.3, rng.integers(0, 2000, n), -1)  # 30% of rows in clusters of ~3
    s = assign_splits(_ids(n), c, (0.8, 0.1, 0.1), seed=1)
    counts = np.bincount(s, minlength=3) / n
    assert np.allclose(counts, (0.8, 0.1, 0.1), atol=0.002)
    assert not np.array_equal(s, assign_splits(_ids(n), c, (0.8, 0.1, 0.1), seed=2))


def test_null_clusters_and_bad_fractions():
    s = assign_splits(_ids(4), np.array([None, 3, 3, None], dtype=object), (0.5, 0.5), seed=0)
    assert s[1] == s[2]
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(_ids(3), None, (0.5, 0.2))


def test_split_run(tmp_path):
    n = 100
    df = pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "verdict": ["kept"] * 90 + ["near_duplicate"] * 10,
            "minhash_cluster": [i // 5 for i in range(n)],
        }
    )
    counts = split_run(df, tmp_path, (0.8, 0.1, 0.1), seed=3)
    assert sum(counts.values()) == 90
    parts = {k: pl.read_parquet(tmp_path / f"{k}.parquet") for k in counts}
    seen = {}
    for k, p in parts.items():
        for cl in p["minhash_cluster"].unique().to_list():
            assert cl not in seen, f"cluster {cl} in {seen.get(cl)} and {k}"
            seen[cl] = k
