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


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    make_demo(d, n_alpaca=240, n_chat=90, n_sharegpt=12, n_cls=60)  # n_chat >= 84 (its planted copies)
    return d


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
    for col in ("id", "verdict", "detail", "duplicate_of", "source", "row", "format", "content_hash", "label"):
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
    assert m["timings"]["shards_reused"] == 2 and m["timings"]["shards_done"] == 2
    a, b = _scores(runs["local"]), _scores(out)
    for col in ("id", "verdict", "duplicate_of"):
        assert a[col].equals(b[col]), col
    # a changed map-stage option makes every finished shard stale (the local runner's resume key)
    cfg.rules.min_response_chars = 5
    m2 = score([str(demo / "input")], out, cfg)
    assert m2["timings"]["shards_reused"] == 0 and m2["timings"]["shards_done"] == 4
