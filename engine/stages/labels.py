"""Label-noise scores for text + label rows: which given labels does the text itself disagree with?

Proxy model, two views of each row, neither of which sees its label:
- the embedding view: multinomial logistic regression on the row embeddings (engine/stages/embed.py; for labelled
  rows the embedding is of the text alone), standardised, C = 0.002;
- the text view: logistic regression (C = 1) on character n-grams of the same text (char_wb 2-5, lowercased,
  hashed to 2**18 features, sublinear tf x idf, rows L2-normalised); any script, no vocabulary to store.
Both are out-of-fold on the same stratified K-fold split (K = 5): each row is scored by models trained on the
other folds, so no row is scored by a model that saw its label. ``p`` = the mean of the two views' probabilities.

Per row, from ``p`` and the given label ``y``:
- ``label_quality`` = p[y] (cleanlab's "self_confidence" label quality score; in [0, 1], low = suspicious);
- ``label_loss`` = -log p[y] (cross-entropy of the given label);
- ``label_margin`` = p[y] - max_{j != y} p[j] (negative when another class is preferred);
- ``label_el2n`` = || p - onehot(y) ||_2 (EL2N, Paul et al. 2021, with out-of-fold p instead of early training);
- ``label_issue`` = confident learning (Northcutt et al. 2021, cleanlab's ``find_label_issues`` default
  ``filter_by="prune_by_noise_rate"``): per-class thresholds t_j = mean p[j] over rows labelled j; the confident
  joint counts rows of given label i whose p[j] >= t_j (ties: argmax), calibrated to the class counts; for each
  off-diagonal (i, j) the C[i, j] rows of given label i with the largest margin p[j] - p[i] are flagged; rows
  whose argmax equals the given label are never flagged.
Reimplemented here (numpy only) rather than depending on ``cleanlab``, whose install pulls pandas: on the bench's
probabilities it flags the rows ``cleanlab.filter.find_label_issues`` (2.9.0) flags (row agreement 0.9994-1.0:
2 of 3,257 rows differ on one run, ties in the margin order).

Why this proxy (bench/bench_labels.py and the notes' scripts; MiniLM, 20% of labels flipped uniformly to another
class, flip seed 0, precision / recall of ``label_issue`` and AUROC of ``label_quality`` for the flipped rows;
financial_phrasebank 4,846 rows, 3 classes, was the tuning set, tweeteval_emotion 3,257 rows, 4 classes, the check):

    proxy                                         phrasebank P / R / AUROC    emotion P / R / AUROC
    embeddings, C = 0.02 (the previous stage)     0.50 / 0.77 / 0.894         0.46 / 0.78 / 0.877
    embeddings, C = 0.1                           0.48 / 0.78 / 0.884         0.42 / 0.78 / 0.854
    embeddings, C = 0.005                         0.54 / 0.78 / 0.904         0.50 / 0.78 / 0.898
    embeddings, C = 0.002                         0.57 / 0.79 / 0.909         0.53 / 0.78 / 0.908
    embeddings, C = 0.001                         0.58 / 0.78 / 0.910         0.56 / 0.76 / 0.911
    kNN vote (50 neighbours, softmax(cos / 0.1))  0.50 / 0.75 / 0.884         0.47 / 0.73 / 0.839
    word 1-2-gram TF-IDF LR, C = 1                0.58 / 0.74 / 0.889         0.47 / 0.72 / 0.846
    char 2-5-gram TF-IDF LR, C = 1                0.55 / 0.74 / 0.890         0.52 / 0.74 / 0.872
    mean(embeddings C = 0.002, char C = 1)        0.63 / 0.78 / 0.919         0.61 / 0.77 / 0.917  <- default
    mean(embeddings, char, word)                  0.64 / 0.77 / 0.917         0.62 / 0.76 / 0.910

Stronger regularisation helps because the proxy trains on the noisy labels (C is sklearn's: the penalty weighs
against the summed loss, so the same C regularises less as rows grow). Character n-grams and the sentence embedding
err on different rows (phrasebank's templated sentences, tweets' emoji and spelling), so their mean ranks flips
better than either; the word view adds nothing over the char view. Tried and not kept: the cut chosen from the
confident joint's noise estimate (flag the n_est lowest label_quality rows: n_est = 1,561 for 969 flips on
phrasebank, precision 0.55 at recall 0.87, below prune_by_noise_rate's 0.63 / 0.78); cleanlab's other ``filter_by``
modes (``both``: 0.63 / 0.76, no better); one self-training round (drop flagged rows, refit both views on the same
folds, rescore: recall +2.5-5 points, emotion's precision 0.595 -> 0.610) is not out of fold: a training row's flag
came from a model that saw the scored row's label, and on random labels over noise it scores the given label at 0.71
instead of chance; made leak-free (pair models that never saw the scored fold, 3x the fits) it only trades precision
for recall at an unchanged AUROC (bench/bench_label_refit.py). More folds, an MLP head and calibration were not measured. The static embedding tier was not measured as
a third view (it is being retrained). On the sets' own labels (0% flips) the flagged share falls too: 15.4% ->
10.2% of phrasebank, 17.9% -> 8.6% of emotion (real annotation noise and proxy errors). Over flip seeds 0 / 1 / 2
at 20% the default's precision varies: phrasebank 0.63 / 0.65 / 0.62 (previous stage 0.50 / 0.51 / 0.49), emotion
0.61 / 0.59 / 0.58 at recall 0.74-0.78 (previous stage on emotion: 0.46 / 0.43 / 0.45): on emotion the 0.6 target
is met at seed 0 and missed by 0.01-0.02 at seeds 1 and 2.

Memory, for n labelled kept rows with d-dimensional embeddings, k classes and K folds: n x d float32 (the
embeddings, copied into each fold's training matrix), 3 n x k float64 probabilities, the texts (n strings), the
text view's sparse matrix (~310 non-zeros x 8 B per row, at most ``text_max_rows`` rows at a time, all n rows only
when n <= text_max_rows) and K x 2**18 x k float64 coefficients (10 MB per class). So O(n x (d + k)) plus bounded
terms. CPU: each fold's text model fits on the hashed columns its rows use (exact: an unused column's coefficient
stays 0 under L2), not all 2**18: L-BFGS's vector work was the text view's cost. ``label_noise_scores`` with both
views, 5 folds, one thread: 10.7 -> 0.9 s at 997 rows (the demo's), 34.3 -> 12.8 s at 4,846 (phrasebank), 35.1 ->
9.6 s at 3,257 (emotion), flags identical but 3 of 4,846 rows (L-BFGS stops at its tolerance; precision at 20%
flips 0.638 either way). Hashing costs ~0.5 ms per row, so above ``text_view_max_rows`` (1M) rows it is skipped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from engine.registry import Option, Range, check_fields, register
from engine.stage import GlobalStage


@dataclass
class LabelNoiseConfig:
    # Score labelled rows at all (needs the `embedding` column; rows without a label are skipped).
    enabled: bool = True
    # Folds of the out-of-fold proxy; lowered to the smallest class's row count when that is smaller (>= 2).
    n_folds: int = 5
    # Inverse L2 strength of the embedding view's logistic regression (sklearn C) on standardised embeddings.
    # 0.002 (was 0.02): with 20% flips the proxy trains on noisy labels and stronger regularisation keeps it from
    # following them; MiniLM, embedding view alone, 20% flips: AUROC of label_quality 0.909 vs 0.894 on
    # financial_phrasebank, 0.908 vs 0.877 on tweeteval_emotion (C = 0.001 / 0.005 / 0.1: see the docstring).
    C: float = 0.002
    # lbfgs iterations per fold.
    max_iter: int = 300
    # Seed of the fold split (and of the text view's training sample above text_max_rows).
    seed: int = 0
    # Fewer labelled rows than this: skip (a 5-fold proxy on a handful of rows says nothing).
    min_rows: int = 20
    # prune_by_noise_rate (cleanlab default) | confident_learning (off-diagonal of the confident joint) | both.
    filter_by: str = "prune_by_noise_rate"
    # Second view: character n-grams of the embedded text (hashed TF-IDF, char_wb 2-5, logistic regression); its
    # out-of-fold probabilities are averaged with the embedding view's. The two views err on different rows, so
    # the average ranks flips better than either: precision of label_issue at 20% flips 0.50 -> 0.63
    # (financial_phrasebank), 0.46 -> 0.61 (tweeteval_emotion), see the docstring. False = embeddings only.
    text_view: bool = True
    # Inverse L2 strength of the text view's logistic regression (L2-normalised sparse rows; 0.5 / 1 / 2 measured).
    text_C: float = 1.0
    # Hashed feature dimension of the text view (2**18 = 262,144): the fold models hold n_folds x this x classes
    # float64 coefficients (10 MB per class at 5 folds).
    text_features: int = 2**18
    # At most this many training rows per fold for the text view (a random sample above it): its sparse training
    # matrix is ~400 non-zeros x 12 B per row (about 240 MB at 50,000 rows); every row is still scored.
    text_max_rows: int = 50_000
    # Above this many labelled rows the text view is skipped (stats: text_view = 0): hashing costs ~0.5 ms of CPU
    # per row (8 minutes per core at 1M rows, on top of the fits), while the static embedding tier runs at 28,000+
    # rows/s. -1 = no limit.
    text_view_max_rows: int = 1_000_000

    def validate(self) -> None:
        check_fields(
            self,
            "labels",
            C=Range(0, lo_open=True),
            max_iter=Range(1),
            seed=Range(0),
            min_rows=Range(2),
            filter_by=("prune_by_noise_rate", "confident_learning", "both"),
            text_C=Range(0, lo_open=True),
            text_features=Range(16),
            text_max_rows=Range(100),
            text_view_max_rows=Range(1, also=(-1,)),
        )


# ---------------------------------------------------------------------------------------------------------------
# Out-of-fold probabilities


def out_of_fold_probs(
    x: np.ndarray, y: np.ndarray, n_classes: int, n_folds: int = 5, C: float = 0.02, max_iter: int = 300, seed: int = 0
) -> np.ndarray:
    """(n, n_classes) probabilities; row i comes from a model fitted without row i's fold."""
    from sklearn.model_selection import StratifiedKFold

    x = np.asarray(x, np.float32)
    probs = np.zeros((len(y), n_classes), np.float64)
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    splits = list(folds.split(x, y))
    fits = map_folds(_fit_embedding_fold, {"x": x, "y": y, "C": C, "max_iter": max_iter},
                     [{"train": train, "test": test} for train, test in splits])  # fmt: skip
    for (_train, test), (classes, p) in zip(splits, fits):
        # A class absent from this training fold gets probability 0 for the test rows.
        probs[np.ix_(test, classes)] = p
    return probs


