"""Near-duplicate detection: planted clusters, one survivor each, no false merges, rows conserved."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.run.context import MemoryContext
from engine.stages.dedup import SIG, DedupConfig, MinHashStage, NearDedup, near_duplicate_clusters, signature_arrays
from kernels.minhash import minhash


def _planted(n_clusters=60, copies=3, n_single=300, words=200, edits=1, seed=0):
    """Clusters of `copies` edited variants of a base text (Jaccard to the base 0.95, between copies ~0.9: 4+
    standard deviations of the 128-permutation estimate above 0.8) plus unrelated singletons (Jaccard ~0)."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(20000)])
    texts, truth = [], []
    for c in range(n_clusters):
        base = list(rng.choice(vocab, words))
        texts.append(" ".join(base))
        truth.append(c)
        for _ in range(copies):
            d = base.copy()
            for p in rng.choice(words, edits, replace=False):
                d[p] = f"edit{rng.integers(10**9)}"
            texts.append(" ".join(d))
            truth.append(c)
    for c in range(n_clusters, n_clusters + n_single):
        texts.append(" ".join(rng.choice(vocab, words)))
        truth.append(c)
    perm = rng.permutation(len(texts))
    return [texts[i] for i in perm], np.array(truth)[perm]


def _batch(texts, verdicts=None, start=0):
    n = len(texts)
    return pa.record_batch(
        {
            "id": pa.array([f"r{start + i}" for i in range(n)], pa.large_string()),
            "prompt": pa.array(["Rewrite:"] * n, pa.large_string()),
            "response": pa.array(texts, pa.large_string()),
            "row": pa.array(np.arange(n, dtype=np.int64)),
            "verdict": pa.array(verdicts or ["kept"] * n, pa.large_string()),
        }
    )


_RUNS: dict[str, MemoryContext] = {}  # run folder -> its context, for dedup.previous


class _Ctx(MemoryContext):
    """MemoryContext over the map output, with ``previous(dir)`` answered from earlier _run calls."""

    def previous(self, run_dir):
        return _RUNS[str(run_dir)]


def _run(tmp_path, shards, cfg):
    """shards: list of (texts, verdicts) -> (update frame, stats). Goes through the stage classes and the global
    context interface, as a runner would."""
    stage = MinHashStage(cfg)
    tables = []
    for s, (texts, verdicts) in enumerate(shards):
        b = _batch(texts, verdicts)
        half = len(texts) // 2
        out = [stage.process(b.slice(0, half)), stage.process(b.slice(half))]
        assert sum(o.num_rows for o in out) == len(texts)
        t = pa.Table.from_batches(out)
        tables.append(t.append_column("_shard", pa.array(np.full(len(texts), s, np.int32))))
    ctx = _Ctx(pa.concat_tables(tables))
    g = NearDedup(cfg)
    upd = g.run(ctx)
    if upd is not None:  # the run as a later run sees it: its final verdicts
        ctx.apply_verdicts(upd)
    _RUNS[str(tmp_path)] = ctx
    return upd, g.stats


@pytest.mark.parametrize("verify", ["signature", "exact"])
def test_one_survivor_per_planted_cluster(tmp_path, verify):
    texts, truth = _planted()
    upd, stats = _run(tmp_path, [(texts, None)], DedupConfig(verify=verify))
    upd = upd.sort("row")
    in_cluster = np.bincount(truth)[truth] >= 2
    # every row of a planted cluster takes part, each once; singletons get no update (null minhash_cluster)
    assert upd["row"].to_list() == list(np.flatnonzero(in_cluster))
    truth = truth[in_cluster]
    cl = upd["minhash_cluster"].to_numpy()
    kept = upd["verdict"].is_null().to_numpy()  # survivors: no verdict change
    for c in np.unique(truth):
        members = truth == c
        assert len(set(cl[members])) == 1, f"planted cluster {c} split"
        assert kept[members].sum() == 1, f"planted cluster {c} has {kept[members].sum()} survivors"
    # no false merges: distinct planted clusters never share a MinHash cluster
    assert len(np.unique(cl)) == len(np.unique(truth)) == 60
    dup = upd.filter(pl.col("verdict") == "near_duplicate")
    assert dup.height == 60 * 3 == stats["near_duplicate"]
    # duplicate_of names the kept row of the same cluster
    surv = upd.filter(pl.col("verdict").is_null())
    kept_ids = dict(zip(surv["minhash_cluster"], surv["row"]))
    for row in dup.iter_rows(named=True):
        assert row["duplicate_of"] == f"r{kept_ids[row['minhash_cluster']]}"
        assert row["detail"].startswith("minhash J~")


