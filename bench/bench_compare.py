"""Does winnow's selection beat random? ``cli.py compare`` on real classification sets, the issue's fixed recipe.

    nice -n 10 .venv/bin/python bench/bench_compare.py                      # everything below
    nice -n 10 .venv/bin/python bench/bench_compare.py --sets financial_phrasebank --parts corrupt

Recipe: ``--strategy head`` (MiniLM, frozen; the head on cached [CLS] features), 3 seeds, budget 30% of the pool,
paired bootstrap (1,000 resamples) over the test rows. Sets: financial_phrasebank (no official split: winnow's
leak-free stratified 70/15/15) and tweeteval_emotion (its own train / val / test). Parts:
- ``corrupt``: ``--corrupt labels=0.2,dups=0.1,junk=0.05``, class-weighted and unweighted loss: winnow's default
  and the candidate defaults (``VARIANTS``) vs random, oracle and all kept rows;
- ``clean``: the same without damage;
- ``curve``: budgets 10/20/30/50% with damage, class-weighted: winnow's candidates and random, one plot.
Each comparison writes its compare.json under ``--out``; this script prints one JSON summary per comparison, a final
JSON object, and appends the gains to bench/results.csv. The scoring embeddings are cached per set
(``--out/<set>/embed_cache``) and the head's features under the user cache dir, so a rerun trains only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json
from engine.config import load_config
from engine.train.compare import CompareConfig, compare
from engine.train.finetune import FinetuneConfig

# Candidate defaults for labelled data (the winnow arm itself is --method auto as it stands).
# (Two candidates only: on the shared 2-core machine an arm x 3 seeds took minutes.)
VARIANTS = {
    "drop+facility+prop": {"method": "facility", "label_issues": "drop", "balance": "proportional"},
    "drop+random+prop": {"method": "random", "label_issues": "drop", "balance": "proportional"},
}
SETS = {
    "financial_phrasebank": {"inputs": ["train.parquet"]},
    "tweeteval_emotion": {"inputs": ["train.parquet"], "val": "val.parquet", "test": "test.parquet"},
}
CORRUPT = "labels=0.2,dups=0.1,junk=0.05"


def summary(r: dict) -> dict:
    gains = {g["arm"]: g for g in r["gains"] if g["metric"] == "macro_f1"}
    arms = {}
    for a in r["arms"]:
        g = gains.get(a["name"])
        inj = {
            k: round(sum(run["injected"][k] for run in a["runs"]) / len(a["runs"]), 1)
            for k in a["runs"][0]["injected"]
        }
        arms[a["name"]] = {
            "macro_f1": round(a["mean"]["macro_f1"], 4),
            "std": round(a["std"]["macro_f1"], 4),
            "n": a["runs"][0]["n"],
            "injected": inj,
            "labels": a["runs"][0]["labels"],
            **({"gain": round(g["mean"], 4), "ci95": [round(x, 4) for x in g["ci95"]]} if g else {}),
        }
    return {
        "budget_rows": r["budget"]["rows"],
        "pool": r["pool"]["rows"],
        "test_rows": r["pool"]["test_rows"],
        "recovered": r.get("oracle_gap_recovered"),
        "arms": arms,
        "seconds": r["seconds"],
    }


def run_one(name: str, part: str, imbalance: str, budget: str, corrupt: str, args, variants) -> dict:
    spec = SETS[name]
    d = SHARED_DATA / name
    out = Path(args.out) / name / f"{part}-{imbalance}-b{budget}"
    cfg = load_config(None, {"tokens": {"enabled": False}, "select": {"budget": budget}})
    ft = FinetuneConfig(task="classification", strategy=args.strategy, imbalance=imbalance)
    cc = CompareConfig(seeds=args.seeds, full=True, corrupt=corrupt, seed=0)
    t0 = time.perf_counter()
    r = compare(
        [str(d / f) for f in spec["inputs"]],
        out,
        cfg,
        ft,
        cc,
        val=str(d / spec["val"]) if "val" in spec else None,
        test=str(d / spec["test"]) if "test" in spec else None,
        command=f"bench/bench_compare.py {name} {part} {imbalance} {budget}",
        log=lambda *a: None,
        cache_dir=Path(args.out) / name / "embed_cache",
        variants=variants,
    )
    s = {
        "set": name,
        "part": part,
        "imbalance": imbalance,
        "budget": budget,
        "corrupt": corrupt or None,
        "strategy": args.strategy,
        "wall_s": round(time.perf_counter() - t0, 1),
        **summary(r),
        "compare_json": str(out / "compare.json"),
    }
    print(json.dumps(s), flush=True)
    for arm, a in s["arms"].items():
        if "gain" in a:
            append_result(
                f"compare_{name}_{part}_{imbalance}_b{budget}", arm, s["budget_rows"], "gain_macro_f1", a["gain"]
            )
    return s


def curve_plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len({r["set"] for r in rows}), figsize=(11, 4), squeeze=False)
    for ax, name in zip(axes[0], sorted({r["set"] for r in rows})):
        rs = sorted((r for r in rows if r["set"] == name), key=lambda r: float(r["budget"]))
        xs = [100 * float(r["budget"]) for r in rs]
        for arm in rs[0]["arms"]:
            if arm in ("oracle", "full"):
                continue
            ys = [r["arms"][arm]["macro_f1"] for r in rs]
            es = [r["arms"][arm]["std"] for r in rs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm)
        ax.set_title(f"{name} ({rs[0]['corrupt'] or 'clean'}, {rs[0]['imbalance']})", fontsize=9)
        ax.set_xlabel("budget, % of the pool")
        ax.set_ylabel("test macro-F1")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--parts", default="corrupt,clean,curve")
    ap.add_argument("--imbalance", default="weight,none")
    ap.add_argument("--strategy", default="head")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "winnow_bench_compare"))
    args = ap.parse_args()
    rows = []
    for name in args.sets.split(","):
        if not (SHARED_DATA / name).exists():
            print(f"skip {name}: absent", file=sys.stderr)
            continue
        for part in args.parts.split(","):
            if part == "curve":
                for b in ("0.1", "0.2", "0.3", "0.5"):
                    rows.append(run_one(name, "curve", "weight", b, CORRUPT, args, VARIANTS))
                continue
            for imb in args.imbalance.split(","):
                rows.append(run_one(name, part, imb, "0.3", CORRUPT if part == "corrupt" else "", args, VARIANTS))
    curve = [r for r in rows if r["part"] == "curve"]
    if curve:
        curve_plot(curve, Path(args.out) / "curve.png")
    print_json({"bench": "compare", "strategy": args.strategy, "runs": len(rows), "out": args.out})


if __name__ == "__main__":
    main()