def _fit_embedding_fold(x, y, train, test, C, max_iter):
    """One fold of the embedding view: (the classes its model saw, their probabilities for the ``test`` rows)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x[train])
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(scaler.transform(x[train]), y[train])
    return clf.classes_, clf.predict_proba(scaler.transform(x[test]))


_FOLD_RUNNER: Callable | None = None


@contextlib.contextmanager
def fold_runner(fn: Callable) -> Iterator[None]:
    """Fit the folds with ``fn(fit, shared, per_fold)`` inside the block (the Ray executor's parallel tasks,
    ``engine.run.ray.fold_map``): the same fits, so the same probabilities up to float rounding."""
    global _FOLD_RUNNER
    old, _FOLD_RUNNER = _FOLD_RUNNER, fn
    try:
        yield
    finally:
        _FOLD_RUNNER = old


def map_folds(fit: Callable, shared: dict, per_fold: list[dict]) -> list:
    """``[fit(**shared, **kw) for kw in per_fold]``, in this process or through the installed fold runner."""
    if _FOLD_RUNNER is not None:
        return _FOLD_RUNNER(fit, shared, per_fold)
    return [fit(**shared, **kw) for kw in per_fold]


def _char_ngrams(texts, n_features: int, idf: np.ndarray | None = None):
    """Hashed character n-gram counts (char_wb 2-5, lowercased; any script), sublinear tf, times ``idf``, rows L2
    normalised; float32 CSR. ``idf`` None: raw hashed counts (for the document frequencies)."""
    from sklearn.feature_extraction.text import HashingVectorizer
    from sklearn.preprocessing import normalize

    hv = HashingVectorizer(analyzer="char_wb", ngram_range=(2, 5), n_features=n_features, alternate_sign=False,
                           norm=None, dtype=np.float32)  # fmt: skip
    m = hv.transform(texts)
    if idf is None:
        return m
    m.data = 1 + np.log(m.data)
    m = m @ _diag(idf)
    return normalize(m, copy=False)


def _diag(v: np.ndarray):
    from scipy.sparse import diags

    return diags(v.astype(np.float32))


def text_view_probs(
    texts: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    n_folds: int = 5,
    C: float = 1.0,
    n_features: int = 2**18,
    max_rows: int = 50_000,
    max_iter: int = 1000,
    seed: int = 0,
    block: int = 20_000,
) -> np.ndarray:
    """(n, n_classes) out-of-fold probabilities from logistic regression on hashed char n-gram TF-IDF of ``texts``.

    Same fold split as :func:`out_of_fold_probs` (StratifiedKFold, ``seed``). Each fold's model trains on at most
    ``max_rows`` of its training rows (a seeded sample); all rows are then scored in blocks of ``block`` rows, each
    by its own fold's model, so the sparse matrices in memory are O(max_rows + block) rows, never O(n).
    """  # fmt: skip
    from sklearn.model_selection import StratifiedKFold

    texts = np.asarray(texts, dtype=object)
    n = len(y)
    rng = np.random.default_rng(seed)
    # Inverse document frequency (smooth, as sklearn's TfidfTransformer) from a sample of at most max_rows rows.
    sample = np.sort(rng.choice(n, max_rows, replace=False)) if n > max_rows else np.arange(n)
    df = np.zeros(n_features, np.float64)
    for s in range(0, len(sample), block):
        m = _char_ngrams(texts[sample[s : s + block]], n_features)
        df += np.bincount(m.indices, minlength=n_features)
    idf = np.log((1 + len(sample)) / (1 + df)) + 1
    # Up to max_rows rows the whole matrix is built once and sliced (hashing is ~0.5 ms of CPU per row, as much as
    # a fold's fit at 4,000 rows); above it each fold hashes its sample and the scoring pass streams in blocks.
    whole = _char_ngrams(texts, n_features, idf) if n <= max_rows else None
    fold_of = np.zeros(n, np.int64)
    trains = []
    folds = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for f, (train, test) in enumerate(folds.split(np.zeros(n), y)):
        fold_of[test] = f
        if len(train) > max_rows:
            train = np.sort(rng.choice(train, max_rows, replace=False))
        trains.append({"train": train})
    shared = {"whole": whole, "texts": texts if whole is None else None, "idf": idf, "y": y, "C": C,
              "max_iter": max_iter, "n_features": n_features}  # fmt: skip
    models = map_folds(_fit_text_fold, shared, trains)  # [(model, the hashed columns it uses)] per fold
    probs = np.zeros((n, n_classes), np.float64)
    for s in range(0, n, block):
        m = whole[s : s + block] if whole is not None else _char_ngrams(texts[s : s + block], n_features, idf)
        for f, (clf, cols) in enumerate(models):
            rows = np.flatnonzero(fold_of[s : s + block] == f)
            if len(rows):
                # A class absent from this training fold gets probability 0 for the test rows.
                probs[np.ix_(s + rows, clf.classes_)] = clf.predict_proba(m[rows][:, cols])
    return probs


def _fit_text_fold(whole, texts, idf, y, train, C, max_iter, n_features):
    """One fold of the text view: its model on rows ``train`` of ``whole`` (or of ``texts``, hashed here), and the
    hashed columns it was fitted on."""
    from sklearn.linear_model import LogisticRegression

    xt = whole[train] if whole is not None else _char_ngrams(texts[train], n_features, idf)
    # Only the hashed columns this fold's rows use: an L2-penalised coefficient of a column that is zero in
    # every training row has zero gradient and stays 0, so the fit and its predictions are the same, while
    # L-BFGS's own vector work shrinks from n_features x classes to the used columns (of 262,144: 57,315 on all
    # 4,846 phrasebank rows, 2,941 on the demo's 1,000 templated ones; CPU figures in the module docstring).
    cols = np.unique(xt.indices)
    clf = LogisticRegression(C=C, max_iter=max_iter)
    clf.fit(xt[:, cols], y[train])
    return clf, cols


# ---------------------------------------------------------------------------------------------------------------
# Confident learning


def _round_preserving_row_totals(m: np.ndarray) -> np.ndarray:
    """Integer matrix with each row summing to round(row sum): floor, then +1 on the largest remainders."""
    totals = np.round(m.sum(1)).astype(np.int64)
    fl = np.floor(m).astype(np.int64)
    rem = m - fl
    for i in range(m.shape[0]):
        need = totals[i] - fl[i].sum()
        if need > 0:
            fl[i, np.argsort(-rem[i], kind="stable")[:need]] += 1
    return fl


def confident_joint(labels: np.ndarray, probs: np.ndarray, calibrate: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(K x K counts C[given, guessed true], per-row guessed class or -1 when no class is confident)."""
    k = probs.shape[1]
    counts = np.bincount(labels, minlength=k)
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(k)])
    confident = probs >= thresholds - 1e-6
    n_conf = confident.sum(1)
    guess = np.where(n_conf > 1, probs.argmax(1), confident.argmax(1))
    guess = np.where(n_conf > 0, guess, -1)
    ok = guess >= 0
    cj = np.zeros((k, k), np.float64)
    np.add.at(cj, (labels[ok], guess[ok]), 1)
    # At least one confident row on the diagonal of every class (cleanlab does the same).
    np.fill_diagonal(cj, np.maximum(np.diag(cj), 1))
    if calibrate:
        cj = (cj.T / np.clip(cj.sum(1), 1e-6, None) * counts).T
        cj = cj / max(cj.sum(), 1e-6) * counts.sum()
        cj = _round_preserving_row_totals(cj)
    return cj.astype(np.int64), guess


