"""engine/stages/labels.py: planted label flips are found; scores are out-of-fold; confident-learning counts by hand."""

import numpy as np
import polars as pl
import pytest

from engine.run.context import MemoryContext
from engine.stages.labels import (
    LabelNoise,
    LabelNoiseConfig,
    confident_joint,
    find_label_issues,
    label_noise_scores,
    text_view_probs,
)


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
    # C = 0.002 shrinks probabilities on 600 rows (clean rows' p[given] ~0.7); the ranking is what counts.
    assert np.nanmean(r["label_quality"][~truth]) > 0.6
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


# ---------------------------------------------------------------------------------------------------------------
# The text view (character n-grams of the embedded text, averaged with the embedding view)


SMALL = 2**12  # hashed text features in tests: the synthetic texts have ~90 distinct words


def words_and_vectors(n=600, k=3, d=16, flip=0.2, seed=0, sep=0.35):
    """Rows whose embedding barely knows the class (centres * sep + unit noise) while the text carries 2 class
    words among 6 shared ones; ``flip`` of the labels moved to another class at random."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(size=(k, d))
    x = (centres[y] * sep + rng.normal(size=(n, d))).astype(np.float32)
    vocab = [[f"w{c}x{j}" for j in range(15)] for c in range(k)]
    shared = [f"s{j}" for j in range(40)]
    texts = np.array([" ".join([*rng.choice(vocab[c], 2), *rng.choice(shared, 6)]) for c in y], dtype=object)
    m = round(flip * n)
    flipped = rng.choice(n, m, replace=False)
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, k, m)) % k
    truth = np.zeros(n, bool)
    truth[flipped] = True
    return x, texts, noisy, truth


def precision_recall(issue, truth):
    tp = (issue & truth).sum()
    return tp / max(1, issue.sum()), tp / truth.sum()


def test_text_view_lifts_precision_where_the_embedding_is_weak():
    x, texts, noisy, truth = words_and_vectors()
    prec_old, _ = precision_recall(label_noise_scores(x, noisy, C=0.02)["label_issue"], truth)
    prec, rec = precision_recall(label_noise_scores(x, noisy, texts=texts, text_features=SMALL)["label_issue"], truth)
    assert prec_old < 0.6, f"embeddings alone: precision {prec_old:.2f}"  # the weak view the test is about
    assert prec >= 0.9 and rec >= 0.85, f"precision {prec:.2f} recall {rec:.2f}"


def test_text_view_flags_almost_nothing_on_clean_labels():
    x, texts, noisy, truth = words_and_vectors(flip=0.0, seed=3)
    assert not truth.any()
    assert label_noise_scores(x, noisy, texts=texts, text_features=SMALL)["label_issue"].mean() < 0.03


def test_text_view_is_out_of_fold():
    # Unique random strings with random labels: a model that had seen a row's label would call it (every row has
    # its own character n-grams); held out, p[given] stays near chance (1/2).
    rng = np.random.default_rng(5)
    texts = np.array(["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz "), 40)) for _ in range(300)], dtype=object)
    y = rng.integers(0, 2, 300)
    p = text_view_probs(texts, y, 2, n_folds=5, C=100.0, n_features=SMALL)
    assert 0.35 < p[np.arange(300), y].mean() < 0.6
    assert np.allclose(p.sum(1), 1.0)


def test_text_view_fits_on_the_used_columns_only_and_predicts_as_the_full_hashed_matrix():
    # Each fold fits on the hashed columns its training rows use; a column zero in every training row keeps a zero
    # coefficient under the L2 penalty, so the probabilities equal a fit on all n_features columns.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    from engine.stages.labels import _char_ngrams

    _, texts, noisy, _ = words_and_vectors(n=300, seed=9)
    y = np.asarray(noisy)
    p = text_view_probs(texts, y, 3, n_folds=3, n_features=SMALL)
    idf = np.log((1 + len(y)) / (1 + np.bincount(_char_ngrams(texts, SMALL).indices, minlength=SMALL))) + 1
    m = _char_ngrams(texts, SMALL, idf)
    assert len(np.unique(m.indices)) < SMALL  # some columns unused, so the compaction is exercised
    want = np.zeros_like(p)
    for train, test in StratifiedKFold(3, shuffle=True, random_state=0).split(np.zeros(len(y)), y):
        clf = LogisticRegression(C=1.0, max_iter=1000, tol=1e-8).fit(m[train], y[train])
        want[test] = clf.predict_proba(m[test])
    assert np.abs(p - want).max() < 5e-3  # L-BFGS stops at tol 1e-4 in the stage; a column mix-up moves p by 0.1+


def test_text_view_sampled_path_matches_the_whole_matrix_path_in_quality():
    # Above text_max_rows each fold trains on a sample and rows are scored in blocks: every row still scored once.
    x, texts, noisy, truth = words_and_vectors(n=600, seed=7)
    y = np.asarray(noisy)
    p = text_view_probs(texts, y, 3, n_features=SMALL, max_rows=400, block=128)
    assert np.allclose(p.sum(1), 1.0)
    r = label_noise_scores(x, y, texts=texts, text_features=SMALL, text_max_rows=400)
    prec, rec = precision_recall(r["label_issue"], truth)
    assert prec >= 0.85 and rec >= 0.8, f"precision {prec:.2f} recall {rec:.2f}"


def test_stage_text_view_never_reads_the_label():
    # Rows whose response IS the label (a --map that made the label the response): embed.py embeds the prompt
    # alone, and so must the text view. Prompts here are uninformative, so with the rule label_quality stays near
    # chance; reading the response would give every row p[given] ~ 1.
    rng = np.random.default_rng(8)
    n = 300
    labels = np.array(["neg", "pos"])[rng.integers(0, 2, n)]
    df = pl.DataFrame(
        {
            "row": np.arange(n, dtype=np.int64),
            "prompt": ["".join(rng.choice(list("abcdefghij "), 30)) for _ in range(n)],
            "response": list(labels),
            "label": list(labels),
            "embedding": rng.normal(size=(n, 8)).astype(np.float16),
        }
    )
    st = LabelNoise(LabelNoiseConfig(text_features=SMALL))
    upd = st.run(MemoryContext(df))
    assert st.stats["text_view"] == 1
    assert upd["label_quality"].mean() < 0.65


def test_stage_text_view_off_by_row_cap():
    x, texts, noisy, truth = words_and_vectors(n=200, seed=9)
    df = pl.DataFrame(
        {"row": np.arange(200, dtype=np.int64), "prompt": [""] * 200, "response": list(texts),
         "label": [str(v) for v in noisy], "embedding": x.astype(np.float16)}
    )  # fmt: skip
    st = LabelNoise(LabelNoiseConfig(text_view_max_rows=100, text_features=SMALL))
    st.run(MemoryContext(df))
    assert st.stats["text_view"] == 0
    st = LabelNoise(LabelNoiseConfig(text_features=SMALL))
    upd = st.run(MemoryContext(df))
    assert st.stats["text_view"] == 1
    found = set(upd.filter(pl.col("label_issue"))["row"].to_list())
    assert len(found & set(np.flatnonzero(truth))) >= 0.8 * truth.sum()


@pytest.mark.parametrize("field,value", [("text_C", 0.0), ("text_features", 0), ("text_max_rows", 10),
                                         ("text_view_max_rows", 0)])  # fmt: skip
def test_config_rejects_bad_text_view_values(field, value):
    with pytest.raises(ValueError, match=field):
        LabelNoiseConfig(**{field: value}).validate()
