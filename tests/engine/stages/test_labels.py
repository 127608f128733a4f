"""engine/stages/labels.py: planted label flips are found; scores are out-of-fold; confident-learning counts by hand."""


import numpy as np
import polars as pl
import pytest

from engine.run.context import MemoryContext
from engine.stages.labels import LabelNoise, LabelNoiseConfig, confident_joint, find_label_issues, label_noise_scores


def separable(n=600, k=3, d=16, flips=60, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 3
    y = rng.integers(0, k, n)
    x = centres[y] + rng.normal(size=(n, d))
    flipped = rng.choice(n, flips, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, k, flips)) % k
    truth = np.zeros(n, bool)
    truth[flipped] = True
    return x.astype(np.float32), noisy, truth


def test_flipped_labels_found():
    x, noisy, truth = separable()
    names = np.array(["neg", "neu", "pos"])[noisy]
    r = label_noise_scores(x, names)
    issue = r["label_issue"]
    tp = (issue & truth).sum()
    assert tp / truth.sum() >= 0.9, f"recall {tp / truth.sum():.2f}"
    assert tp / max(1, issue.sum()) >= 0.9, f"precision {tp / issue.sum():.2f}"
    assert np.nanmean(r["label_quality"][truth]) < 0.2
    assert np.nanmean(r["label_quality"][~truth]) > 0.8
    assert list(r["classes"]) == ["neg", "neu", "pos"]


def test_scores_are_out_of_fold():
    # Pure noise: 200 rows, 300 dims, random labels. A model scoring rows it trained on memorises them
    # (p[given] near 1); held-out rows can only be scored near chance (1/2).
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 300)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    r = label_noise_scores(x, y, n_folds=5, C=10.0)
    assert 0.3 < np.nanmean(r["label_quality"]) < 0.65
    from sklearn.linear_model import LogisticRegression

    in_sample = LogisticRegression(C=10.0, max_iter=300).fit(x, y).predict_proba(x)[np.arange(200), y]
    assert in_sample.mean() > 0.9  # the leak the K-fold split prevents


def test_per_row_definitions():
    x, noisy, _ = separable(n=120, flips=10, seed=2)
    r = label_noise_scores(x, noisy)
    p, y = r["probs"], r["label_index"]
    py = p[np.arange(len(y)), y]
    other = np.where(np.eye(3)[y] == 1, -np.inf, p).max(1)
    assert np.allclose(r["label_quality"], py)
    assert np.allclose(r["label_loss"], -np.log(py))
    assert np.allclose(r["label_margin"], py - other)
    assert np.allclose(r["label_el2n"], np.linalg.norm(p - np.eye(3)[y], axis=1))
    assert np.allclose(p.sum(1), 1.0)


def test_confident_joint_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8], [0.1, 0.9], [0.3, 0.7], [0.6, 0.4]])
    # thresholds: class 0 mean p0 over given-0 rows = (0.9+0.8+0.2)/3 = 0.633; class 1: (0.9+0.7+0.4)/3 = 0.667
    # row 2 (given 0): p1 = 0.8 >= 0.667 -> guess 1; row 5 (given 1): p0 = 0.6 < 0.633 and p1 = 0.4 < 0.667
    # -> no confident class. Raw joint: [[2, 1], [0, 2]]; calibrated to class counts 3 / 3: [[2, 1], [0, 3]].
    cj, guess = confident_joint(labels, probs)
    assert guess.tolist() == [0, 0, 1, 1, 1, -1]
    assert cj.tolist() == [[2, 1], [0, 3]]
    assert find_label_issues(labels, probs).tolist() == [False, False, True, False, False, False]


def test_matches_cleanlab_when_installed():
    cleanlab = pytest.importorskip("cleanlab")
    from cleanlab.filter import find_label_issues as cl_find

    x, noisy, _ = separable(n=400, flips=40, seed=4)
    r = label_noise_scores(x, noisy)
    ours = r["label_issue"]
    theirs = cl_find(r["label_index"], r["probs"], filter_by="prune_by_noise_rate")
    assert cleanlab is not None and (ours == theirs).mean() >= 0.98


def test_global_stage_columns_and_counts():
    x, noisy, truth = separable(n=300, flips=30, seed=6)
    n = len(noisy)
    names = np.array(["neg", "neu", "pos"])[noisy].astype(object)
    names[0] = None  # unlabelled row: not scored
    verdict = ["kept"] * n
    verdict[1] = "exact_duplicate"  # a rejected row takes no part in the cross-validation
    df = pl.DataFrame(
        {
            "_shard": np.zeros(n, np.int32),
            "row": np.arange(n, dtype=np.int64),
            "verdict": verdict,
            "label": list(names),
            "embedding": x.astype(np.float16),
        }
    )
    st = LabelNoise(LabelNoiseConfig())
    upd = st.run(MemoryContext(df))
    assert upd.height == n - 2 and not {0, 1} & set(upd["row"].to_list())
    assert upd.schema["label_issue"] == pl.Boolean and upd.schema["label_quality"] == pl.Float64
    assert "verdict" not in upd.columns
    assert (
        sum(st.stats[f"issues.{c}"] for c in ("neg", "neu", "pos"))
        == st.stats["label_issue"]
        == upd["label_issue"].sum()
    )
    flagged = set(upd.filter(pl.col("label_issue"))["row"].to_list())
    assert len(flagged & set(np.flatnonzero(truth))) >= 0.8 * (truth[1:].sum())
