"""Paired bootstrap over test rows: how sure is a gain of one arm over another on the same test set?

``paired_bootstrap(y, a, b, n_classes, ...)`` resamples the test rows with replacement ``n_boot`` times and, on each
resample, computes the metric of arm ``a`` minus the metric of arm ``b`` on the *same* rows (paired: the test set's
own difficulty cancels, which makes the interval far narrower than two independent intervals). An arm with several
runs (seeds) is scored as the mean of its runs' metrics on each resample, so the interval is about the arms' mean
gain; it covers the test set's sampling, not the spread between training seeds (compare.json reports that as std).
The interval is the 2.5th and 97.5th percentile of the resampled differences; the point estimate is the difference
on the full test set. Resamples are drawn from ``numpy.random.default_rng(seed)``: the same inputs and seed give the
same interval. ``share_bootstrap`` does the same for a ratio of two gains on the same resamples (how much of an
oracle's gain over random an arm recovers). Macro-F1 on a resample is computed for all resamples at once from one
``bincount`` of (resample, true, predicted) triples: 1,000 resamples x 700 rows x 6 runs take about 0.1 s.
"""

from __future__ import annotations

import numpy as np

METRICS = ("macro_f1", "accuracy")


def batched_metric(y: np.ndarray, p: np.ndarray, idx: np.ndarray, c: int, metric: str) -> np.ndarray:
    """The metric of predictions ``p`` against ``y`` (integer codes < c) on each row of ``idx`` ((B, m) row indices
    into y): shape (B,). Macro-F1 averages the classes present in the resample's truth or predictions."""
    yt, yp = y[idx], p[idx]
    if metric == "accuracy":
        return (yt == yp).mean(1)
    b = idx.shape[0]
    flat = (np.arange(b)[:, None] * (c * c) + yt * c + yp).ravel()
    conf = np.bincount(flat, minlength=b * c * c).reshape(b, c, c).astype(np.float64)
    tp = np.diagonal(conf, axis1=1, axis2=2)
    support, predicted = conf.sum(2), conf.sum(1)
    prec = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    rec = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(tp), where=(prec + rec) > 0)
    present = (support + predicted) > 0
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def _arm_metrics(
    y: np.ndarray, arms: list[list[np.ndarray]], n_classes: int, metric: str, n_boot: int, seed: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each arm's metric (the mean over its runs) on all test rows, (len(arms),), and on ``n_boot`` resamples of
    them drawn from ``default_rng(seed)``, (len(arms), n_boot): every arm scored on the same resamples."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    y = np.asarray(y, np.int64)
    n = len(y)
    arms = [[np.asarray(x, np.int64) for x in runs] for runs in arms]

    def means(idx):
        return np.stack(
            [np.mean([batched_metric(y, p, idx, n_classes, metric) for p in runs], axis=0) for runs in arms]
        )

    point = means(np.arange(n)[None, :])[:, 0]
    rng = np.random.default_rng(seed)
    boots = [means(rng.integers(0, n, size=(min(chunk, n_boot - s), n))) for s in range(0, n_boot, chunk)]
    return point, np.concatenate(boots, axis=1) if boots else np.zeros((len(arms), 0))


def paired_bootstrap(
    y: np.ndarray,
    a: list[np.ndarray],
    b: list[np.ndarray],
    n_classes: int,
    metric: str = "macro_f1",
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 200,
) -> dict:
    """{"mean": metric(a) - metric(b) on all rows, "ci95": [lo, hi], "n_boot", "rows"} (module docstring); ``a`` and
    ``b`` are lists of runs, each an array of predicted codes aligned with ``y``."""
    point, boot = _arm_metrics(y, [a, b], n_classes, metric, n_boot, seed, chunk)
    d = boot[0] - boot[1]
    lo, hi = np.percentile(d, [2.5, 97.5]) if len(d) else (float("nan"), float("nan"))
    return {"mean": float(point[0] - point[1]), "ci95": [float(lo), float(hi)], "n_boot": int(n_boot), "rows": len(y)}


def share_bootstrap(
    y: np.ndarray,
    a: list[np.ndarray],
    base: list[np.ndarray],
    best: list[np.ndarray],
    n_classes: int,
    metric: str = "macro_f1",
    n_boot: int = 1000,
    seed: int = 0,
    chunk: int = 200,
) -> dict:
    """{"share": (m(a) - m(base)) / (m(best) - m(base)) on all rows, "ci95": [lo, hi] or None, "n_boot", "rows"}:
    the share of ``best``'s gain over ``base`` that ``a`` recovers, with the three arms' metrics taken on the same
    resamples of the test rows (the seed and resamples of :func:`paired_bootstrap`). ``share`` is None when ``best``
    does not beat ``base``; ``ci95`` is None unless best's gain is above zero in at least 97.5% of the resamples
    and both percentiles are finite (a near-zero denominator makes them meaningless)."""
    point, boot = _arm_metrics(y, [a, base, best], n_classes, metric, n_boot, seed, chunk)
    num, den = point[0] - point[1], point[2] - point[1]
    share = float(num / den) if den > 0 else None
    u, v = boot[0] - boot[1], boot[2] - boot[1]
    ci = None
    if share is not None and len(v) and (v > 0).mean() >= 0.975:
        # a resample where best does not beat base has no share: it counts as -inf or +inf (the sign of a's gain),
        # so it widens the interval instead of being dropped from its tail
        r = np.where(v > 0, u / np.where(v > 0, v, 1), np.where(u > 0, np.inf, -np.inf))
        lo, hi = np.percentile(r, [2.5, 97.5], method="nearest")
        ci = [float(lo), float(hi)] if np.isfinite([lo, hi]).all() else None
    return {"share": share, "ci95": ci, "n_boot": int(n_boot), "rows": len(y)}