def find_label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str = "prune_by_noise_rate") -> np.ndarray:
    """Boolean mask of rows whose given label is likely wrong (see the module docstring)."""
    labels = np.asarray(labels, np.int64)
    n, k = probs.shape
    cj, guess = confident_joint(labels, probs)
    cl_mask = (guess >= 0) & (guess != labels)
    prune = np.zeros(n, bool)
    if filter_by in ("prune_by_noise_rate", "both"):
        for i in range(k):
            rows = np.flatnonzero(labels == i)
            if len(rows) == 0:
                continue
            for j in range(k):
                m = int(cj[i, j]) if j != i else 0
                if m <= 0:
                    continue
                margin = probs[rows, j] - probs[rows, i]
                top = rows[np.argsort(-margin, kind="stable")[:m]]
                prune[top] = True
    if filter_by == "prune_by_noise_rate":
        mask = prune
    elif filter_by == "confident_learning":
        mask = cl_mask
    elif filter_by == "both":
        mask = prune & cl_mask
    else:
        raise ValueError(f"filter_by must be prune_by_noise_rate, confident_learning or both, got {filter_by!r}")
    # A row the proxy predicts as its given label is not an issue, whatever the counts say.
    return mask & (probs.argmax(1) != labels)


def label_noise_scores(
    x: np.ndarray,
    labels: np.ndarray,
    n_folds: int = 5,
    C: float = 0.002,
    max_iter: int = 300,
    seed: int = 0,
    filter_by: str = "prune_by_noise_rate",
    texts: np.ndarray | None = None,
    text_C: float = 1.0,
    text_features: int = 2**18,
    text_max_rows: int = 50_000,
) -> dict[str, np.ndarray]:
    """Scores for rows ``x`` ((n, d) embeddings) with ``labels`` (any hashable values, no nulls).

    ``texts`` (n,) strings, the text each embedding is of: when given, the text view's out-of-fold probabilities
    (:func:`text_view_probs`) are averaged with the embedding view's; None = embeddings only.

    Classes with a single row cannot be held out: their rows get NaN scores and ``label_issue`` False
    (``scored`` says which rows were scored). Returns ``classes``, ``label_index``, ``probs`` and the per-row
    columns ``label_quality``, ``label_loss``, ``label_margin``, ``label_el2n``, ``label_issue``, ``scored``.
    """
    labels = np.asarray(labels)
    classes, y = np.unique(labels, return_inverse=True)
    n = len(y)
    counts = np.bincount(y, minlength=len(classes))
    scored = counts[y] >= 2
    out = {
        "classes": classes,
        "label_index": y,
        "probs": np.full((n, len(classes)), np.nan),
        "label_quality": np.full(n, np.nan),
        "label_loss": np.full(n, np.nan),
        "label_margin": np.full(n, np.nan),
        "label_el2n": np.full(n, np.nan),
        "label_issue": np.zeros(n, bool),
        "scored": scored,
    }
    rows = np.flatnonzero(scored)
    kept_classes = np.flatnonzero(counts >= 2)
    if len(kept_classes) < 2:
        out["scored"] = np.zeros(n, bool)
        return out
    # Re-index to the scorable classes only.
    remap = np.full(len(classes), -1)
    remap[kept_classes] = np.arange(len(kept_classes))
    ys = remap[y[rows]]
    folds = int(max(2, min(n_folds, counts[kept_classes].min())))
    p = out_of_fold_probs(x[rows], ys, len(kept_classes), folds, C, max_iter, seed)
    if texts is not None:
        # Equal weights: neither view is better on both measured sets (see the module docstring).
        pt = text_view_probs(np.asarray(texts, dtype=object)[rows], ys, len(kept_classes), folds, text_C,
                             text_features, text_max_rows, seed=seed)  # fmt: skip
        p = (p + pt) / 2
    k = p.shape[1]
    py = p[np.arange(len(rows)), ys]
    other = p.copy()
    other[np.arange(len(rows)), ys] = -np.inf
    onehot = np.eye(k)[ys]
    out["probs"][np.ix_(rows, kept_classes)] = p
    out["label_quality"][rows] = py
    out["label_loss"][rows] = -np.log(np.clip(py, 1e-12, None))
    out["label_margin"][rows] = py - other.max(1)
    out["label_el2n"][rows] = np.linalg.norm(p - onehot, axis=1)
    out["label_issue"][rows] = find_label_issues(ys, p, filter_by)
    return out


