"""``cli.py compare INPUT... --out OUT``: does winnow's selection beat random rows of the same count, on this data?

1. **Held-out rows.** ``--val FILE --test FILE``, and then the training pool is the inputs as read; or, without them,
   winnow scores the inputs (``OUT/base``) and makes a leak-free split of the kept rows (``engine.train.split``,
   stratified by label, no semantic neighbourhood across splits; ``--fractions``, default 0.7,0.15,0.15): the pool is
   the train split, validation and test the other two.
2. **Damage** (``--corrupt labels=0.2,dups=0.1,junk=0.05``, engine/train/corrupt.py): label flips, near-duplicate
   copies and junk rows go into the pool only, marked in the user columns ``injected`` and ``clean_label``.
3. **Scoring.** The pool is written as classification rows (``OUT/pool/input/pool.parquet``) and scored by winnow
   (``OUT/pool``; one embedding cache, ``OUT/embed_cache``, serves both runs), so dedup, rules and label noise see
   the damage. ``pool_injected`` in compare.json says which verdicts the planted rows got.
4. **Arms**, each a list of training rows, every arm the same count k = the budget (a fraction is of the pool's rows):
   - ``winnow``: ``select`` with the given method and options (``--method``, ``--balance``, ...: the same flags),
     once per seed with that seed (``OUT/arms/winnow/seed<s>/selected``): a method that draws (the labelled
     default, stratified) is measured over its draws, as random is; a deterministic one selects the same rows;
   - ``random``: k rows drawn uniformly from the whole pool, damage included (what a user without winnow trains on),
     one draw per seed;
   - ``oracle`` (with ``--corrupt``): k rows drawn from the undamaged rows, per seed;
   - ``full`` (``--full``): every kept row; ``raw`` (``--raw``): every row of the pool, unscored.
   Each arm trains the same recipe (the ``finetune`` flags; ``--strategy head`` by default, whose features are
   cached, so arms x seeds cost seconds after the first encode) once per seed (``--seeds N``, seeds
   ``--seed`` .. ``--seed`` + N - 1: training seed, and the draw for random and oracle) and is evaluated on the same
   test rows.
5. **Evidence**: per arm the mean and std of test macro-F1, accuracy and validation macro-F1 over seeds (a note when
   winnow's gain over random has opposite signs on validation and test rows: ``val_test_disagreement``); per arm the
   gain over random with
   a paired bootstrap 95% interval over test rows (engine/train/bootstrap.py), and with ``--full`` winnow's gain over
   all kept rows (``vs: "full"``); how many rows of each planted kind
   each run trained on. Printed as a table, written to ``OUT/compare.json`` and drawn in ``OUT/compare.png``.

compare.json: ``{"command", "task", "metric": "macro_f1", "budget", "recipe", "pool", "pool_injected", "arms":
[{"name", "method", "runs": [{"seed", "n", "macro_f1", "accuracy", "val_macro_f1", "injected": {kind: k},
"labels": {label: k}}],
"mean": {...}, "std": {...}}], "gains": [{"arm", "vs": "random"|"full", "metric", "mean", "ci95": [lo, hi]}], "plot"}``.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.errors import UserError
from engine.train.corrupt import KINDS

ARMS = ("winnow", "random", "oracle", "full", "raw")
INJECTED = tuple(KINDS.values())


@dataclass
class CompareConfig:
    # Runs per arm (training seeds; the draws of random and oracle).
    seeds: int = 3
    # Add the arm "full": every kept row of the pool.
    full: bool = False
    # Add the arm "raw": every row of the pool as read, unscored.
    raw: bool = False
    # Damage planted in the pool: labels=F,dups=F,junk=F ("" = none).
    corrupt: str = ""
    # train,val,test fractions of the split made when --val/--test are not given.
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # Bootstrap resamples of the test rows for the gains' intervals.
    n_boot: int = 1000
    # First seed (split, damage, draws, training).
    seed: int = 0


def _rows_frame(df: pl.DataFrame) -> pl.DataFrame:
    return df.select(["id", "prompt", "response", "label"])


def _read_inputs(inputs: list[str]) -> pl.DataFrame:
    """The pool's rows: a user's files through winnow's readers, winnow's own Parquet (a run's ``splits/train.parquet``,
    ``scores/``, a selection) as it is, kept rows only (finetune.load_rows)."""
    from engine.train.finetune import load_rows

    return pl.concat([load_rows(p, "INPUT") for p in inputs], how="diagonal_relaxed")


def _score(inputs: list[str], out: Path, config, cache: Path) -> dict:
    from engine.run.local import score

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "embed") and not cfg.embed.cache_dir:
        cfg.embed.cache_dir = str(cache)
    return score(inputs, out, cfg, command="compare")


def _budget_rows(budget: str, pool_rows: int) -> int:
    from engine.select.budget import Budget

    b = Budget.parse(budget)
    if b.kind == "tokens":
        raise UserError(f"--budget {budget}: compare needs a count or a fraction of the pool, not tokens")
    return max(1, min(pool_rows, b.rows(pool_rows)))


def _with_repeats(df: pl.DataFrame, col: str = "selection_repeats") -> pl.DataFrame:
    if col not in df.columns:
        return df
    reps = df[col].fill_null(1).to_numpy().clip(1)
    return df.drop(col)[np.repeat(np.arange(df.height), reps)] if (reps > 1).any() else df.drop(col)


def _count_injected(df: pl.DataFrame) -> dict[str, int]:
    if "injected" not in df.columns:
        return dict.fromkeys(INJECTED, 0)
    vals = df["injected"].to_list()
    return {k: int(sum(v == k for v in vals)) for k in INJECTED}


def _label_counts(df: pl.DataFrame) -> dict[str, int]:
    vc = df["label"].cast(pl.String).value_counts()
    return {str(a): int(b) for a, b in zip(vc["label"].to_list(), vc["count"].to_list())}


def compare(
    inputs: list[str],
    out: str | Path,
    config,
    ft,
    cc: CompareConfig,
    val: str | None = None,
    test: str | None = None,
    progress=None,
    command: str = "",
    log=print,
    cache_dir: str | Path | None = None,
    variants: dict[str, dict] | None = None,
    recipes: dict[str, object] | None = None,
) -> dict:
    """Run the comparison (module docstring); ``config`` is the scoring + selection config tree, ``ft`` the
    FinetuneConfig recipe. Returns what compare.json holds. ``cache_dir`` (default OUT/embed_cache) holds the
    scoring embeddings; ``variants`` ({name: SelectConfig fields}) adds arms ``winnow:<name>`` selected with other
    options (bench/bench_compare.py chooses the default method with them); ``recipes`` ({name: FinetuneConfig})
    trains the same arms again with other recipes into OUT/<name>/ (one scoring, several losses)."""
    from engine.select.selection import select
    from engine.train.classify import train_classifier
    from engine.train.corrupt import corrupt, parse_spec
    from engine.train.finetune import drop_leaks, load_rows

    t_start = time.perf_counter()
    if ft.task != "classification":
        raise UserError(
            f"--task {ft.task}: compare trains classifiers; an sft comparison runs finetune --task sft on "
            "each selection"
        )
    spec = parse_spec(cc.corrupt)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(cache_dir) if cache_dir else out / "embed_cache"
    # 1. held-out rows and the pool
    assignment = None
    if val is None and test is None:
        from engine.train.split import split_run

        log(f"scoring {', '.join(inputs)} for a leak-free split -> {out / 'base'}")
        _score(inputs, out / "base", config, cache)
        splits = out / "base" / "splits"
        split_run(out / "base" / "scores", splits, cc.fractions, cc.seed)
        pool_src = load_rows(splits / "train.parquet", "split")
        val_df, test_df = load_rows(splits / "val.parquet", "split"), load_rows(splits / "test.parquet", "split")
        held = {"split": "winnow", "fractions": list(cc.fractions), "folder": str(splits)}
        assignment = splits / "assignment.parquet"
    elif val is None or test is None:
        raise UserError("--val and --test go together: give both, or neither to split the inputs")
    else:
        pool_src = _read_inputs(inputs)
        val_df, test_df = load_rows(val, "--val"), load_rows(test, "--test")
        held = {"val": str(val), "test": str(test)}
    if pool_src["label"].null_count() == pool_src.height:
        raise UserError(f"{inputs[0]}: the rows have no labels; compare needs classification rows (text, label)")
    # 2. damage, 3. scoring
    pool, planted = corrupt(pool_src, spec, cc.seed) if spec else corrupt(pool_src, {}, cc.seed)
    pool_dir = out / "pool" / "input"
    pool_dir.mkdir(parents=True, exist_ok=True)
    pool.write_parquet(pool_dir / "pool.parquet")
    log(
        f"scoring the pool ({pool.height:,} rows{', damage planted: ' + str(planted) if spec else ''}) -> "
        f"{out / 'pool'}"
    )
    manifest = _score([str(pool_dir / "pool.parquet")], out / "pool", config, cache)
    scores = pl.read_parquet(
        sorted((out / "pool" / "scores").glob("part-*.parquet")),
        columns=["id", "prompt", "response", "label", "verdict", "injected", "clean_label"],
    )
    pool_inj = {}
    for kind in INJECTED:
        vc = scores.filter(pl.col("injected") == kind)["verdict"].value_counts()
        pool_inj[kind] = {
            "rows": int(vc["count"].sum()) if vc.height else 0,
            "verdicts": {str(a): int(b) for a, b in zip(vc["verdict"].to_list(), vc["count"].to_list())},
        }
    kept = scores.filter(pl.col("verdict") == "kept")
    k = _budget_rows(config.select.budget, scores.height)
    seeds = [cc.seed + i for i in range(cc.seeds)]

    # 4. arms: name -> (method, per-seed row frames; a frame shared by every seed when the selection is fixed)
    sel_cfg = copy.deepcopy(config.select)
    sel_cfg.budget = str(k)
    log(f"selecting {k:,} of {scores.height:,} pool rows ({kept.height:,} kept) with winnow")

    def selections(cfg, arm: str) -> tuple[dict, list[pl.DataFrame]]:
        """One selection per seed (``select``'s seed = the run's seed): a method that draws (stratified, random,
        stochastic greedy) is measured over its draws as random is over its own; a deterministic one repeats."""
        mans, frames = [], []
        for s in seeds:
            d = out / "arms" / arm / f"seed{s}" / "selected"
            mans.append(select(out / "pool", d, cfg, seed=s))
            chosen = pl.read_parquet(d / "selected.parquet", columns=["id", "selection_repeats"])
            frames.append(_with_repeats(chosen.join(scores, on="id", how="left")))
        return mans[0], frames

    sel_man, winnow_frames = selections(sel_cfg, "winnow")
    arms: dict[str, tuple[str, list[pl.DataFrame]]] = {
        "winnow": (
            sel_man["method"]
            + (f", balance {sel_man['balance']}" if sel_man.get("balance") not in (None, "none") else ""),
            winnow_frames,
        ),
        "random": (
            "uniform over the pool",
            [scores[np.random.default_rng(s).choice(scores.height, k, replace=False)] for s in seeds],
        ),
    }
    if spec:
        clean = scores.filter(pl.col("injected").is_null())
        arms["oracle"] = (
            "uniform over the undamaged rows",
            [clean[np.random.default_rng(s).choice(clean.height, min(k, clean.height), replace=False)] for s in seeds],
        )
    for vname, over in (variants or {}).items():
        vcfg = copy.deepcopy(config.select)
        for f, v in over.items():
            setattr(vcfg, f, v)
        vcfg.budget = str(k)
        vman, vframes = selections(vcfg, f"winnow-{vname}")
        arms[f"winnow:{vname}"] = (f"{vman['method']} {json.dumps(over)}", vframes)
    if cc.full:
        arms["full"] = ("every kept row", [kept] * len(seeds))
    if cc.raw:
        arms["raw"] = ("every pool row, unscored", [scores] * len(seeds))

    def evaluate(ft, out: Path) -> dict:
        out.mkdir(parents=True, exist_ok=True)
        labels_all = None
        results = []
        preds: dict[str, list[np.ndarray]] = {}
        y_test = None
        for name, (method, frames) in arms.items():
            runs = []
            preds[name] = []
            for s, rows in zip(seeds, frames):
                train, leaked = drop_leaks(_rows_frame(rows), [val_df, test_df], assignment)
                cfg = copy.copy(ft)
                cfg.seed = s
                run_dir = out / "arms" / name / f"seed{s}"
                run_dir.mkdir(parents=True, exist_ok=True)
                m = train_classifier(train, val_df, test_df, cfg, run_dir, progress=False, save=False)
                labels_all = m["labels"]
                p = pl.read_parquet(run_dir / "test_predictions.parquet")
                code = {lab: i for i, lab in enumerate(labels_all)}
                preds[name].append(np.array([code[x] for x in p["pred"].to_list()], np.int64))
                if y_test is None:
                    y_test = np.array([code[str(x)] for x in p["label"].to_list()], np.int64)
                runs.append(
                    {
                        "seed": s,
                        "n": train.height,
                        "leak_dropped": leaked,
                        "macro_f1": m["test"]["macro_f1"],
                        "accuracy": m["test"]["accuracy"],
                        "val_macro_f1": m["val"]["macro_f1"],
                        "injected": _count_injected(rows),
                        "labels": _label_counts(train),
                    }
                )
                log(
                    f"  {name:<7} seed {s}: n={train.height:,} macro-F1 {m['test']['macro_f1']:.4f} "
                    f"accuracy {m['test']['accuracy']:.4f}"
                )
            f1 = np.array([r["macro_f1"] for r in runs])
            acc = np.array([r["accuracy"] for r in runs])
            vf1 = np.array([r["val_macro_f1"] for r in runs])
            results.append(
                {
                    "name": name,
                    "method": method,
                    "runs": runs,
                    "mean": {
                        "macro_f1": float(f1.mean()),
                        "accuracy": float(acc.mean()),
                        "val_macro_f1": float(vf1.mean()),
                    },
                    "std": {
                        "macro_f1": float(f1.std(ddof=1)) if len(f1) > 1 else 0.0,
                        "accuracy": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                        "val_macro_f1": float(vf1.std(ddof=1)) if len(vf1) > 1 else 0.0,
                    },
                }
            )
        # 5. gains over random
        from engine.train.bootstrap import paired_bootstrap

        gains = []
        # every arm against random; then winnow against all kept rows, the question a user asks next ("would
        # training on everything have been better?"): the same paired bootstrap, vs "full"
        pairs = [(name, "random") for name in preds if name != "random"]
        if "winnow" in preds and "full" in preds:
            pairs.append(("winnow", "full"))
        for name, vs in pairs:
            for metric in ("macro_f1", "accuracy"):
                g = paired_bootstrap(y_test, preds[name], preds[vs], len(labels_all), metric, cc.n_boot, cc.seed)
                gains.append(
                    {
                        "arm": name,
                        "vs": vs,
                        "metric": metric,
                        "mean": g["mean"],
                        "ci95": g["ci95"],
                        "n_boot": g["n_boot"],
                        "test_rows": g["rows"],
                    }
                )
        # winnow's gain over random as a share of the oracle's (macro-F1), when there is an oracle with a gain
        oracle_gap = oracle_gap_ci = None
        if "oracle" in preds and "winnow" in preds:
            from engine.train.bootstrap import share_bootstrap

            sh = share_bootstrap(y_test, preds["winnow"], preds["random"], preds["oracle"], len(labels_all),
                                 "macro_f1", cc.n_boot, cc.seed)  # fmt: skip
            oracle_gap = None if sh["share"] is None else round(sh["share"], 4)
            oracle_gap_ci = sh["ci95"]
        report = {
            "command": command,
            "task": "classification",
            "metric": "macro_f1",
            "budget": {
                "given": config.select.budget,
                "rows": k,
                "of_pool": scores.height,
                "fraction": round(k / max(1, scores.height), 4),
            },
            "recipe": {
                **{f: v for f, v in asdict(ft).items() if f not in ("adapter", "lora_r", "lora_alpha")},
                "seeds": seeds,
                "n_boot": cc.n_boot,
                "held_out": held,
                "corrupt": spec or None,
                "selection": {
                    "method": sel_man["method"],
                    "balance": sel_man.get("balance"),
                    "quality": sel_man.get("quality"),
                    "parameters": sel_man.get("parameters"),
                },
            },
            "pool": {
                "rows": scores.height,
                "kept": kept.height,
                "planted": planted,
                "verdicts": manifest["verdicts"],
                "val_rows": val_df.height,
                "test_rows": test_df.height,
                "labels": _label_counts(scores),
            },
            "pool_injected": pool_inj,
            "arms": results,
            "gains": gains,
            "oracle_gap_recovered": oracle_gap,
            "oracle_gap_recovered_ci95": None if oracle_gap_ci is None else [round(x, 4) for x in oracle_gap_ci],
            "plot": "compare.png",
            "seconds": round(time.perf_counter() - t_start, 1),
        }
        from engine.io.writers import write_json_atomic

        write_json_atomic(out / "compare.json", report)
        plot(report, out / "compare.png")
        return report

    from engine.train.finetune import quiet_libraries

    with quiet_libraries():  # the arms' own log lines say what runs; no weight-loading bars between them
        report = evaluate(ft, out)
        for rname, rft in (recipes or {}).items():
            evaluate(rft, out / rname)
    return report


def val_test_disagreement(report: dict, arm: str = "winnow", vs: str = "random", points: float = 1.0) -> str | None:
    """A warning when winnow's mean gain over random on the validation rows and on the test rows point opposite
    ways, each by more than ``points`` macro-F1 points: the test rows may not come from the distribution the pool
    (and the validation rows, split from it or given) comes from. Seen on TweetEval hate, whose test set is known to
    differ from its train and validation sets: +1.4 on validation, -1.6 on test (bench/RESULTS.md)."""
    means = {a["name"]: a["mean"] for a in report.get("arms", [])}
    if arm not in means or vs not in means or "val_macro_f1" not in means[arm] or "val_macro_f1" not in means[vs]:
        return None
    dv = 100 * (means[arm]["val_macro_f1"] - means[vs]["val_macro_f1"])
    dt = 100 * (means[arm]["macro_f1"] - means[vs]["macro_f1"])
    if dv * dt >= 0 or min(abs(dv), abs(dt)) <= points:
        return None
    return (
        f"note: {arm} vs {vs} is {dv:+.1f} macro-F1 points on the validation rows but {dt:+.1f} on the test rows: the "
        "test rows may come from another distribution than the pool; judge the selection on rows like those the "
        "model will serve (on labelled data, --label-issues keep selects without dropping the rows the label-noise "
        "proxy flags: on TweetEval hate that drop was what lost on the test rows)"
    )


def table(report: dict) -> str:
    """The comparison as text: one line per arm, then the gains."""
    lines = [
        f"{'arm':<8} {'rows':>7} {'macro-F1':>17} {'accuracy':>17} {'val F1':>7}  injected (flip/dup/junk)  method"
    ]
    for a in report["arms"]:
        n = a["runs"][0]["n"] if a["runs"] else 0
        inj = np.mean([[r["injected"][k] for k in INJECTED] for r in a["runs"]], axis=0)
        lines.append(
            f"{a['name']:<8} {n:>7,} {a['mean']['macro_f1']:>8.4f} +- {a['std']['macro_f1']:.4f} "
            f"{a['mean']['accuracy']:>8.4f} +- {a['std']['accuracy']:.4f} {a['mean'].get('val_macro_f1', np.nan):>7.4f}  "
            f"{'/'.join(f'{x:.0f}' for x in inj):<24}  {a['method']}"
        )
    for g in report["gains"]:
        if g["metric"] != "macro_f1":
            continue
        lo, hi = g["ci95"]
        verdict = "better" if lo > 0 else ("worse" if hi < 0 else "no clear difference")
        vs = "all kept rows (full)" if g["vs"] == "full" else g["vs"]
        line = (
            f"gain of {g['arm']} over {vs}: {100 * g['mean']:+.2f} macro-F1 points, 95% interval "
            f"[{100 * lo:+.2f}, {100 * hi:+.2f}] ({verdict})"
        )
        if g["vs"] == "full" and hi < 0:
            line += ": at this budget, training on every kept row is better than the selection"
        lines.append(line)
    shift = val_test_disagreement(report)
    if shift:
        lines.append(shift)
    if report.get("oracle_gap_recovered") is not None:
        ci = report.get("oracle_gap_recovered_ci95")
        span = f", 95% interval [{100 * ci[0]:.0f}%, {100 * ci[1]:.0f}%] over test rows" if ci else ""
        lines.append(
            f"winnow recovers {100 * report['oracle_gap_recovered']:.0f}% of the oracle's gain over random{span}"
        )
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Bars: mean test macro-F1 per arm with the runs as dots and the std as error bars; gains in the labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = report["arms"]
    gains = {g["arm"]: g for g in report["gains"] if g["metric"] == "macro_f1" and g["vs"] == "random"}
    fig, ax = plt.subplots(figsize=(1.6 * len(arms) + 2, 4))
    x = np.arange(len(arms))
    means = [a["mean"]["macro_f1"] for a in arms]
    colors = {"winnow": "#2a7ab9", "random": "#999999", "oracle": "#3a9e4f", "full": "#c98a2b", "raw": "#b94a48"}
    ax.bar(
        x,
        means,
        yerr=[a["std"]["macro_f1"] for a in arms],
        color=[colors.get(a["name"], "#777") for a in arms],
        capsize=4,
        alpha=0.85,
    )
    for i, a in enumerate(arms):
        ys = [r["macro_f1"] for r in a["runs"]]
        ax.scatter([i] * len(ys), ys, color="black", s=10, zorder=3)
    names = []
    for a in arms:
        g = gains.get(a["name"])
        extra = f"\n{100 * g['mean']:+.1f} [{100 * g['ci95'][0]:+.1f}, {100 * g['ci95'][1]:+.1f}]" if g else ""
        names.append(f"{a['name'].replace(':', ':' + chr(10))} (n={a['runs'][0]['n']:,}){extra}")
    ax.set_xticks(x, names, fontsize=8)
    lo = min(min(r["macro_f1"] for r in a["runs"]) for a in arms)
    hi = max(max(r["macro_f1"] for r in a["runs"]) for a in arms)
    pad = max(0.02, (hi - lo) * 0.3)
    ax.set_ylim(max(0, lo - pad), min(1, hi + pad))
    ax.set_ylabel("test macro-F1")
    b = report["budget"]
    ax.set_title(
        f"budget {b['rows']:,} of {b['of_pool']:,} pool rows; strategy {report['recipe'].get('strategy')}, imbalance "
        f"{report['recipe'].get('imbalance')}; gain over random, 95% paired bootstrap",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