def test_across_shards_and_rejected_rows_not_judged(tmp_path):
    a = "the cat sat on the mat and looked out of the window at the rain falling on the garden"
    b = a.replace("rain", "snow")
    c = a.replace("garden", "street")
    other = "completely different text about numbers and their properties in modern mathematics today"
    shards = [([a, other], ["kept", "kept"]), ([b, c], ["too_short", "kept"])]
    upd, _ = _run(tmp_path, shards, DedupConfig(threshold=0.6))
    # b (rejected earlier) takes no part; a and c cluster across shards; exactly one of them survives
    assert upd.filter((pl.col("_shard") == 1) & (pl.col("row") == 0)).height == 0
    pair = upd.filter(
        ((pl.col("_shard") == 0) & (pl.col("row") == 0)) | ((pl.col("_shard") == 1) & (pl.col("row") == 1))
    )
    assert sorted(pair["verdict"].fill_null("kept").to_list()) == ["kept", "near_duplicate"]
    assert pair["minhash_cluster"].n_unique() == 1
    assert upd.filter((pl.col("_shard") == 0) & (pl.col("row") == 1)).height == 0  # a singleton: no update


def test_quality_key_picks_survivor():
    base = " ".join(f"word{i}" for i in range(60))
    texts = [base, base + " extra", base + " extra tail"]
    sig = minhash(pa.array(texts))
    # longer response wins when violations tie
    r = near_duplicate_clusters(sig, threshold=0.8, resp_len=np.array([10, 30, 20]))
    assert list(r.survivor) == [1, 1, 1]
    # fewer violations beats length
    r = near_duplicate_clusters(sig, threshold=0.8, resp_len=np.array([10, 30, 20]), violations=np.array([0, 2, 1]))
    assert list(r.survivor) == [0, 0, 0]
    # full tie: earliest
    r = near_duplicate_clusters(sig, threshold=0.8)
    assert list(r.survivor) == [0, 0, 0]
    # not kept: out
    r = near_duplicate_clusters(sig, np.array([True, False, True]), threshold=0.8)
    assert list(r.survivor) == [0, -1, 0]


def test_previous_run_rows_win(tmp_path):
    texts, _truth = _planted(n_clusters=5, copies=1, n_single=5)
    _first, _ = _run(tmp_path / "run1", [(texts[:10], None)], DedupConfig())
    cfg = DedupConfig(previous=[str(tmp_path / "run1")])
    upd, _ = _run(tmp_path / "run2", [(texts, None)], cfg)
    # every row of run 2 that equals a run-1 row is a near duplicate of it (run 1's copy is already kept)
    upd = upd.sort("row")
    assert (upd["verdict"][:10] == "near_duplicate").all()
    assert set(upd["duplicate_of"][:10].to_list()) <= {f"r{i}" for i in range(10)}
    # rows of run 1 never appear in run 2's update; run 2's first 10 rows pair with run 1's copies (5 clusters of 2
    # there), the other 10 are each other's copies or singletons
    assert upd["row"].max() < len(texts) and upd.height >= 10


def test_signature_arrays_and_work_columns():
    texts, _ = _planted(n_clusters=3, copies=1, n_single=4)
    stage = MinHashStage(DedupConfig(verify="exact"))
    out = stage.process(_batch(texts))
    assert out.num_rows == len(texts) and {SIG, "minhash_resp_len", "minhash_shingles"} <= set(out.schema.names)
    t = pa.Table.from_batches([out]).append_column("_shard", pa.array(np.zeros(len(texts), np.int32)))
    got = signature_arrays(t, with_shingles=True)
    assert got["sig"].shape == (len(texts), 128)
    assert np.array_equal(got["sig"], stage.signatures(_batch(texts)))
    off = got["shingle_offsets"]
    assert off[-1] == got["shingles"].size and (np.diff(off) > 0).all()


