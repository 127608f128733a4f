"""--engine ray against --engine local on a slice of the demo corpus: the same ids, verdicts, duplicate_of and
selected ids, scores within float tolerance; a killed Ray run resumes with only its unfinished shards.

Ray starts once for the module (a local instance, 2 CPUs, RAY_AUTH_MODE=disabled); the commands find it running
and use it (engine.run.ray.session)."""

import json
import os

import numpy as np
import polars as pl
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

import cli
from engine.config import Config
from engine.io.demo import make_demo

ARGS = ["--embedder", "static", "--no-loss", "-q"]
SELECT = ["--method", "facility", "--budget", "60", "--partitions", "3", "-q"]


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    for attempt in range(3):  # Ray waits 30 s for its raylet; on a loaded machine a first start can miss that
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, object_store_memory=512 << 20)
            break
        except Exception as e:  # ray raises a bare Exception for this
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == 2:
                raise
    yield
    ray.shutdown()


def _near_copies(seed: int = 0) -> list[str]:
    """Planted near duplicates for every banding path: 40 one-word edits of one 60-word document (a band bucket
    over ``bucket_all_pairs`` = 32 rows: the star + chain path, whose pairs depend on the order inside the bucket),
    clusters of 20-word rows with 1-2 substituted words (the short path and its star split), 7-word rows with one
    word inserted (tiny), and unrelated rows."""
    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(3000)]

    def words(k):
        return list(rng.choice(vocab, k))

    def edit(ws, k, lo=0):
        ws = list(ws)
        for _ in range(k):
            ws[int(rng.integers(lo, len(ws)))] = str(rng.choice(vocab))
        return ws

    base = words(60)
    out = [" ".join(base)] + [" ".join(edit(base, 1, 52)) for _ in range(100)]
    out += [" ".join(edit(base, 4, 40)) for _ in range(12)]
    for _ in range(6):  # chains of 2-word edits: the short path's clusters chain, the star split cuts them
        s = words(20)
        out.append(" ".join(s))
        for _ in range(5):
            s = edit(s, 2)
            out.append(" ".join(s))
    for _ in range(6):
        t = words(7)
        out += [" ".join(t), " ".join(t[:3] + ["also"] + t[3:])]
    out += [" ".join(words(int(rng.integers(5, 80)))) for _ in range(60)]
    return out


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_alpaca=240, n_chat=90, n_sharegpt=12, n_cls=60)  # n_chat >= 84 (its planted copies)
    rows = [{"instruction": "Summarize this note.", "output": t} for t in _near_copies()]
    (d / "input" / "near.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def test_band_passes_in_pieces_equal_near_duplicate_clusters():
    """The Ray engine's near dedup, without Ray: band keys per block, candidate pairs per partition of the band
    buckets, replayed on one node, give ``near_duplicate_clusters``' survivors, estimates and every counter."""
    import pyarrow as pa

    from engine.stages.dedup import (
        DedupConfig,
        band_records,
        bucket_pairs,
        near_duplicate_clusters,
        pair_equal_counts,
        replay_candidates,
    )
    from kernels.minhash import minhash, shingle_sets

    cfg = DedupConfig()
    texts = pa.array(_near_copies(1) * 1, pa.large_string())
    sig, kind = minhash(texts, return_kind=True, **cfg.shingle_kwargs())
    n, p = sig.shape
    kept = np.ones(n, bool)
    kept[5] = False  # a row another stage rejected takes no part
    resp_len = np.arange(n) % 5  # ties on purpose: the index decides among them
    main, short = cfg.rules()

    def exact_sets(rows):
        return shingle_sets(texts.take(pa.array(rows)), **cfg.shingle_kwargs())

    ref = near_duplicate_clusters(sig, kept, threshold=main.threshold, num_bands=main.num_bands,
                                  rows_per_band=main.rows_per_band, resp_len=resp_len, margin=main.margin, kind=kind,
                                  short=short, exact_sets=exact_sets)  # fmt: skip
    assert ref.stats["near_duplicates"] > 100 and ref.stats["star_splits"] > 0 and ref.stats["short_rows"] > 30
    blocks = [(0, 17), (17, 90), (90, n)]
    recs = [band_records(sig[a:b], kept[a:b], kind[a:b], [main, short], a) for a, b in blocks]
    rec = {k: np.concatenate([r[k] for r in recs]) for k in recs[0]}
    parts = []
    for q in range(3):  # three groupby partitions, as Ray Data would hand them over
        sel = rec["key"] % np.uint64(3) == q
        parts.append(
            bucket_pairs(rec["g"][sel], rec["j"][sel], rec["key"][sel], rec["row"][sel], cfg.bucket_all_pairs)
        )
    pairs = {k: np.concatenate([x[k] for x in parts]) for k in parts[0]}
    pairs["eq"] = pair_equal_counts(sig, pairs["a"], pairs["b"])
    got = replay_candidates(
        n,
        pairs,
        kept,
        kind,
        [main, short],
        p,
        True,
        np.zeros(n),
        np.zeros(n),
        resp_len,
        exact_sets,
        lambda a, b: (pair_equal_counts(sig, a, b) / p).astype(np.float32),
    )
    assert np.array_equal(got.survivor, ref.survivor)
    assert np.array_equal(got.est_jaccard, ref.est_jaccard, equal_nan=True)
    assert got.stats == ref.stats


@pytest.fixture(scope="module")
def runs(ray_local, demo, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for engine in ("local", "ray"):
        o = root / engine
        workers = "1" if engine == "local" else "2"
        argv = ["score", str(demo / "input"), "--out", str(o), "--engine", engine, "--workers", workers, *ARGS]
        assert cli.main(argv) == 0
        assert cli.main(["select", str(o), "--out", str(o / "selected"), "--engine", engine, *SELECT]) == 0
        out[engine] = o
    return out


def _scores(out):
    return pl.concat(
        [pl.read_parquet(f) for f in sorted((out / "scores").glob("part-*.parquet"))], how="diagonal_relaxed"
    ).sort("id")


def test_ray_scores_equal_local(runs):
    a, b = _scores(runs["local"]), _scores(runs["ray"])
    assert a.height == b.height > 400 and a.columns == b.columns
    for col in (
        "id",
        "verdict",
        "detail",
        "duplicate_of",
        "source",
        "row",
        "format",
        "content_hash",
        "label",
        "minhash_cluster",
        "label_issue",
    ):
        assert a[col].equals(b[col]), col
    assert set(a["verdict"]) >= {"kept", "exact_duplicate", "near_duplicate", "malformed"}  # the planted faults
    for col in a.columns:
        dt = a[col].dtype
        if dt.is_float():
            assert np.allclose(a[col].to_numpy(), b[col].to_numpy(), rtol=1e-5, atol=1e-6, equal_nan=True), col
        elif isinstance(dt, pl.Array):
            assert a[col].null_count() == b[col].null_count()
            x, y = a[col].drop_nulls(), b[col].drop_nulls()
            assert np.allclose(np.stack(x.to_list()), np.stack(y.to_list()), atol=1e-3), col
        elif dt.is_integer():
            assert a[col].equals(b[col]), col
    ma, mb = (json.loads((runs[e] / "manifest.json").read_text()) for e in ("local", "ray"))
    assert mb["engine"] == "ray" and "engine" not in ma
    # near dedup's band buckets and the label-noise folds ran on Ray; the planted near copies were found
    assert mb["ray"]["label_folds_ran_on_ray"] >= 2 and mb["stages"]["label_noise"]["rows_scored"] > 0
    assert "band buckets" in mb["ray"]["distributed"] and mb["stages"]["near_dedup"]["star_splits"] > 0
    assert (a.filter(a["source"].str.contains("near"))["verdict"] == "near_duplicate").sum() > 100
    assert ma["verdicts"] == mb["verdicts"] and ma["rows_in"] == mb["rows_in"]
    for name, stats in ma["stages"].items():  # the same counters, map stages summed over Ray blocks
        strip = lambda d: {k: v for k, v in d.items() if k != "seconds"}
        assert strip(stats) == strip(mb["stages"][name]), name
    assert [i["rows"] for i in ma["inputs"]] == [i["rows"] for i in mb["inputs"]]


def test_ray_selection_equals_local(runs):
    sa, sb = (json.loads((runs[e] / "selected" / "manifest.json").read_text()) for e in ("local", "ray"))
    assert sb["method_info"]["partitions_ran_on"] == "ray" and sb["method_info"]["partitions"] == 3
    assert "partitions_ran_on" not in sa["method_info"]
    ids = [pl.read_parquet(runs[e] / "selected" / "selected.parquet")["id"].to_list() for e in ("local", "ray")]
    assert len(ids[0]) == 60 and ids[0] == ids[1]


def test_killed_ray_run_redoes_only_unfinished_shards(ray_local, demo, runs, tmp_path, monkeypatch):
    cfg = Config()
    cfg.run.engine = "ray"
    cfg.embed.embedder = "static"
    cfg.loss.enabled = "off"
    from engine.run.ray import score

    out = tmp_path / "run"
    monkeypatch.setenv("WINNOW_CRASH_AFTER_SHARDS", "2")
    with pytest.raises(RuntimeError, match="simulated crash"):
        score([str(demo / "input")], out, cfg)
    done = sorted(p.name for p in (out / "work" / "map").glob("done-*.json"))
    assert len(done) == 2 and not (out / "manifest.json").exists()
    monkeypatch.delenv("WINNOW_CRASH_AFTER_SHARDS")
    m = score([str(demo / "input")], out, cfg)
    assert m["timings"]["shards_reused"] == 2 and m["timings"]["shards_done"] == 3
    a, b = _scores(runs["local"]), _scores(out)
    for col in ("id", "verdict", "duplicate_of"):
        assert a[col].equals(b[col]), col
    # a changed map-stage option makes every finished shard stale: the Ray runner's start is the local runner's
    # (engine.run.local.open_map: the same resume key), checked here without a third Ray run
    import copy

    from engine.io.readers import discover
    from engine.run.local import open_map

    def pending(c):
        return open_map(discover([str(demo / "input")], exclude=str(out))[0], out, copy.deepcopy(c))[4]

    assert pending(cfg) == []
    cfg.rules.min_response_chars = 5
    assert pending(cfg) == [0, 1, 2, 3, 4]