@register(
    name="label_noise", kind="global", section="labels", config=LabelNoiseConfig, order=140,
    columns={"label_quality": pa.float64(), "label_issue": pa.bool_(), "label_loss": pa.float64(),
             "label_margin": pa.float64(), "label_el2n": pa.float64()},
    enabled=lambda sec, cfg: sec.enabled, requires=("embed",),
    options=[
        Option("--label-folds", "n_folds", "folds of the out-of-fold label-noise proxy (default: 5)", int,
               allowed=Range(2)),  # one fold has no held-out rows
        Option("--no-label-noise", "enabled", "skip label-noise scores (label_quality, label_issue)", type=None,
               value=False),
    ],
)  # fmt: skip
class LabelNoise(GlobalStage):
    """Global stage: ``label_quality`` (float64), ``label_issue`` (bool), ``label_loss``, ``label_margin``,
    ``label_el2n`` on rows with a label and an embedding (null elsewhere). Verdicts are left alone: a label issue
    is a score for selection and review, not a rejection. Stats: ``rows_scored``, ``label_issue`` and
    ``issues.<label>`` per class (the manifest's per-class issue counts)."""

    manifest_key = "label_issues"  # the manifest's per-class issue counts

    @staticmethod
    def summarize(stats: dict) -> dict:
        return {k.split(".", 1)[1]: v for k, v in stats.items() if k.startswith("issues.")}

    def __init__(self, config: LabelNoiseConfig | None = None):
        super().__init__(config or LabelNoiseConfig())

    def run(self, ctx) -> pl.DataFrame | None:
        cfg = self.config
        if not cfg.enabled:
            return None
        # Labelled kept rows only: rejected rows (duplicates, junk) take no part in the cross-validation, and the
        # filter runs per part before the embeddings are gathered, so memory is O(labelled kept rows x dim).
        cols = ["label", "embedding"] + (["prompt", "response"] if cfg.text_view else [])
        df = ctx.frame(cols, kept_only=True, where=pl.col("label").is_not_null() & pl.col("embedding").is_not_null())
        if "embedding" not in df.columns:
            return None
        if df.height < cfg.min_rows:
            self.stats["rows_scored"] = 0
            return None
        x = df["embedding"].to_numpy().astype(np.float32)
        labels = df["label"].cast(pl.String).to_numpy()
        texts = None
        use_text = cfg.text_view_max_rows < 0 or df.height <= cfg.text_view_max_rows
        if cfg.text_view and use_text and {"prompt", "response"} <= set(df.columns):
            # The text the embedding is of (embed.py's rule: a label-valued response is left out), so the text
            # view never reads the label either.
            from engine.stages.embed import embedding_text

            tab = df.select(pl.col("prompt").cast(pl.String), pl.col("response").cast(pl.String),
                            pl.col("label").cast(pl.String)).to_arrow()  # fmt: skip
            texts = np.asarray(embedding_text(tab).to_pylist(), dtype=object)
            if not any(texts):
                texts = None  # no text columns in this context: embeddings only
        self.stats["text_view"] = int(texts is not None)
        res = label_noise_scores(x, labels, cfg.n_folds, cfg.C, cfg.max_iter, cfg.seed, cfg.filter_by, texts,
                                 cfg.text_C, cfg.text_features, cfg.text_max_rows)  # fmt: skip
        scored = res["scored"]
        self.stats["rows_scored"] = int(scored.sum())
        self.stats["label_issue"] = int(res["label_issue"].sum())
        for ci, name in enumerate(res["classes"]):
            self.stats[f"issues.{name}"] = int((res["label_issue"] & (res["label_index"] == ci)).sum())
        return pl.DataFrame(
            {
                "_shard": df["_shard"].to_numpy()[scored],
                "row": df["row"].to_numpy()[scored],
                "label_quality": res["label_quality"][scored],
                "label_issue": res["label_issue"][scored],
                "label_loss": res["label_loss"][scored],
                "label_margin": res["label_margin"][scored],
                "label_el2n": res["label_el2n"][scored],
            }
        )