def test_bands_config():
    assert DedupConfig().bands() == (16, 8)
    assert DedupConfig(num_bands=4, rows_per_band=4).bands() == (4, 4)
    with pytest.raises(ValueError, match="num_perm"):
        DedupConfig(num_bands=20, rows_per_band=8).bands()


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=40), st.lists(st.booleans(), min_size=40, max_size=40))
def test_property_conservation(groups, kept_flags):
    """Any mix of exact copies: each kept row is a survivor or points at a kept survivor of its own group."""
    texts = [f"group {g} " + " ".join(f"t{g}x{i}" for i in range(12)) for g in groups]
    kept = np.array(kept_flags[: len(texts)])
    r = near_duplicate_clusters(minhash(pa.array(texts)), kept, threshold=0.8)
    s = r.survivor
    assert ((s >= 0) == kept).all()
    g = np.array(groups)
    for i in np.flatnonzero(kept):
        assert s[s[i]] == s[i] and g[s[i]] == g[i] and kept[s[i]]
    # exactly one survivor per group among kept rows
    for grp in set(g[kept]):
        assert len(set(s[(g == grp) & kept])) == 1


def test_dedup_text_skips_empty_side():
    from engine.stages.dedup import dedup_text

    b = _batch(["alpha beta gamma delta epsilon zeta", "eta theta iota kappa lambda mu"])
    empty_prompt = b.set_column(b.schema.get_field_index("prompt"), "prompt", pa.array(["", ""], pa.large_string()))
    assert dedup_text(empty_prompt, "prompt_response").equals(empty_prompt.column("response"))
    joined = dedup_text(b, "prompt_response")
    assert joined[0].as_py() == "Rewrite:\nalpha beta gamma delta epsilon zeta"
    # the skipped join shingles exactly like the joined "\n" + response would
    with_nl = pa.array(["\n" + t for t in empty_prompt.column("response").to_pylist()], pa.large_string())
    assert np.array_equal(minhash(with_nl), minhash(empty_prompt.column("response")))


def test_with_runner(tmp_path):
    """Through engine.run.local.score: work columns, the context, the update contract, two shards, conservation."""
    import pyarrow.parquet as pq

    import engine.run.local as runner
    from engine.config import Config

    texts, truth = _planted(n_clusters=20, copies=2, n_single=60)
    half = len(texts) // 2
    for s, (lo, hi) in enumerate(((0, half), (half, len(texts)))):
        pq.write_table(
            pa.table(
                {
                    "instruction": [f"Item {i % 3}" for i in range(lo, hi)],
                    "input": [""] * (hi - lo),
                    "output": texts[lo:hi],
                    "id": [f"x{i}" for i in range(lo, hi)],
                }
            ),
            tmp_path / f"in{s}.parquet",
        )
    cfg = Config()
    cfg.run.workers = 1
    cfg.exact.enabled = False
    cfg.embed.embedder = "none"
    manifest = runner.score([str(tmp_path / "in0.parquet"), str(tmp_path / "in1.parquet")], tmp_path / "out", cfg)
    assert manifest["stages_run"]["global"] == ["near_dedup"]
    df = pl.read_parquet(tmp_path / "out" / "scores" / "*.parquet").sort("id")
    # the signatures went to the global phase through work/, never into scores/
    assert not any(c.startswith("minhash_") and c != "minhash_cluster" for c in df.columns)
    assert df.height == len(texts) == manifest["rows_in"]
    order = np.argsort([f"x{i}" for i in range(len(texts))])
    t = truth[order]
    v = df["verdict"].to_numpy()
    cl = df["minhash_cluster"].to_numpy()
    for c in np.unique(t):
        assert (v[t == c] == "kept").sum() == 1 and len(set(cl[t == c])) == 1
    assert (v == "near_duplicate").sum() == 20 * 2
