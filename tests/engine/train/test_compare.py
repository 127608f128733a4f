"""cli.py compare on planted data with a tiny random BERT (embedder and classifier): damage counts exact and marked,
the bootstrap interval covers a known difference and is deterministic, compare.json has every arm, the oracle never
trains on a planted row."""

import json
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import cli
from engine.errors import UserError
from engine.train.bootstrap import batched_metric, paired_bootstrap, share_bootstrap
from engine.train.classify import metrics_of
from engine.train.compare import table as compare_table
from engine.train.compare import val_test_disagreement
from engine.train.corrupt import corrupt, parse_spec

sys.path.insert(0, str(Path(__file__).parent))
from test_classify import WORDS, make_tiny_bert, planted


def pool(n: int = 200) -> pl.DataFrame:
    return planted(n, 0, "p").select(["id", "prompt", "response", "label"])


def test_corrupt_counts_are_exact_and_marked():
    df = pool(200)
    out, counts = corrupt(df, parse_spec("labels=0.2,dups=0.1,junk=0.05"), seed=3)
    assert counts == {"label_flip": 40, "near_dup": 20, "junk": 10}
    assert out.height == 230
    inj = out["injected"].to_list()
    assert inj.count("label_flip") == 40 and inj.count("near_dup") == 20 and inj.count("junk") == 10
    flips = out.filter(pl.col("injected") == "label_flip")
    assert (flips["label"] != flips["clean_label"]).all()  # a flip always changes the class
    untouched = out.filter(pl.col("injected").is_null())
    assert (untouched["label"] == untouched["clean_label"]).all()
    orig = dict(zip(df["id"].to_list(), df["response"].to_list()))
    assert sorted(untouched["pool_id"].to_list() + flips["pool_id"].to_list()) == sorted(orig)
    for row in out.filter(pl.col("injected") == "near_dup").iter_rows(named=True):
        a, b = orig[row["pool_id"]].split(), row["text"].split()
        assert len(a) == len(b) and 1 <= sum(x != y for x, y in zip(a, b)) <= 2  # 1-2 words changed
    junk = out.filter(pl.col("injected") == "junk")
    assert junk["clean_label"].null_count() == 10
    again, _ = corrupt(df, parse_spec("labels=0.2,dups=0.1,junk=0.05"), seed=3)
    assert again.equals(out)  # deterministic per seed


@pytest.mark.parametrize(
    "spec, want",
    [
        ("labels=2", "fraction of the pool"),
        ("flips=0.2", "KIND=FRACTION"),
        ("labels=x", "not a number"),
        ("labels=0.1,labels=0.2", "twice"),
        ("labels", "KIND=FRACTION"),
    ],
)
def test_bad_corrupt_spec(spec, want):
    with pytest.raises(UserError, match=want):
        parse_spec(spec)


def test_bootstrap_covers_a_known_difference_and_is_deterministic():
    rng = np.random.default_rng(0)
    n = 4000
    y = rng.integers(0, 3, n)
    a = np.where(rng.random(n) < 0.80, y, (y + 1) % 3)  # accuracy 0.80 in expectation
    b = np.where(rng.random(n) < 0.70, y, (y + 2) % 3)  # 0.70
    r = paired_bootstrap(y, [a], [b], 3, "accuracy", n_boot=500, seed=1)
    assert r["ci95"][0] < 0.10 < r["ci95"][1]
    assert r["ci95"][1] - r["ci95"][0] < 0.05
    assert paired_bootstrap(y, [a], [b], 3, "accuracy", n_boot=500, seed=1) == r
    f = paired_bootstrap(y, [a], [b], 3, "macro_f1", n_boot=200, seed=1)
    full = metrics_of(y, a, ["0", "1", "2"])["macro_f1"] - metrics_of(y, b, ["0", "1", "2"])["macro_f1"]
    assert f["mean"] == pytest.approx(full)
    assert f["ci95"][0] < full < f["ci95"][1]
    same = paired_bootstrap(y, [a], [a], 3, "macro_f1", n_boot=100, seed=0)
    assert same["mean"] == 0 and same["ci95"] == [0.0, 0.0]


