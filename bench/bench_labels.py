"""Label-noise detection on real classification sets with planted flips: precision and recall of ``label_issue``.

    .venv/bin/python bench/bench_labels.py
    .venv/bin/python bench/bench_labels.py --embedder static --sets financial_phrasebank

For each set (financial_phrasebank; TweetEval emotion train by default) and each flip rate (0%, 10%, 20%): flip
that share of labels at random (seeded; the new label is uniform over the other classes), score with
engine.stages.labels (5-fold out-of-fold logistic regression on the embeddings of the text alone), and compare
``label_issue`` with the flipped set. The 0% run shows how many rows the method flags on the set's own labels
(real annotation noise or proxy errors): those count as false positives at 10% / 20%, so precision is a lower
bound. Random flagging would have precision = the flip rate. Embeddings are cached under the user cache dir.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json
from bench.calibrate_semdedup import embed_set, load_set
from engine.stages.labels import label_noise_scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default="financial_phrasebank,tweeteval_emotion")
    ap.add_argument("--embedder", default="minilm", help="minilm | static | PATH")
    ap.add_argument("--rates", default="0,0.1,0.2", help="flip rates")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out: dict = {"embedder": args.embedder}
    for name in args.sets.split(","):
        if not (SHARED_DATA / name).exists():
            print(f"skip {name}: absent", file=sys.stderr)
            continue
        batch = load_set(name, -1)
        t0 = time.perf_counter()
        emb = embed_set(batch, args.embedder, 0)
        t_embed = time.perf_counter() - t0
        labels = np.asarray(batch.column("label").to_pylist())
        classes = np.unique(labels)
        out[name] = {"rows": len(labels), "classes": len(classes), "embed_s": round(t_embed, 1)}
        for rate in (float(r) for r in args.rates.split(",")):
            rng = np.random.default_rng(args.seed)
            noisy = labels.copy()
            flipped = rng.choice(len(labels), round(rate * len(labels)), replace=False)
            for i in flipped:
                others = classes[classes != labels[i]]
                noisy[i] = others[rng.integers(len(others))]
            truth = np.zeros(len(labels), bool)
            truth[flipped] = True
            t0 = time.perf_counter()
            r = label_noise_scores(emb, noisy, n_folds=args.folds, seed=args.seed)
            secs = time.perf_counter() - t0
            issue = r["label_issue"]
            tp = int((issue & truth).sum())
            prec = tp / max(1, int(issue.sum()))
            rec = tp / max(1, int(truth.sum()))
            # AUROC of -label_quality for the flipped rows: ranking quality independent of the flag's cut.
            q = r["label_quality"]
            auc = float("nan")
            if 0 < truth.sum() < len(truth):
                order = np.argsort(q)  # lowest quality first
                ranks = np.empty(len(q))
                ranks[order] = np.arange(len(q))
                pos = ranks[truth]
                auc = 1 - (pos.sum() - truth.sum() * (truth.sum() - 1) / 2) / (truth.sum() * (~truth).sum())
            # Precision of the k lowest-label_quality rows, k = number flipped: the "review the worst k" use.
            k = int(truth.sum())
            p_at_k = float(truth[np.argsort(q, kind="stable")[:k]].mean()) if k else float("nan")
            key = f"flip{int(rate * 100)}"
            out[name][key] = {
                "flagged": int(issue.sum()),
                "flipped": int(truth.sum()),
                "precision": round(prec, 4),
                "recall": round(rec, 4),
                "auroc_quality": round(float(auc), 4),
                "precision_at_k": round(p_at_k, 4),
                "score_s": round(secs, 2),
            }
            print(name, key, out[name][key], file=sys.stderr)
            if rate > 0:
                append_result("label_noise", f"{args.embedder}-{name}-{key}", len(labels), "precision", prec)
                append_result("label_noise", f"{args.embedder}-{name}-{key}", len(labels), "recall", rec)
                append_result("label_noise", f"{args.embedder}-{name}-{key}", len(labels), "precision_at_k", p_at_k)
    print_json(out)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
