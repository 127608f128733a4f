"""A second label-noise pass without the first pass's flags: does it find more flips? (Tried; not shipped.)

    .venv/bin/python bench/bench_label_refit.py                      # both sets, 20% flips at seeds 0-2, 10%, 0%
    .venv/bin/python bench/bench_label_refit.py --leak-only          # the pure-noise leak check alone (seconds)

Three proxies on the same flips, embeddings (MiniLM, bench_labels' cache) and folds:
- ``one pass``: the stage as shipped (both views, 5 folds, flip seed = fold seed; same fits as
  engine.stages.labels.label_noise_scores);
- ``refit, leaky``: the same folds refitted without the rows the first pass flagged, every row rescored and
  flagged again. A training row's flag came from a first-pass model that trained on the scored row's own label, so
  the refit's training set depends on that label: not out of fold;
- ``refit, leak-free``: for scored fold f, the flags among its training rows come from pair models trained on the
  folds other than f and g (never on fold f), K (K - 1) / 2 of them, then one refit per fold without those flags:
  2.3x the one pass's fits, and impossible at 2 folds;
- ``3 x 5-fold`` (not a refit): the mean of three one-pass probabilities on differently seeded fold splits
  (repeated cross-validation, still out of fold), 3x the fits.

The leak check scores random labels on pure noise (200 rows, 300 dims, C = 10, embedding view): held out, p[given]
must stay near chance (0.5), as ``tests/engine/stages/test_labels.py::test_scores_are_out_of_fold`` asserts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json
from bench.bench_labels import flip_labels, load_labelled, measure
from bench.calibrate_semdedup import embed_set
from engine.stages.labels import _char_ngrams, _fit_embedding_fold, _fit_text_fold, find_label_issues


def fold_ids(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    fold = np.zeros(len(y), np.int64)
    for f, (_, te) in enumerate(StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y)), y)):
        fold[te] = f
    return fold


class Views:
    """Both views of the stage (embedding LR at C, char n-gram LR at text_C), fitted on any rows, scoring any."""

    def __init__(self, x, texts, y, k, C=0.002, text_C=1.0, n_features=2**18):
        self.x, self.y, self.k, self.C, self.text_C = x, y, k, C, text_C
        self.whole = None
        if texts is not None:
            df = np.bincount(_char_ngrams(texts, n_features).indices, minlength=n_features)
            self.whole = _char_ngrams(texts, n_features, np.log((1 + len(y)) / (1 + df)) + 1)

    def __call__(self, train: np.ndarray, test: np.ndarray) -> np.ndarray:
        """The stage's own fold fits (engine.stages.labels), on ``train``, scoring ``test``."""
        classes, pe = _fit_embedding_fold(self.x, self.y, train, test, self.C, 300)
        p = np.zeros((len(test), self.k))
        p[:, classes] = pe
        if self.whole is None:
            return p
        clf, cols = _fit_text_fold(self.whole, None, None, self.y, train, self.text_C, 1000, None)
        pt = np.zeros((len(test), self.k))
        pt[:, clf.classes_] = clf.predict_proba(self.whole[test][:, cols])
        return (p + pt) / 2


def one_pass(views: Views, fold: np.ndarray, drop: np.ndarray | None = None) -> np.ndarray:
    p = np.zeros((len(fold), views.k))
    for f in np.unique(fold):
        train = np.flatnonzero((fold != f) & (True if drop is None else ~drop))
        test = np.flatnonzero(fold == f)
        p[test] = views(train, test)
    return p


def leak_free_refit(views: Views, fold: np.ndarray) -> np.ndarray:
    folds = np.unique(fold)
    pair = {}
    for f, g in itertools.combinations(folds, 2):
        test = np.flatnonzero((fold == f) | (fold == g))
        pair[(f, g)] = pair[(g, f)] = (test, views(np.flatnonzero((fold != f) & (fold != g)), test))
    out = np.zeros((len(fold), views.k))
    for f in folds:
        rows = np.flatnonzero(fold != f)
        p = np.zeros((len(fold), views.k))
        for g in folds[folds != f]:
            test, pg = pair[(f, g)]
            p[test[fold[test] == g]] = pg[fold[test] == g]
        flagged = find_label_issues(views.y[rows], p[rows])
        test = np.flatnonzero(fold == f)
        out[test] = views(rows[~flagged], test)
    return out


def methods(x, texts, y, k, seed, C=0.002, repeats=True):
    views = Views(x, texts, y, k, C=C)
    fold = fold_ids(y, 5, seed)
    p1 = one_pass(views, fold)
    out = {
        "one pass": p1,
        "refit, leaky": one_pass(views, fold, drop=find_label_issues(y, p1)),
        "refit, leak-free": leak_free_refit(views, fold),
    }
    if repeats:  # repeated cross-validation: the mean of three 5-fold passes on differently seeded splits
        out["3 x 5-fold"] = np.mean([p1] + [one_pass(views, fold_ids(y, 5, seed + 100 * r)) for r in (1, 2)], axis=0)
    return out


def leak_check() -> dict:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 300)).astype(np.float32)
    y = rng.integers(0, 2, 200)
    return {
        m: round(float(p[np.arange(200), y].mean()), 3)
        for m, p in methods(x, None, y, 2, 0, C=10.0, repeats=False).items()
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="financial_phrasebank,tweeteval_emotion")
    ap.add_argument("--leak-only", action="store_true")
    args = ap.parse_args()
    out: dict = {"leak_check_mean_p_given_on_random_labels": leak_check()}
    print("leak check (chance = 0.5):", out["leak_check_mean_p_given_on_random_labels"], file=sys.stderr)
    for name in [] if args.leak_only else args.sets.split(","):
        if not (SHARED_DATA / name).exists():
            print(f"skip {name}: absent", file=sys.stderr)
            continue
        batch, labels = load_labelled(name)
        texts = np.asarray(batch.column("response").to_pylist(), dtype=object)
        emb = embed_set(batch, "minilm", 0)
        classes = np.unique(labels)
        for rate, seed in [(0.2, 0), (0.2, 1), (0.2, 2), (0.1, 0), (0.0, 0)]:
            noisy, truth = flip_labels(labels, rate, seed)
            _, y = np.unique(noisy, return_inverse=True)
            res = {}
            for method, p in methods(emb, texts, y, len(classes), seed).items():
                res[method] = measure(find_label_issues(y, p), p[np.arange(len(y)), y], truth)
                key = f"{name}-flip{int(rate * 100)}-seed{seed}-{method.replace(', ', '-')}"
                if rate > 0:
                    for metric in ("precision", "recall", "auroc_quality"):
                        append_result("label_refit", key, len(y), metric, float(res[method][metric]))
                else:
                    append_result("label_refit", key, len(y), "flagged_share", res[method]["flagged_share"])
            out[f"{name}-flip{int(rate * 100)}-seed{seed}"] = res
            print(name, rate, seed, {m: (r["precision"], r["recall"], r.get("auroc_quality")) for m, r in res.items()},
                  file=sys.stderr)  # fmt: skip
    print_json(out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
