"""winnow command line: thin over engine/.

    python cli.py score INPUT... --out DIR      score every row (one row out per row in) into DIR/scores/
    python cli.py select DIR --out SEL          pick a budget of kept rows into SEL/
    python cli.py run [INPUT...] --out DIR      score, then select into DIR/selected/ (no INPUT: the demo corpus)
    python cli.py split DIR                     train/val/test splits, no semantic neighbourhood across splits
    python cli.py finetune SEL --out MODEL      fine-tune on a selection (classification or sft)
    python cli.py compare INPUT... --out DIR    winnow's selection vs random, fine-tuned and tested (compare.json)
    python cli.py inspect DIR                   summary of a run folder
    python cli.py report DIR                    one self-contained HTML page over a run folder (DIR/report.html)

Exit codes: 0 success, 2 user error (one line naming the file, line and field), 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line, like winnow's own (exit 2)."""

    def error(self, message: str):
        self.exit(2, f"winnow: error: {message} (see `{self.prog} -h`)\n")


def _score_options():
    """Every scoring flag: the runner's own (engine.config.CORE_OPTIONS) and each stage's (engine/registry.py)."""
    from engine import registry
    from engine.config import CORE_OPTIONS

    return CORE_OPTIONS + registry.options()


def _select_options():
    """Every selection flag (engine.config.SELECT_OPTIONS): method, budget, quality, quotas, caps, target."""
    from engine.config import SELECT_OPTIONS

    return SELECT_OPTIONS


def _engine_options():
    """--engine and --ray-address (engine.config.CORE_OPTIONS, section run): on select as well as the scoring commands."""
    from engine.config import CORE_OPTIONS

    return [o for o in CORE_OPTIONS if o.flag in ("--engine", "--ray-address")]


def _ray(cfg):
    """One Ray session for the command when --engine ray (`run` scores and selects in it), else nothing."""
    import contextlib

    if cfg.run.engine != "ray":
        return contextlib.nullcontext()
    from engine.run.ray import session

    return session(cfg)


def _dest(flag: str) -> str:
    return "opt_" + flag.lstrip("-").replace("-", "_")


def _add_options(g, options) -> None:
    for o in options:
        if o.type is None:
            g.add_argument(o.flag, dest=_dest(o.flag), action="store_true", help=o.help.replace("%", "%%"))
        else:
            g.add_argument(
                o.flag,
                dest=_dest(o.flag),
                type=o.type,
                default=None,
                nargs=o.nargs,
                metavar=o.metavar or o.field.upper(),
                help=o.help.replace("%", "%%"),
            )


def _add_score_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring")
    _add_options(g, [o for o in _score_options() if o.flag != "--seed"])  # --seed: added per command
    g.add_argument(
        "--map",
        default=None,
        metavar="CANON=COL,...",
        help="map input columns onto canonical ones, e.g. prompt=question,response=answer,label=y "
        "(id=COL: COL is the row id)",
    )
    g.add_argument("--seed", dest="opt_seed", type=int, default=None, help="seed for every random choice (default: 0)")


def _add_select_options(p: argparse.ArgumentParser) -> None:
    _add_options(p.add_argument_group("selection"), _select_options())


