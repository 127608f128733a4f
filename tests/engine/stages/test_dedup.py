"""Near-duplicate detection: planted clusters, one survivor each, no false merges, rows conserved; short texts
(word-set path, tiny rows, star split) and the hybrid check against exact Jaccard."""

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.run.context import MemoryContext
from engine.stages.dedup import (
    KIND,
    SIG,
    DedupConfig,
    MinHashStage,
    NearDedup,
    near_duplicate_clusters,
    signature_arrays,
)
from kernels.minhash import KIND_TINY, KIND_WORD, minhash, normalize_reference


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


def _batch(texts, verdicts=None, start=0, prompt="Rewrite:"):
    n = len(texts)
    return pa.record_batch(
        {
            "id": pa.array([f"r{start + i}" for i in range(n)], pa.large_string()),
            "prompt": pa.array([prompt] * n, pa.large_string()),
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


def _run(tmp_path, shards, cfg, prompt="Rewrite:"):
    """shards: list of (texts, verdicts) -> (update frame, stats). Goes through the stage classes and the global
    context interface, as a runner would (the hybrid check re-reads text through the context)."""
    stage = MinHashStage(cfg)
    tables = []
    for s, (texts, verdicts) in enumerate(shards):
        b = _batch(texts, verdicts, prompt=prompt)
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


@pytest.mark.parametrize("verify", ["hybrid", "signature", "exact"])
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
    (tmp_path / "run1" / "scores").mkdir(parents=True)  # dedup.previous must name a run folder (validate)
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
    assert out.num_rows == len(texts) and {SIG, "minhash_resp_len", "minhash_shingles", KIND} <= set(out.schema.names)
    assert set(out.column(KIND).to_pylist()) == {KIND_WORD}  # 200-word rows: the word 5-gram path
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
    # ids are "<shard prefix>-<row>" now; the input's own id column is kept as orig_id
    df = pl.read_parquet(tmp_path / "out" / "scores" / "*.parquet").sort("orig_id")
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


# ----------------------------------------------------------------------------------------------------------------
# Short texts: the word-set path
# ----------------------------------------------------------------------------------------------------------------

_STOP = [f"s{i}" for i in range(30)]  # a few very common words, shared by most texts


def _short_text(rng, k):
    return [_STOP[rng.integers(30)] if rng.random() < 0.35 else f"w{rng.integers(200000)}" for _ in range(k)]


def _edit(rng, w, n_edits):
    w = list(w)
    for _ in range(n_edits):
        op, pos = int(rng.integers(3)), int(rng.integers(len(w)))
        if op == 0 or (op == 2 and len(w) <= 10):
            w[pos] = f"e{rng.integers(10**9)}"
        elif op == 1:
            w.insert(pos, f"e{rng.integers(10**9)}")
        else:
            del w[pos]
    return w


def _word_sets_rule(a: str, b: str, cfg: DedupConfig) -> bool:
    """The short path's rule on two texts, from the Python reference normalisation (an independent check)."""
    wa, wb = normalize_reference(a).split(" "), normalize_reference(b).split(" ")
    sa, sb = set(wa), set(wb)
    inter, union = len(sa & sb), len(sa | sb)
    tiny = min(len(wa), len(wb)) < cfg.tiny_words
    md = cfg.tiny_max_diff if tiny else cfg.short_max_diff
    return inter / union >= cfg.short_threshold and union - inter <= md


def _short_planted(seed=0, n_fam=60, n_tmpl=40, n_single=200):
    """Near-copy families (a 10-40 word source and 1-2 copies, each 1-2 word edits away), template families
    (3 texts sharing a template with 40-60% of its words replaced: distinct texts) and unrelated texts."""
    rng = np.random.default_rng(seed)
    texts, fam, kind = [], [], []
    for f in range(n_fam):
        base = _short_text(rng, int(rng.integers(10, 41)))
        group = [base] + [_edit(rng, base, int(rng.integers(1, 3))) for _ in range(int(rng.integers(1, 3)))]
        texts += group
        fam += [f] * len(group)
        kind += ["copy"] * len(group)
    f = n_fam
    for _ in range(n_tmpl):
        base = _short_text(rng, int(rng.integers(12, 41)))
        for _ in range(3):
            w = list(base)
            for pos in rng.choice(len(w), max(3, round(rng.uniform(0.4, 0.6) * len(w))), replace=False):
                w[pos] = f"t{rng.integers(10**9)}"
            texts.append(w)
            fam.append(f)
            kind.append("template")
            f += 1
    for _ in range(n_single):
        texts.append(_short_text(rng, int(rng.integers(10, 41))))
        fam.append(f)
        kind.append("single")
        f += 1
    perm = rng.permutation(len(texts))
    return [" ".join(texts[i]) for i in perm], np.array(fam)[perm], np.array(kind)[perm]


@pytest.mark.parametrize("verify", ["hybrid", "exact"])
def test_short_near_copies_found_templates_not_merged(tmp_path, verify):
    texts, fam, kind = _short_planted()
    cfg = DedupConfig(verify=verify)
    upd, stats = _run(tmp_path, [(texts, None)], cfg, prompt="")
    assert stats["short_rows"] == len(texts)
    cl = np.full(len(texts), -1)
    dup_of = {}
    if upd is not None:
        for r in upd.iter_rows(named=True):
            cl[r["row"]] = r["minhash_cluster"]
            if r["verdict"] == "near_duplicate":
                dup_of[r["row"]] = int(r["duplicate_of"][1:])
    # no false merge: a cluster never spans two planted families, templates and singletons are never touched
    for c in set(cl[cl >= 0]):
        assert len(set(fam[cl == c])) == 1, texts_of(texts, cl == c)
    assert (cl[kind != "copy"] == -1).all()
    # planted families found (LSH at J ~0.6 misses a pair with probability ~0.01): >= 95% in one cluster
    fams = set(fam[kind == "copy"])
    whole = sum(1 for f in fams if len(set(cl[fam == f])) == 1 and cl[fam == f][0] >= 0)
    assert whole >= 0.95 * len(fams), (whole, len(fams))
    # every removed row meets the rule with the row it names as duplicate_of (the star split guarantees it)
    for r, s in dup_of.items():
        assert _word_sets_rule(texts[r], texts[s], cfg), (texts[r], texts[s])


def texts_of(texts, mask):
    return [t for t, m in zip(texts, mask) if m]


def test_distinct_short_texts_sharing_words_not_merged(tmp_path):
    # one template, three fills that change 3+ of 12 words: 3 words differ each way, more than short_max_diff / 2
    t = "just watched the new {} at the {} with my {} and it was {}"
    texts = [
        t.format("movie", "cinema", "sister", "great"),
        t.format("episode", "house", "friends", "awful"),
        t.format("show", "park", "dad", "fine"),
    ]
    # and shared stock phrases with different content
    texts += [
        "happy birthday to my best friend hope you have the best day ever love you",
        "happy birthday to the best coach in the world thank you for everything this year",
    ]
    upd, _ = _run(tmp_path, [(texts, None)], DedupConfig(), prompt="")
    assert upd is None or upd.filter(pl.col("verdict") == "near_duplicate").height == 0


def test_tiny_rows_allow_one_inserted_word_only(tmp_path):
    texts = [
        "What is the capital of France?",
        "What is the capital of Spain?",  # one substitution: distinct
        "Translate this sentence into German please",
        "Translate this sentence into German now please",  # +1
        "Name a fruit.",
        "Name a fruit!",
    ]  # 3 words: character shingles, equal after normalisation
    upd, _ = _run(tmp_path, [(texts, None)], DedupConfig(), prompt="")
    _sig, kind = MinHashStage(DedupConfig()).signatures(_batch(texts, prompt=""), return_kind=True)
    assert list(kind[:4]) == [KIND_TINY] * 4
    dup = sorted(upd.filter(pl.col("verdict") == "near_duplicate")["row"].to_list())
    assert dup == [2, 5]  # the longer of 2/3 survives (resp_len); 4/5 are equal after normalisation: earliest wins


def test_short_chain_is_split_into_stars(tmp_path):
    """A chain t0 - t1 - ... - t5, each step two substituted words (4 differing words: within the rule), whose ends
    differ by 20 words: union-find joins it whole; the star split leaves every removed row within the rule of the
    row it names, so the chain becomes two or more clusters."""
    rng = np.random.default_rng(3)
    w = [f"c{i}" for i in range(20)]
    chain = [list(w)]
    for k in range(5):
        w = list(w)
        for p in (2 * k, 2 * k + 1):
            w[p] = f"n{k}x{p}"
        chain.append(w)
    texts = [" ".join(c) for c in chain] + [" ".join(_short_text(rng, 15)) for _ in range(10)]
    cfg = DedupConfig()
    upd, stats = _run(tmp_path, [(texts, None)], cfg, prompt="")
    dup = upd.filter(pl.col("verdict") == "near_duplicate")
    for r in dup.iter_rows(named=True):
        assert _word_sets_rule(texts[r["row"]], texts[int(r["duplicate_of"][1:])], cfg)
    chain_clusters = set(upd.filter(pl.col("row") < 6)["minhash_cluster"].to_list())
    assert len(chain_clusters) >= 2 and stats["star_splits"] >= 1
    assert set(upd["row"].to_list()) <= set(range(6))  # the unrelated rows are untouched


def test_hybrid_agrees_with_exact_near_the_threshold(tmp_path):
    """Pairs spread over J ~0.65-0.95 around the 0.8 threshold: the hybrid check (estimate, exact sets for pairs
    within 3 std) makes the decisions exact verification makes; the estimate alone gets some wrong."""
    rng = np.random.default_rng(5)
    texts = []
    for _ in range(80):
        base = [f"v{x}" for x in rng.integers(0, 10**6, 150)]
        texts.append(" ".join(base))
        d = list(base)
        for p in rng.choice(150, int(rng.integers(1, 7)), replace=False):
            d[p] = f"z{rng.integers(10**9)}"
        texts.append(" ".join(d))
    got = {}
    for verify in ("hybrid", "exact", "signature"):
        upd, stats = _run(tmp_path / verify, [(texts, None)], DedupConfig(verify=verify), prompt="")
        got[verify] = sorted(upd.filter(pl.col("verdict") == "near_duplicate")["row"].to_list())
        if verify == "hybrid":
            assert stats["undecided"] > 0 and stats["checked_on_sets"] > 0
    assert got["hybrid"] == got["exact"]
    assert got["signature"] != got["exact"]  # the corpus does exercise the estimate's noise


def test_classification_rows_near_dedup_on_text(tmp_path):
    """Through the runner: classification rows are compared on their text (the response is the text now), so a
    tweet and its copy with one word changed are near duplicates whatever their labels; texts sharing only a
    template are not."""
    import pyarrow.parquet as pq

    import engine.run.local as runner
    from engine.config import Config

    texts = [
        "cannot believe how good the coffee is at the new place on main street this morning",
        "cannot believe how good the coffee is at the new place on main street this evening",
        "cannot believe how bad the traffic was on the bridge going into town after work",
        "my cat knocked every single plant off the windowsill again while i was asleep",
    ]
    pq.write_table(pa.table({"text": texts, "label": [2, 0, 1, 1]}), tmp_path / "cls.parquet")
    cfg = Config()
    cfg.run.workers = 1
    cfg.embed.embedder = "none"
    runner.score([str(tmp_path / "cls.parquet")], tmp_path / "out", cfg)
    df = pl.read_parquet(tmp_path / "out" / "scores" / "*.parquet").sort("row")
    assert df["verdict"].to_list() == ["kept", "near_duplicate", "kept", "kept"]
    assert df["duplicate_of"][1] == df["id"][0]
    assert df["label"].to_list() == ["2", "0", "1", "1"]
