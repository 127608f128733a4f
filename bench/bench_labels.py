"""Label-noise detection on real classification sets with planted flips: the current method against the previous one.

    .venv/bin/python bench/bench_labels.py
    .venv/bin/python bench/bench_labels.py --embedder static --sets financial_phrasebank

For each set (financial_phrasebank; TweetEval emotion train by default) and each flip rate (0%, 10%, 20%): flip
that share of labels at random (seeded; the new label is uniform over the other classes), score with
engine.stages.labels, and compare ``label_issue`` with the flipped set. Methods, same flips, same embeddings:

- ``previous``: the stage before the text view: out-of-fold logistic regression on the embeddings alone at
  C = 0.02, then prune_by_noise_rate;
- ``current``: the stage's defaults (embedding view at C = 0.002 averaged with the character n-gram text view);
- ``cleanlab`` (when the package is installed): ``cleanlab.filter.find_label_issues`` on ``current``'s
  probabilities, the anchor for the numpy reimplementation of confident learning.

The 0% run shows how many rows a method flags on the set's own labels (real annotation noise or proxy errors):
those count as false positives at 10% / 20%, so precision is a lower bound. Random flagging would have precision =
the flip rate. Rows embed their text alone (a classification row's prompt is "" and its response the text, as
schema.py maps them), never the label name. Embeddings are cached under the user cache dir (bench_cache).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json
from bench.calibrate_semdedup import embed_set
from engine.stages.labels import label_noise_scores

STR = pa.large_string()


def load_labelled(name: str) -> tuple[pa.RecordBatch, np.ndarray]:
    """The set's train split as canonical classification rows: prompt "", response = text, label = label id.

    (calibrate_semdedup.load_set puts the label *name* in response, which embedding_text would embed with the text:
    the true label would leak into the vector and inflate every figure here.)"""
    t = pq.read_table(SHARED_DATA / name / "train.parquet", columns=["text", "label"])
    text = t["text"].cast(STR).combine_chunks()
    n = len(text)
    batch = pa.RecordBatch.from_pydict(
        {
            "prompt": pa.array([""] * n, STR),
            "response": text,
            "label": t["label"].cast(STR).combine_chunks(),
            "verdict": pa.array(["kept"] * n, STR),
        }
    )
    return batch, np.asarray(t["label"].to_numpy())


def flip_labels(labels: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy labels, flipped mask): ``rate`` of the rows (seeded) moved to another class, uniform over the others."""
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    flipped = rng.choice(len(labels), round(rate * len(labels)), replace=False)
    for i in flipped:
        others = classes[classes != labels[i]]
        noisy[i] = others[rng.integers(len(others))]
    truth = np.zeros(len(labels), bool)
    truth[flipped] = True
    return noisy, truth


def measure(issue: np.ndarray, quality: np.ndarray, truth: np.ndarray) -> dict:
    tp = int((issue & truth).sum())
    out = {
        "flagged": int(issue.sum()),
        "flagged_share": round(float(issue.mean()), 4),
        "precision": round(tp / max(1, int(issue.sum())), 4),
        "recall": round(tp / max(1, int(truth.sum())), 4),
    }
    if 0 < truth.sum() < len(truth):
        # AUROC of -label_quality for the flipped rows: ranking quality independent of the flag's cut.
        order = np.argsort(quality, kind="stable")  # lowest quality first
        ranks = np.empty(len(quality))
        ranks[order] = np.arange(len(quality))
        pos = ranks[truth]
        out["auroc_quality"] = round(
            float(1 - (pos.sum() - truth.sum() * (truth.sum() - 1) / 2) / (truth.sum() * (~truth).sum())), 4
        )
        # Precision of the k lowest-label_quality rows, k = number flipped: the "review the worst k" use.
        k = int(truth.sum())
        out["precision_at_k"] = round(float(truth[np.argsort(quality, kind="stable")[:k]].mean()), 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="financial_phrasebank,tweeteval_emotion")
    ap.add_argument("--embedder", default="minilm", help="minilm | static | PATH")
    ap.add_argument("--rates", default="0,0.1,0.2", help="flip rates")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0, help="seed of the flips and of the folds")
    args = ap.parse_args()
    try:
        from cleanlab.filter import find_label_issues as cleanlab_find
    except ImportError:
        cleanlab_find = None
    out: dict = {"embedder": args.embedder}
    for name in args.sets.split(","):
        if not (SHARED_DATA / name).exists():
            print(f"skip {name}: absent", file=sys.stderr)
            continue
        batch, labels = load_labelled(name)
        texts = np.asarray(batch.column("response").to_pylist(), dtype=object)
        t0 = time.perf_counter()
        emb = embed_set(batch, args.embedder, 0)
        t_embed = time.perf_counter() - t0
        classes = np.unique(labels)
        out[name] = {"rows": len(labels), "classes": len(classes), "embed_s": round(t_embed, 1)}
        for rate in (float(r) for r in args.rates.split(",")):
            noisy, truth = flip_labels(labels, rate, args.seed)
            key = f"flip{int(rate * 100)}"
            res: dict = {}
            t0 = time.perf_counter()
            prev = label_noise_scores(emb, noisy, n_folds=args.folds, C=0.02, seed=args.seed)
            res["previous"] = {**measure(prev["label_issue"], prev["label_quality"], truth),
                               "score_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
            t0 = time.perf_counter()
            cur = label_noise_scores(emb, noisy, n_folds=args.folds, seed=args.seed, texts=texts)
            res["current"] = {**measure(cur["label_issue"], cur["label_quality"], truth),
                              "score_s": round(time.perf_counter() - t0, 2)}  # fmt: skip
            if cleanlab_find is not None:
                cl = cleanlab_find(cur["label_index"], cur["probs"], filter_by="prune_by_noise_rate")
                res["cleanlab"] = {**measure(cl, cur["label_quality"], truth),
                                   "agree_with_current": round(float((cl == cur["label_issue"]).mean()), 4)}  # fmt: skip
            if rate > 0:
                res["precision_ratio_current_vs_previous"] = round(
                    res["current"]["precision"] / max(1e-9, res["previous"]["precision"]), 3
                )
            out[name][key] = res
            print(name, key, res, file=sys.stderr)
            for method in ("previous", "current", "cleanlab"):
                if method not in res:
                    continue
                prov = f"{args.embedder}-{name}-{key}-{method}"
                if rate > 0:
                    for metric in ("precision", "recall", "precision_at_k", "auroc_quality"):
                        append_result("label_noise", prov, len(labels), metric, float(res[method][metric]))
                else:
                    append_result("label_noise", prov, len(labels), "flagged_share", res[method]["flagged_share"])
    print_json(out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