def _add_finetune_options(p: argparse.ArgumentParser) -> None:
    """The fine-tune recipe's flags (engine.train.finetune.FINETUNE_OPTIONS), dest = the config field."""
    from engine.train.finetune import FINETUNE_OPTIONS

    g = p.add_argument_group("recipe")
    for o in FINETUNE_OPTIONS:
        g.add_argument(
            o.flag, dest=o.field, type=o.type, default=None, metavar=o.field.upper(), help=o.help.replace("%", "%%")
        )


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE.toml", help="TOML file setting any config field")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar and no summary table")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="cli.py", description="winnow: score and select supervised fine-tuning data.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("score", help="score every row of INPUT into OUT/scores/ with a verdict per row")
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="files, folders or globs (.parquet .arrow .jsonl .jsonl.gz .json)"
    )
    p.add_argument("--out", required=True, help="run folder to write (manifest.json, scores/, work/)")
    _add_score_options(p)
    _common(p)

    p = sub.add_parser("select", help="select a budget of kept rows from a scored run folder")
    p.add_argument("scores", metavar="DIR", help="run folder (or its scores/ folder) written by `score`")
    p.add_argument("--out", required=True, help="folder for selected.parquet, selected.jsonl, manifest.json")
    _add_select_options(p)
    p.add_argument(
        "--seed",
        dest="opt_seed",
        type=int,
        default=None,
        help="seed of the seeded methods (random, stratified) and of faiss clustering (default: 0)",
    )
    _add_options(p.add_argument_group("engine"), _engine_options())
    _common(p)

    p = sub.add_parser("run", help="score then select; with no INPUT, runs on the generated demo corpus")
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="files, folders or globs (default: the demo corpus)")
    p.add_argument("--out", required=True, help="run folder (scores/ and selected/ go inside)")
    _add_score_options(p)
    _add_select_options(p)
    _common(p)

    p = sub.add_parser(
        "split",
        help="train/val/test splits of the kept rows; no group of embedding neighbours "
        "(cosine >= threshold), near duplicates or repeated prompts crosses splits",
    )
    p.add_argument("run", metavar="DIR", help="run folder written by `score` (with embeddings, for semantic groups)")
    p.add_argument("--to", default=None, help="output folder (default: DIR/splits)")
    p.add_argument("--fractions", default="0.8,0.1,0.1", help="train,val,test fractions (default: 0.8,0.1,0.1)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument(
        "--threshold",
        type=float,
        default=-1.0,
        help="cosine at or above which two rows share a group and so a split (default: -1 = the run's "
        "embedder tier's: 0.85 encoder, 0.90 static)",
    )
    p.add_argument(
        "--max-group",
        type=float,
        default=0.01,
        help="largest group as a fraction of the kept rows (at least 32 rows); a bigger component "
        "(chaining) is broken up by raising the threshold for its rows (default: 0.01; 1 = never)",
    )
    p.add_argument(
        "--search",
        default="auto",
        help="auto | exact | ivf: the pair search (default: auto = exact up to 50,000 kept rows)",
    )
    p.add_argument(
        "--check-sample",
        type=int,
        default=10000,
        help="rows whose nearest neighbour in the other splits is measured (default: 10000; 0 = none)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")

    p = sub.add_parser(
        "finetune",
        help="fine-tune a model on a selection: classification (an encoder) or sft (a "
        "causal LM); writes a save_pretrained folder and metrics.json",
    )
    p.add_argument(
        "selection", metavar="SEL", help="selection folder (selected.parquet), run folder, or a file or folder of rows"
    )
    p.add_argument(
        "--out", required=True, help="model folder to write (save_pretrained, metrics.json, train_log.jsonl)"
    )
    p.add_argument("--val", default=None, metavar="FILE", help="validation rows (default: RUN/splits/val.parquet)")
    p.add_argument("--test", default=None, metavar="FILE", help="test rows (default: RUN/splits/test.parquet)")
    _add_finetune_options(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    p = sub.add_parser(
        "compare",
        help="winnow's selection vs random rows of the same count (several seeds), each "
        "fine-tuned with the same recipe and tested on the same held-out rows; writes compare.json "
        "and compare.png",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="labelled rows (files, folders or globs): the pool, "
        "split 70/15/15 by winnow unless --val and --test are given",
    )
    p.add_argument("--out", required=True, help="folder for compare.json, compare.png, base/, pool/, arms/")
    p.add_argument("--val", default=None, metavar="FILE", help="validation rows (default: a leak-free split)")
    p.add_argument("--test", default=None, metavar="FILE", help="test rows (default: a leak-free split)")
    p.add_argument(
        "--seeds", type=int, default=None, help="runs per arm: training seeds and random draws (default: 3)"
    )
    p.add_argument("--full", action="store_true", help="add the arm 'full': every kept row")
    p.add_argument("--raw", action="store_true", help="add the arm 'raw': every pool row, unscored")
    p.add_argument(
        "--corrupt",
        default=None,
        metavar="KIND=F,...",
        help="plant damage in the pool first: "
        "labels=F (flips), dups=F (near-duplicate copies), junk=F (junk rows), fractions of the pool, "
        "e.g. labels=0.2,dups=0.1,junk=0.05; adds the arm 'oracle'",
    )
    p.add_argument(
        "--fractions",
        default=None,
        help="train,val,test of the split made without --val/--test (default: 0.7,0.15,0.15)",
    )
    p.add_argument("--n-boot", type=int, default=None, help="bootstrap resamples of the test rows (default: 1000)")
    _add_score_options(p)
    _add_select_options(p)
    from engine.train.finetune import FINETUNE_OPTIONS

    g = p.add_argument_group("recipe")
    for o in FINETUNE_OPTIONS:
        if o.flag != "--seed":  # --seed (scoring's) seeds everything
            g.add_argument(
                o.flag,
                dest=o.field,
                type=o.type,
                default=None,
                metavar=o.field.upper(),
                help=o.help.replace("%", "%%"),
            )
    _common(p)

    p = sub.add_parser("inspect", help="summary of a run folder: rows, verdicts, columns, score ranges")
    p.add_argument("run", metavar="DIR", help="run folder written by `score` or `run`")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser(
        "report",
        help="one self-contained HTML page over a run folder: verdicts, score distributions, "
        "samples, duplicates, selection, embedding map, fine-tune and compare results",
    )
    p.add_argument("run", metavar="DIR", help="run folder written by `run` or `score`")
    p.add_argument("--out", default=None, metavar="FILE", help="HTML file to write (default: DIR/report.html)")
    p.add_argument("--quiet", "-q", action="store_true", help="print nothing on success")
    return ap


def _overrides(args: argparse.Namespace, with_select: bool) -> dict:
    from engine.config import parse_map
    from engine.errors import UserError

    ov: dict = {}
    given: dict[tuple[str, str], str] = {}
    for o in _score_options() + (_select_options() if with_select else []):
        v = getattr(args, _dest(o.flag), None)
        if o.type is None:
            if not v:
                continue
            v = o.value
        elif v is None:
            continue
        key = (o.section, o.field)
        if key in given and given[key] != o.flag:
            raise UserError(f"{given[key]} and {o.flag} contradict each other")
        given[key] = o.flag
        ov.setdefault(o.section, {})[o.field] = list(v) if o.nargs else v
    if getattr(args, "map", None) is not None:
        ov.setdefault("read", {})["map"] = parse_map(args.map)
    return ov


def _check_out(flag: str, path) -> None:
    from engine.errors import UserError

    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: exists and is not a folder; give a folder to write into")


def _checked_config(args, with_select: bool):
    """The config of a scoring command, every option checked before any work: the values (engine.config.validate),
    --out, the inputs, and the options that name columns against the inputs' schemas (engine.config.check_inputs)."""
    from engine.config import check_inputs, load_config, validate
    from engine.io.readers import discover

    cfg = load_config(args.config, _overrides(args, with_select))
    validate(cfg)
    _check_out("--out", args.out)
    shards, _warnings = discover(args.inputs, exclude=str(args.out))
    check_inputs(cfg, shards, with_select=with_select)
    return cfg


def _progress(quiet: bool):
    if quiet:
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
        transient=True,
    )