def test_share_of_the_oracle_gain_covers_a_planted_share():
    # planted accuracies: random 0.60, oracle 0.80, arm 0.75 -> the arm recovers (0.75 - 0.60) / (0.80 - 0.60) = 75%
    rng = np.random.default_rng(3)
    n = 6000
    y = rng.integers(0, 3, n)
    u = rng.random(n)  # one uniform per row: the arms err on nested row sets, so the accuracies are exact in-sample
    arm, base, best = (np.where(u < acc, y, (y + 1) % 3) for acc in (0.75, 0.60, 0.80))
    r = share_bootstrap(y, [arm], [base], [best], 3, "accuracy", n_boot=400, seed=0)
    want = ((arm == y).mean() - (base == y).mean()) / ((best == y).mean() - (base == y).mean())
    assert r["share"] == pytest.approx(want) and abs(want - 0.75) < 0.03
    assert r["ci95"][0] < want < r["ci95"][1] and r["ci95"][1] - r["ci95"][0] < 0.1
    assert share_bootstrap(y, [best], [base], [best], 3, "accuracy", n_boot=50)["ci95"] == [1.0, 1.0]
    assert share_bootstrap(y, [base], [base], [best], 3, "accuracy", n_boot=50)["ci95"] == [0.0, 0.0]
    # an oracle that does not beat random: no share, no interval
    nothing = share_bootstrap(y, [arm], [best], [base], 3, "accuracy", n_boot=50)
    assert nothing["share"] is None and nothing["ci95"] is None


def test_batched_macro_f1_equals_metrics_of():
    rng = np.random.default_rng(2)
    y, p = rng.integers(0, 4, 300), rng.integers(0, 4, 300)
    idx = rng.integers(0, 300, (5, 300))
    got = batched_metric(y, p, idx, 4, "macro_f1")
    want = [metrics_of(y[i], p[i], list("abcd"))["macro_f1"] for i in idx]
    assert got == pytest.approx(want)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def report(tiny, tmp_path_factory):
    d = tmp_path_factory.mktemp("compare")
    rows = planted(240, 5, "r").select([pl.col("response").alias("text"), "label"])
    rows.write_parquet(d / "in.parquet")
    out = d / "out"
    mp = pytest.MonkeyPatch()
    mp.setenv("WINNOW_CACHE", str(d / "cache"))  # the head's feature cache, for this module only
    code = cli.main(
        [
            "compare",
            str(d / "in.parquet"),
            "--out",
            str(out),
            "--model",
            tiny,
            "--embedder",
            tiny,
            "--no-token-count",
            "--corrupt",
            "labels=0.2,dups=0.1,junk=0.05",
            "--seeds",
            "2",
            "--full",
            "--raw",
            "--budget",
            "30%",
            "--n-boot",
            "200",
            "--max-steps",
            "60",
            "-q",
        ]
    )
    assert code == 0
    yield out, json.loads((out / "compare.json").read_text())
    mp.undo()


def test_compare_json_has_every_arm(report):
    out, r = report
    assert [a["name"] for a in r["arms"]] == ["winnow", "random", "oracle", "full", "raw"]
    assert r["metric"] == "macro_f1" and r["task"] == "classification"
    pool_rows = r["pool"]["rows"]
    assert r["budget"]["rows"] == round(0.3 * pool_rows)
    for a in r["arms"]:
        assert len(a["runs"]) == 2 and {"macro_f1", "accuracy", "val_macro_f1"} <= set(a["mean"])
        assert "macro_f1" in a["std"] and "val_macro_f1" in a["std"]
        assert a["mean"]["val_macro_f1"] == pytest.approx(np.mean([x["val_macro_f1"] for x in a["runs"]]))
        for run in a["runs"]:
            assert set(run["injected"]) == {"label_flip", "near_dup", "junk"}
            if a["name"] in ("winnow", "random", "oracle"):
                assert run["n"] == r["budget"]["rows"]
    raw = next(a for a in r["arms"] if a["name"] == "raw")
    assert raw["runs"][0]["n"] == pool_rows
    assert raw["runs"][0]["injected"] == r["pool"]["planted"]  # every planted row is in the raw pool
    arms_with_gain = {(g["arm"], g["vs"]) for g in r["gains"]}
    assert arms_with_gain == {
        ("winnow", "random"),
        ("oracle", "random"),
        ("full", "random"),
        ("raw", "random"),
        ("winnow", "full"),
    }
    for g in r["gains"]:
        assert g["ci95"][0] <= g["mean"] <= g["ci95"][1]
    # winnow vs all kept rows is its own paired bootstrap: its mean is the difference of the two gains over random
    # (the same test rows and resamples, macro-F1 being a function of the predictions only)
    by = {(g["arm"], g["vs"], g["metric"]): g["mean"] for g in r["gains"]}
    mean_f1 = {a["name"]: a["mean"]["macro_f1"] for a in r["arms"]}
    assert by[("winnow", "full", "macro_f1")] == pytest.approx(mean_f1["winnow"] - mean_f1["full"], abs=1e-9)
    assert "over all kept rows (full)" in compare_table(r) and "val F1" in compare_table(r)
    ci = r["oracle_gap_recovered_ci95"]  # None only when the tiny oracle's gain is not clearly above zero
    assert ci is None or ci[0] <= r["oracle_gap_recovered"] <= ci[1]
    assert (out / "compare.png").stat().st_size > 1000
    assert sum(v["rows"] for v in r["pool_injected"].values()) == sum(r["pool"]["planted"].values())