def _summary(manifest: dict, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("verdict")
    t.add_column("rows", justify="right")
    t.add_column("share", justify="right")
    n = manifest["rows_in"]
    for v, c in manifest["verdicts"].items():
        t.add_row(v, f"{c:,}", f"{100 * c / max(n, 1):.1f}%")
    t.add_row("[b]rows in[/b]", f"[b]{n:,}[/b]", "")
    Console(stderr=False).print(t)
    for w in manifest.get("warnings", [])[:10]:
        print(f"warning: {w}", file=sys.stderr)


def cmd_score(args, with_select=False, cfg=None) -> dict:
    if cfg is None:
        cfg = _checked_config(args, with_select)
    if cfg.run.engine == "ray":
        from engine.run.ray import score
    else:
        from engine.run.local import score
    prog = _progress(args.quiet)
    if prog:
        with prog:
            m = score(args.inputs, args.out, cfg, progress=prog, command=args.command)
    else:
        m = score(args.inputs, args.out, cfg, command=args.command)
    if not args.quiet:
        t = m["timings"]
        _summary(
            m,
            f"{args.out}: {m['rows_in']:,} rows in {t['total_s']:.1f}s "
            f"({t['shards_done']} shard(s) scored, {t['shards_reused']} reused)",
        )
    return m


def cmd_select(args, scores_dir=None, cfg=None) -> dict:
    from engine.config import load_config, validate
    from engine.select.selection import select

    if cfg is None:
        cfg = load_config(args.config, _overrides(args, True))
        validate(cfg)
        _check_out("--out", args.out)
    sc = cfg.select
    seed = cfg.run.seed
    out = args.out if scores_dir is None else os.path.join(args.out, "selected")
    if cfg.run.engine == "ray":  # GreeDi's partitions as Ray tasks
        from engine.run.ray import partition_map
        from engine.select.greedi import partition_runner

        with _ray(cfg), partition_runner(partition_map):
            m = select(scores_dir or args.scores, out, sc, seed=seed)
    else:
        m = select(scores_dir or args.scores, out, sc, seed=seed)
    if not args.quiet:
        print(
            f"selected {m['selected']:,} of {m['rows_kept']:,} kept rows ({m['method']}"
            f"{' on ' + m['score'] if m['score'] else ''}, budget {m['budget']}, ~{m['tokens_selected']:,.0f} "
            f"tokens) -> {out}/selected.jsonl"
        )
    return m


def cmd_run(args) -> None:
    from engine.config import load_config, validate

    validate(load_config(args.config, _overrides(args, True)))  # every value, before the demo corpus is written
    _check_out("--out", args.out)
    if not args.inputs:
        from engine.io.demo import make_demo

        demo = Path(args.out) / "demo"
        if not (demo / "truth.json").exists():
            make_demo(demo, seed=args.opt_seed or 0)
        args.inputs = [str(demo / "input")]
        if not args.opt_against:  # the demo ships an evaluation prompt set, some of it planted in the training rows
            args.opt_against = [str(demo / "eval")]
        if not args.quiet:
            print(
                f"no INPUT given: running on the generated demo corpus in {demo}/input "
                f"(contamination checked against {args.opt_against[0]})"
            )
    cfg = _checked_config(args, with_select=True)
    with _ray(cfg):
        cmd_score(args, with_select=True, cfg=cfg)
        cmd_select(args, scores_dir=args.out, cfg=cfg)
    from engine.report.html import write_report

    try:  # the run's outputs are complete by now: a report that fails to render must not fail the run
        path = write_report(args.out)
    except Exception as e:  # noqa: BLE001
        print(
            f"warning: the report could not be written ({type(e).__name__}: {e}); retry with "
            f"`cli.py report {args.out}`",
            file=sys.stderr,
        )
    else:
        if not args.quiet:
            print(f"report: {path}")


def cmd_split(args) -> None:
    from engine.config import SEED
    from engine.errors import UserError
    from engine.registry import expected
    from engine.train.split import SPLIT_ALLOWED, SplitConfig, split_run

    try:
        fractions = tuple(float(x) for x in args.fractions.split(","))
    except ValueError:
        raise UserError(f"--fractions {args.fractions}: expected numbers like 0.8,0.1,0.1") from None
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise UserError(f"--fractions {args.fractions}: three non-negative fractions summing to 1")
    if (want := expected(SEED, args.seed)) is not None:
        raise UserError(f"--seed {args.seed}: expected {want}")
    config = SplitConfig(
        threshold=args.threshold, max_group=args.max_group, search=args.search, check_sample=args.check_sample
    )
    for flag, field in (
        ("--threshold", "threshold"),
        ("--max-group", "max_group"),
        ("--search", "search"),
        ("--check-sample", "check_sample"),
    ):
        if (want := expected(SPLIT_ALLOWED[field], getattr(config, field))) is not None:
            raise UserError(f"{flag} {getattr(config, field)}: expected {want}")
    scores = Path(args.run) / "scores"
    if not scores.is_dir():
        raise UserError(f"{args.run}: no scores/ folder (run `cli.py score` first)")
    to = Path(args.to or Path(args.run) / "splits")
    _check_out("--to", to)
    counts = split_run(scores, to, fractions, args.seed, config=config)
    if not args.quiet:
        m = json.loads((to / "manifest.json").read_text())
        g, grouping = m["groups"], m["grouping"]
        how = f"cosine >= {grouping['threshold']:g}" if "threshold" in grouping else "MinHash + exact, no embeddings"
        print(f"splits in {to}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))
        print(
            f"groups: {g['count']:,} ({how}), largest {g['largest']:,} rows"
            + (f", {g['capped_count']} giant component(s) broken up" if g["capped_count"] else "")
        )
        if "cross_split" in m:
            c = m["cross_split"]
            print(f"largest cross-split cosine over {c['sample_rows']:,} sampled rows: {c['max_cosine']:.3f}")


def cmd_finetune(args) -> None:
    from engine.train.finetune import config_from_args, finetune

    cfg = config_from_args(args)
    _check_out("--out", args.out)
    m = finetune(args.selection, args.out, cfg, val=args.val, test=args.test, progress=not args.quiet)
    if not args.quiet:
        print(json.dumps({k: m[k] for k in ("task", "rows", "val", "test") if k in m}, default=str))
        print(f"model and metrics.json in {args.out}")


def cmd_compare(args) -> None:
    from engine.errors import UserError
    from engine.train.compare import CompareConfig, compare, table
    from engine.train.corrupt import parse_spec
    from engine.train.finetune import config_from_args

    cc = CompareConfig()
    if args.seeds is not None:
        if args.seeds < 1:
            raise UserError(f"--seeds {args.seeds}: expected an integer >= 1")
        cc.seeds = args.seeds
    if args.n_boot is not None:
        if args.n_boot < 100:
            raise UserError(f"--n-boot {args.n_boot}: expected an integer >= 100")
        cc.n_boot = args.n_boot
    if args.fractions is not None:
        try:
            fr = tuple(float(x) for x in args.fractions.split(","))
        except ValueError:
            raise UserError(f"--fractions {args.fractions}: expected numbers like 0.7,0.15,0.15") from None
        if len(fr) != 3 or any(f <= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
            raise UserError(f"--fractions {args.fractions}: three positive fractions summing to 1")
        cc.fractions = fr
    cc.full, cc.raw = args.full, args.raw
    cc.corrupt = args.corrupt or ""
    parse_spec(cc.corrupt)
    if (args.val is None) != (args.test is None):
        raise UserError("--val and --test go together: give both, or neither to split the inputs")
    for flag in ("val", "test"):
        f = getattr(args, flag)
        if f is not None and not os.path.exists(f):
            raise UserError(f"--{flag} {f}: no such file or folder")
    ft = config_from_args(args)
    if ft.task != "classification":
        raise UserError(f"--task {ft.task}: compare trains classifiers (--task classification)")
    if ft.model and not os.path.isdir(ft.model):
        raise UserError(f"--model {ft.model}: no such folder")
    cfg = _checked_config(args, with_select=True)
    from engine.select.budget import Budget

    if Budget.parse(cfg.select.budget).kind == "tokens":
        raise UserError(f"--budget {cfg.select.budget}: compare needs a count or a fraction of the pool, not tokens")
    cc.seed = cfg.run.seed
    command = "python cli.py " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["compare"] else "compare"
    report = compare(
        args.inputs,
        args.out,
        cfg,
        ft,
        cc,
        val=args.val,
        test=args.test,
        command=command,
        log=(lambda *a, **k: None) if args.quiet else print,
    )
    print(table(report))
    print(f"compare.json and compare.png in {args.out}")


def cmd_inspect(args) -> None:
    from engine.report.inspect import inspect_run

    summary = inspect_run(args.run)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
        return
    from engine.report.inspect import print_summary

    print_summary(summary)


def cmd_report(args) -> None:
    from engine.report.html import write_report

    path = write_report(args.run, args.out)
    if not args.quiet:
        print(f"report: {path}")


def main(argv: list[str] | None = None) -> int:
    from engine.errors import UserError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "score":
            cmd_score(args)
        elif args.command == "select":
            cmd_select(args)
        elif args.command == "run":
            cmd_run(args)
        elif args.command == "split":
            cmd_split(args)
        elif args.command == "inspect":
            cmd_inspect(args)
        elif args.command == "report":
            cmd_report(args)
        elif args.command == "finetune":
            cmd_finetune(args)
        elif args.command == "compare":
            cmd_compare(args)
        return 0
    except UserError as e:
        print(f"winnow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("winnow: interrupted; rerun the same command to resume (finished shards are kept)", file=sys.stderr)
        return 130
    except OSError as e:
        import errno

        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            traceback.print_exc()
            print("winnow: internal error (a bug); please report it with the traceback above", file=sys.stderr)
            return 1
        # a full disk outside engine.run.local's writers (select, split): one line, like a user error
        what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left on device"
        where = f" writing {e.filename}" if e.filename else ""
        print(f"winnow: error: {what}{where}: free some space, then rerun", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - internal error: full traceback, exit 1
        traceback.print_exc()
        print("winnow: internal error (a bug); please report it with the traceback above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