def _means(wv, wt, rv, rt):
    return {"arms": [{"name": "winnow", "mean": {"val_macro_f1": wv, "macro_f1": wt}},
                     {"name": "random", "mean": {"val_macro_f1": rv, "macro_f1": rt}}]}  # fmt: skip


def test_a_selection_that_wins_on_validation_and_loses_on_test_is_called_out():
    # TweetEval hate's shape: +1.4 points on the validation rows, -1.6 on the (shifted) test rows.
    note = val_test_disagreement(_means(0.690, 0.454, 0.676, 0.470))
    assert (
        note and "+1.4" in note and "-1.6" in note and "another distribution" in note and "--label-issues keep" in note
    )
    assert val_test_disagreement(_means(0.60, 0.50, 0.70, 0.45)) is not None  # and the other way round
    assert val_test_disagreement(_means(0.690, 0.480, 0.676, 0.470)) is None  # same sign: nothing to say
    assert val_test_disagreement(_means(0.680, 0.465, 0.676, 0.470)) is None  # within a point: noise
    assert val_test_disagreement({"arms": [{"name": "winnow", "mean": {"macro_f1": 0.5}}]}) is None


def test_winnow_selects_once_per_seed_with_that_seed(report):
    out, r = report
    assert r["recipe"]["selection"]["method"] == "stratified"  # the labelled default: a seeded stratified draw
    ids = []
    for s in r["recipe"]["seeds"]:
        man = json.loads((out / "arms" / "winnow" / f"seed{s}" / "selected" / "manifest.json").read_text())
        assert man["seed"] == s and man["label_issues_dropped"] is not None
        ids.append(set(pl.read_parquet(out / "arms" / "winnow" / f"seed{s}" / "selected" / "selected.parquet")["id"]))
    assert ids[0] != ids[1]  # two draws of the method, measured as random's draws are


def test_oracle_never_selects_an_injected_row(report):
    _, r = report
    oracle = next(a for a in r["arms"] if a["name"] == "oracle")
    for run in oracle["runs"]:
        assert run["injected"] == {"label_flip": 0, "near_dup": 0, "junk": 0}
    rnd = next(a for a in r["arms"] if a["name"] == "random")
    assert sum(sum(run["injected"].values()) for run in rnd["runs"]) > 0  # random does draw damaged rows


def test_injected_marks_survive_into_scores(report):
    out, r = report
    scores = pl.read_parquet(sorted((out / "pool" / "scores").glob("part-*.parquet")))
    assert {"injected", "clean_label"} <= set(scores.columns)
    counts = scores["injected"].value_counts()
    got = dict(zip(counts["injected"].to_list(), counts["count"].to_list()))
    assert {k: got.get(k, 0) for k in r["pool"]["planted"]} == r["pool"]["planted"]


def test_labels_of_the_planted_data(report):
    _, r = report
    assert set(r["pool"]["labels"]) == set(WORDS)
