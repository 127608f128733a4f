"""Every option of every subcommand is checked before any work starts: a bad value is one line on stderr naming the
flag and what was expected, exit 2, and no run folder (nor any other output) is written.

The table below gives every flag of `score`, `select`, `run`, `split` and `inspect` at least one bad value;
``test_every_flag_has_a_bad_value`` fails when a flag is added without one. The commands run in this process
(``cli.main``), so a check that fires costs milliseconds; the base arguments turn the embedder and the token counter
off so that a check that does not fire costs a small scoring run, not a model load."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import cli
from engine import registry
from engine.config import Config, all_options, check_inputs, load_config, validate
from engine.errors import UserError
from engine.io.readers import discover
from engine.stages.loss import _cuda_present

ROOT = Path(__file__).resolve().parents[1]
BASE = {
    "score": "--embedder none --no-token-count",
    "run": "--embedder none --no-token-count",
    "compare": "--embedder none --no-token-count",
}

TOML = {
    "bad_syntax": "[dedup\nnum_perm = 3\n",
    "unknown_top": "[dedupe]\nnum_perm = 64\n",
    "unknown_key": "[dedup]\nnum_perms = 64\n",
    "method_key": "[dedup]\nbands = 4\n",  # a method of the section's class, not a field
    "wrong_type": '[dedup]\nnum_perm = "many"\n',
    "bool_for_int": "[read]\nbatch_rows = true\n",
    "str_for_list": '[run]\nskip_stages = "clean"\n',
    "list_items": "[run]\nskip_stages = [1, 2]\n",
    "scalar_section": "dedup = 3\n",
    "bands": "[dedup]\nnum_bands = 20\nrows_per_band = 8\n",
    "one_band_field": "[dedup]\nnum_bands = 8\n",
    "labels_C": "[labels]\nC = 0\n",
    "loss_enabled": '[loss]\nenabled = "maybe"\n',
    "regex": '[clean]\nplaceholder_regex = "(unclosed"\n',
    "clean_lists": "[clean]\nmax_top_ngram_frac = [0.5]\n",
    "clean_frac": "[clean]\nmax_dup_line_frac = 1.5\n",
    "map_missing": '[read.map]\nprompt = "missing"\nresponse = "output"\n',
    "map_key": '[read.map]\nquestion = "instruction"\n',
    "select_budget": '[select]\nbudget = "lots"\n',
    "select_budget_type": "[select]\nbudget = 0.2\n",
    "compression": '[run]\ncompression = "zip"\n',
    "contamination_ngram": "[contamination]\nngram = 0\n",
    "embed_dtype": '[embed]\ndtype = "int8"\n',
    "semdedup_niter": "[semdedup]\nniter = 0\n",
    "tokens_cache": "[tokens]\ncache_chunks = -1\n",
}

# (subcommands, arguments after the base ones, what the one stderr line must contain)
SCORING = ("score", "run", "compare")
SELECTING = ("select", "run", "compare")
RECIPE = ("finetune", "compare")  # engine.train.finetune.FINETUNE_OPTIONS (compare: all but --seed)
CASES = [
    # --- input and runner flags (engine.config.CORE_OPTIONS), and the positional INPUT ---
    (SCORING, "{nope}.jsonl", "no such file or folder"),
    (SCORING, "--format bogus", "--format bogus"),
    (SCORING, "--format mapped", "--format mapped needs --map"),
    (SCORING, "--format alpaca --map prompt=instruction,response=output", "--format alpaca and --map contradict"),
    (SCORING, "--batch-rows 0", "--batch-rows 0"),
    (SCORING, "--batch-rows abc", "argument --batch-rows: invalid int value"),
    (SCORING, "--jsonl-block-bytes -5", "--jsonl-block-bytes -5"),
    (SCORING, "--workers -1", "--workers -1"),
    (SCORING, "--seed -1", "--seed -1"),
    (SCORING, "--skip-stages bogus", "--skip-stages bogus: no stage of that name"),
    (SCORING, "--skip-stages clean minhashh", "did you mean minhash"),
    (SCORING, "--map prompt=missing,response=output", "has no column 'missing'"),
    (SCORING, "--map id=nouid,prompt=instruction,response=output", "has no column 'nouid'"),
    (SCORING, "--map prompt=instruction", "also map response=COLUMN"),
    (SCORING, "--map id=uid", "also map prompt=COLUMN and response=COLUMN"),
    (SCORING, "--map question=instruction,prompt=instruction,response=output", "'question' is not a canonical"),
    (SCORING, "--map prompt", "expected CANON=COLUMN pairs"),
    (SCORING, "--map prompt=instruction,prompt=output", "'prompt' is mapped twice"),
    (SCORING, "--out {file}", "exists and is not a folder"),
    # --- stage flags (each stage's @register options) ---
    (SCORING, "--normalize-form NFX", "--normalize-form NFX"),
    (SCORING, "--min-response-chars -1", "--min-response-chars -1"),
    (SCORING, "--max-response-chars -5", "--max-response-chars -5"),
    (SCORING, "--max-response-chars 0", "--max-response-chars 0"),
    (SCORING, "--min-response-chars 50 --max-response-chars 10", "is above --max-response-chars 10"),
    (SCORING, "--max-prompt-chars -2", "--max-prompt-chars -2"),
    (SCORING, "--against {nope}", "--against"),
    (SCORING, "--dedup-threshold 1.5", "--dedup-threshold 1.5"),
    (SCORING, "--dedup-threshold 0", "--dedup-threshold 0"),
    (SCORING, "--num-perm 0", "--num-perm 0"),
    (SCORING, "--num-perm 1", "--num-perm 1"),
    (SCORING, "--minhash-compat bogus", "--minhash-compat bogus"),
    (SCORING, "--minhash-scheme bogus", "--minhash-scheme bogus"),
    (SCORING, "--dedup-verify bogus", "--dedup-verify bogus"),
    (SCORING, "--dedup-short-words -1", "--dedup-short-words -1"),
    (SCORING, "--tokenizer {nope}", "--tokenizer"),
    (SCORING, "--embedder {nope}", "--embedder"),
    (SCORING, "--embedder static:{nope}", "--embedder static:"),
    (SCORING, "--embedder {dir}", "without config.json"),
    (SCORING, "--embed-device tpu", "--embed-device tpu"),
    (SCORING, "--embedder minilm --embed-device cuda", "--embed-device cuda: no CUDA GPU"),
    (SCORING, "--semdedup-threshold 2", "--semdedup-threshold 2"),
    (SCORING, "--semdedup-threshold 0", "--semdedup-threshold 0"),
    (SCORING, "--semdedup --embedder none", "--semdedup: needs the embed stage"),
    (SCORING, "--semdedup --embedder minilm --skip-stages embed", "--skip-stages embed"),
    (SCORING, "--label-folds 0", "--label-folds 0"),
    (SCORING, "--label-folds 1", "--label-folds 1"),
    (SCORING, "--loss --no-loss", "contradict"),
    (SCORING, "--loss-model {nope}", "--loss-model"),
    (SCORING, "--loss-model {dir}", "without config.json"),
    (SCORING, "--loss-budget abc", "--loss-budget abc"),
    (SCORING, "--loss-budget 0", "--loss-budget 0"),
    (SCORING, "--loss-priority nosuchcolumn", "--loss-priority nosuchcolumn: no such column"),
    (SCORING, "--loss-priority prompt", "--loss-priority prompt: not a numeric column"),
    (SCORING, "--loss-max-tokens 0", "--loss-max-tokens 0"),
    (SCORING, "--loss-batch-tokens 0", "--loss-batch-tokens 0"),
    (SCORING, "--loss-device tpu", "--loss-device tpu"),
    (SCORING, "--loss-device cuda", "--loss-device cuda: no CUDA GPU"),
    # --- --config files ---
    (SCORING, "--config {nope}.toml", "config file does not exist"),
    (SCORING, "--config {bin}", "not a text file"),
    (SCORING, "--config {dir}", "not a file"),
    (SCORING, "--config {toml_bad_syntax}", "invalid TOML"),
    (SCORING, "--config {toml_unknown_top}", "unknown key 'dedupe'"),
    (SCORING, "--config {toml_unknown_key}", "unknown key 'dedup.num_perms'; did you mean 'dedup.num_perm'"),
    (SCORING, "--config {toml_method_key}", "unknown key 'dedup.bands'"),
    (SCORING, "--config {toml_wrong_type}", "'dedup.num_perm' must be an integer, got string"),
    (SCORING, "--config {toml_bool_for_int}", "'read.batch_rows' must be an integer, got boolean"),
    (SCORING, "--config {toml_str_for_list}", "'run.skip_stages' must be a list of strings"),
    (SCORING, "--config {toml_list_items}", "'run.skip_stages' must be a list of strings"),
    (SCORING, "--config {toml_scalar_section}", "'dedup' must be a table"),
    (SCORING, "--config {toml_bands}", "exceeds --num-perm 128"),
    (SCORING, "--config {toml_one_band_field}", "set both"),
    (SCORING, "--config {toml_labels_C}", "labels.C = 0.0"),
    (SCORING, "--config {toml_loss_enabled}", "loss.enabled = 'maybe'"),
    (SCORING, "--config {toml_regex}", "clean.placeholder_regex: not a valid RE2 pattern"),
    (SCORING, "--config {toml_clean_lists}", "needs 3 values"),
    (SCORING, "--config {toml_clean_frac}", "clean.max_dup_line_frac = 1.5"),
    (SCORING, "--config {toml_map_missing}", "has no column 'missing'"),
    (SCORING, "--config {toml_map_key}", "'question' is not a canonical column"),
    (SCORING, "--config {toml_compression}", "run.compression = 'zip'"),
    (SCORING, "--config {toml_contamination_ngram}", "contamination.ngram = 0"),
    (SCORING, "--config {toml_embed_dtype}", "embed.dtype = 'int8'"),
    (SCORING, "--config {toml_semdedup_niter}", "semdedup.niter = 0"),
    (SCORING, "--config {toml_tokens_cache}", "tokens.cache_chunks = -1"),
    (SCORING, "--bogus-flag 3", "unrecognized arguments: --bogus-flag"),
    # --- the executor (engine/run/ray.py): on select too ---
    (SCORING + ("select",), "--engine spark", "--engine spark (run.engine): expected one of local, ray"),
    (SCORING + ("select",), "--ray-address auto", "--ray-address auto: needs --engine ray"),
    # --- selection (engine.config.SELECT_OPTIONS); for `run` the score column is checked against the columns the
    # run will produce (the active stages' declared columns and the inputs'), before scoring ---
    (SELECTING, "--method bogus", "--method bogus"),
    (SELECTING, "--quality 'pl.col(\"x\"'", "--quality"),
    (SELECTING, "--quality 3", "not a polars expression"),
    (SELECTING, "--quality-weight -1", "--quality-weight -1"),
    (SELECTING, "--neighbours 1", "--neighbours 1"),
    (SELECTING, "--epsilon 1", "--epsilon 1"),
    (SELECTING, "--tau 2", "--tau 2"),
    (SELECTING, "--strata-rows 0", "--strata-rows 0"),
    (SELECTING, "--kcenter fast", "--kcenter fast"),
    (SELECTING, "--balance some", "--balance some"),
    (SELECTING, "--balance min:0", "--balance min:0"),
    (SELECTING, "--balance equal --budget tokens:1000", "needs a count or fraction"),
    (SELECTING, "--source-cap -3", "--source-cap -3"),
    (SELECTING, "--source-cap 2.5", "--source-cap 2.5"),
    (SELECTING, "--source-cap 3 --cap-by nosuchcolumn", "--cap-by nosuchcolumn"),
    (SELECTING, "--partitions -1", "--partitions -1"),
    (SELECTING, "--target {nope}", "--target"),
    (SELECTING, "--relevance bm25", "--relevance bm25"),
    (SELECTING, "--target-mode drop", "--target-mode drop"),
    (SELECTING, "--target-keep 0", "--target-keep 0"),
    (SELECTING, "--score nosuchcolumn", "--score nosuchcolumn: no such column"),
    (SELECTING, "--score prompt", "--score prompt: not a numeric column"),
    (SELECTING, "--budget -5", "--budget -5"),
    (SELECTING, "--budget 0", "--budget 0"),
    (SELECTING, "--budget abc", "--budget abc"),
    (SELECTING, "--budget 150%", "--budget 150%"),
    (SELECTING, "--budget inf", "--budget inf"),
    (SELECTING, "--budget tokens:0", "--budget tokens:0"),
    (SELECTING, "--budget 2.5", "--budget 2.5"),
    (SELECTING, "--seed -1", "--seed -1"),
    (SELECTING, "--config {toml_select_budget}", "--budget lots"),
    (SELECTING, "--config {toml_select_budget_type}", "'select.budget' must be a string, got number"),
    (("select",), "{nope}", "no such folder"),
    (("select",), "--out {file}", "exists and is not a folder"),
    (("select",), "--seed abc", "argument --seed: invalid int value"),
    (("run",), "--score label_quality", "no such column"),  # label noise needs embeddings: off under --embedder none
    # --- split and inspect ---
    (("split",), "{nope}", "no scores/ folder"),
    (("split",), "--fractions 0.5,0.5", "--fractions 0.5,0.5"),
    (("split",), "--fractions a,b,c", "--fractions a,b,c"),
    (("split",), "--seed -1", "--seed -1"),
    (("split",), "--seed abc", "argument --seed: invalid int value"),
    (("split",), "--to {file}", "exists and is not a folder"),
    (("split",), "--threshold 1.5", "--threshold 1.5"),
    (("split",), "--max-group 0", "--max-group 0"),
    (("split",), "--search bogus", "--search bogus"),
    (("split",), "--check-sample -1", "--check-sample -1"),
    # --- fine-tune recipe (finetune; compare shares all but --seed) ---
    (RECIPE, "--task bogus", "--task bogus"),
    (("compare",), "--task sft", "--task sft: compare trains classifiers"),
    (RECIPE, "--model {nope}", "--model"),
    (RECIPE, "--lr 0", "--lr 0"),
    (RECIPE, "--lr abc", "argument --lr: invalid float value"),
    (RECIPE, "--epochs 0", "--epochs 0"),
    (RECIPE, "--batch-size 0", "--batch-size 0"),
    (RECIPE, "--max-length 4", "--max-length 4"),
    (("finetune",), "--seed -1", "--seed -1"),
    (RECIPE, "--max-steps 0", "--max-steps 0"),
    (RECIPE, "--patience -1", "--patience -1"),
    (RECIPE, "--device tpu", "--device tpu"),
    (RECIPE, "--strategy bogus", "--strategy bogus"),
    (RECIPE, "--last-k 0", "--last-k 0"),
    (RECIPE, "--imbalance bogus", "--imbalance bogus"),
    (RECIPE, "--adapter bogus", "--adapter bogus"),
    (RECIPE, "--lora-r 0", "--lora-r 0"),
    (RECIPE, "--lora-alpha 0", "--lora-alpha 0"),
    (("finetune",), "{nope}", "no such file or folder"),
    (("finetune",), "--out {file}", "exists and is not a folder"),
    (("finetune",), "--val {nope}", "--val and --test go together"),
    (("finetune",), "--test {nope}", "--val and --test go together"),
    # --- compare ---
    (("compare",), "--seeds 0", "--seeds 0"),
    (("compare",), "--n-boot 10", "--n-boot 10"),
    (("compare",), "--fractions 0.7,0.3", "--fractions 0.7,0.3"),
    (("compare",), "--corrupt labels=2", "--corrupt labels=2"),
    (("compare",), "--corrupt flips=0.1", "KIND=FRACTION"),
    (("compare",), "--budget tokens:1000", "compare needs a count or a fraction"),
    (("compare",), "--val {in}", "--val and --test go together"),
    (("compare",), "--val {nope} --test {nope}", "--val"),
    (("compare",), "--test {in} --val {in} --seeds -2", "--seeds -2"),
    (SELECTING, "--label-issues bogus", "--label-issues bogus"),
    (("inspect",), "{nope}", "no such folder"),
    (("inspect",), "{dir}", "no scores/part-*.parquet"),
    (("inspect",), "--json --bogus", "unrecognized arguments: --bogus"),
    (("report",), "{nope}", "no such folder"),
    (("report",), "{dir}", "no manifest.json"),
    (("report",), "--out {dir}", "is a folder"),
    (("report",), "--out {nope}/r.html", "does not exist"),
]
# Flags that take no value: nothing to get wrong alone (contradictions are in CASES: --loss --no-loss, --semdedup)
SWITCHES = {
    "--quiet",
    "--no-normalize",
    "--no-clean",
    "--no-near-dedup",
    "--no-token-count",
    "--no-exact-dedup",
    "--no-label-noise",
    "--ascending",
    "--json",
    "--help",
    "--full",
    "--raw",
}
NEEDS_NO_GPU = {"--embed-device cuda", "--loss-device cuda"}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    d = tmp_path_factory.mktemp("options")
    rows = [
        {
            "instruction": f"Question number {i}: what is {i} plus {i}?",
            "output": f"It is {2 * i}, since {i} and {i} make {2 * i}.",
            "uid": f"u{i}",
            "reward": i / 10,
        }
        for i in range(12)
    ]
    (d / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in TOML.items():
        (d / f"{name}.toml").write_text(text)
    (d / "binary.toml").write_bytes(bytes(range(256)) * 4)
    (d / "a_file").write_text("not a folder")
    (d / "empty_dir").mkdir()
    # a scored run folder (what select, split and inspect read), written directly: the cases never get past checks
    scores = d / "run" / "scores"
    scores.mkdir(parents=True)
    n = len(rows)
    str_col = lambda values: pa.array(values, pa.large_string())
    pq.write_table(pa.table({
        "id": str_col([f"x-{i}" for i in range(n)]), "prompt": str_col([r["instruction"] for r in rows]),
        "response": str_col([r["output"] for r in rows]), "source": str_col([str(d / "in.jsonl")] * n),
        "row": pa.array(range(n), pa.int64()), "format": str_col(["alpaca"] * n), "verdict": str_col(["kept"] * n),
        "prompt_chars": pa.array([len(r["instruction"]) for r in rows], pa.int32()),
        "response_chars": pa.array([len(r["output"]) for r in rows], pa.int32()),
        "n_words": pa.array([float(i) for i in range(n)]), "minhash_cluster": pa.nulls(n, pa.int64()),
    }), scores / "part-00000-0000.parquet")  # fmt: skip
    return d


def _argv(cmd: str, args: str, paths: Path, out: Path) -> list[str]:
    subst = {
        "{nope}": str(paths / "no_such_thing"),
        "{file}": str(paths / "a_file"),
        "{dir}": str(paths / "empty_dir"),
        "{bin}": str(paths / "binary.toml"),
        "{in}": str(paths / "in.jsonl"),
        "{run}": str(paths / "run"),
    }
    subst.update({f"{{toml_{k}}}": str(paths / f"{k}.toml") for k in TOML})

    def fill(text: str) -> list[str]:
        for k, v in subst.items():
            text = text.replace(k, v)
        return text.split()

    given = fill(args)
    head = {
        "score": "{in}",
        "run": "{in}",
        "select": "{run}",
        "split": "{run}",
        "inspect": "{run}",
        "report": "{run}",
        "finetune": "{run}",
        "compare": "{in}",
    }[cmd]
    if given and not given[0].startswith("-"):  # the case replaces the positional argument
        head, given = given[0], given[1:]
    out_flag = {"split": "--to", "inspect": None}.get(cmd, "--out")
    argv = [cmd, *fill(head)]
    if out_flag and out_flag not in given:
        argv += [out_flag, str(out)]
    if cmd != "inspect":
        argv.append("-q")
    return argv + fill(BASE.get(cmd, "")) + given


def _main(argv: list[str], capsys) -> tuple[int, list[str]]:
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip()]


PARAMS = [pytest.param(cmd, args, want, id=f"{cmd} {args}") for cmds, args, want in CASES for cmd in cmds]


@pytest.mark.parametrize("cmd, args, want", PARAMS)
def test_bad_option_is_one_line_exit_2_and_nothing_written(cmd, args, want, paths, tmp_path, capsys):
    if any(g in args for g in NEEDS_NO_GPU) and _cuda_present({}):
        pytest.skip("a CUDA GPU is present: --*-device cuda is valid here")
    out = tmp_path / "out"
    code, lines = _main(_argv(cmd, args, paths, out), capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines  # one line, no traceback
    assert want in lines[0], lines[0]
    assert lines[0].startswith("winnow: error: ")
    assert not out.exists()  # no run folder (nor selection, nor splits) was started


def test_run_without_input_checks_before_writing_the_demo(tmp_path, capsys):
    out = tmp_path / "demo_run"
    code, lines = _main(["run", "--out", str(out), "-q", "--num-perm", "0"], capsys)
    assert code == 2 and len(lines) == 1 and "--num-perm 0" in lines[0]
    assert not out.exists()


def test_every_flag_has_a_bad_value():
    """Every flag of every subcommand is in CASES (or is a switch, which takes no value): a new flag needs a bad
    value here, and so a check."""
    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subs) == {"score", "select", "run", "split", "inspect", "report", "finetune", "compare"}
    tokens = {cmd: set() for cmd in subs}
    positional = set()  # commands with a case that replaces the positional argument
    for cmds, args, _want in CASES:
        for cmd in cmds:
            tokens[cmd].update(args.split())
            if not args.startswith("-"):
                positional.add(cmd)
    missing = []
    for cmd, p in subs.items():
        for action in p._actions:
            if not action.option_strings:
                if cmd not in positional:
                    missing.append(f"{cmd} {action.metavar or action.dest}")
                continue
            flag = max(action.option_strings, key=len)
            if flag not in tokens[cmd] and flag not in SWITCHES:
                missing.append(f"{cmd} {flag}")
    assert not missing, f"flags without a bad value in CASES: {missing}"
    registered = {o.flag for o in all_options() if o.type is not None}
    covered = {t for cmds, args, _ in CASES for t in args.split()}
    assert registered <= covered, registered - covered


@pytest.mark.parametrize("cmd", ["score", "select", "run"])
def test_engine_ray_without_ray_names_the_install(cmd, paths, tmp_path, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    out = tmp_path / "out"
    code, lines = _main(_argv(cmd, "--engine ray", paths, out), capsys)
    assert code == 2 and len(lines) == 1, lines
    assert "--engine ray: Ray Data is not installed" in lines[0] and "make install" in lines[0]
    assert "pip install 'ray[data]'" in lines[0] and not out.exists()


def test_every_declared_range_accepts_its_default():
    """The defaults pass every check (a range that excluded them would fail every run)."""
    cfg = Config()
    validate(cfg)
    for o in all_options():
        o.check(getattr(getattr(cfg, o.section), o.field))


@pytest.mark.parametrize("args", [
    "--map prompt=instruction,response=output,id=uid",
    "--map prompt=instruction,response=output,label=uid --format mapped",
    "--loss-priority reward --max-response-chars -1 --min-response-chars 0 --num-perm 16 --label-folds 2",
    "--semdedup-threshold -1 --dedup-threshold 0.5 --seed 7 --workers 0 --skip-stages clean minhash",
    "--embedder none --semdedup-threshold 1",
])  # fmt: skip
def test_good_options_pass_the_checks(args, paths, tmp_path):
    """What the checks must accept (``--map id=COL`` included): parsed and checked as `run` does, no error."""
    argv = _argv("run", args + " --score reward --budget 0.5", paths, tmp_path / "out")
    parsed = cli.build_parser().parse_args(argv)
    cfg = cli._checked_config(parsed, with_select=True)
    assert not (tmp_path / "out").exists()
    if "id=uid" in args:
        assert cfg.read.map == {"prompt": "instruction", "response": "output", "id": "uid"}


@pytest.mark.parametrize("budget, kind, value", [
    ("5000", "count", 5000), ("1e3", "count", 1000), ("1", "count", 1), ("0.2", "fraction", 0.2),
    ("1.0", "fraction", 1.0), ("20%", "fraction", 0.2), ("100%", "fraction", 1.0), ("tokens:2e6", "tokens", 2e6),
])  # fmt: skip
def test_budget_parse_accepts(budget, kind, value):
    from engine.select.selection import Budget

    b = Budget.parse(budget)
    assert (b.kind, b.value) == (kind, pytest.approx(value))


def test_map_id_column_becomes_the_row_id(paths, tmp_path, capsys):
    """--map id=COL is accepted end to end: the run succeeds and COL's values are the ids."""
    out = tmp_path / "out"
    argv = _argv("score", "--map prompt=instruction,response=output,id=uid --no-near-dedup --no-loss", paths, out)
    code, lines = _main(argv, capsys)
    assert code == 0, lines
    ids = pa.concat_tables(pq.read_table(p, columns=["id"]) for p in sorted((out / "scores").glob("part-*.parquet")))
    assert sorted(ids.column("id").to_pylist()) == sorted(f"u{i}" for i in range(12))


def test_map_column_missing_in_one_of_several_shards(paths, tmp_path):
    """The shard schemas are peeked at before the map phase: Parquet from its metadata, JSONL from its first
    lines; the error names the file at fault and the column."""
    pq.write_table(pa.table({"instruction": ["q"], "output": ["a"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"instruction": ["q"], "answer": ["a"]}), tmp_path / "b.parquet")
    (tmp_path / "c.jsonl").write_text(json.dumps({"instruction": "q", "output": "a"}) + "\n")
    cfg = load_config(overrides={"read": {"map": {"prompt": "instruction", "response": "output"}}})
    shards, _ = discover([str(tmp_path / "a.parquet"), str(tmp_path / "c.jsonl")])
    check_inputs(cfg, shards)
    shards, _ = discover([str(tmp_path)])
    with pytest.raises(UserError, match=r"b\.parquet has no column 'output'"):
        check_inputs(cfg, shards)


def test_input_columns_are_peeked_cheaply(tmp_path):
    """Column names (and types where the format has them) of every input kind, without reading the shard."""
    import gzip

    from engine.config import input_columns

    t = pa.table({"instruction": ["q"] * 3, "output": ["a"] * 3, "reward": [1.0, 2.0, 3.0]})
    pq.write_table(t, tmp_path / "a.parquet")
    with pa.OSFile(str(tmp_path / "f.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
        w.write_table(t)
    with pa.OSFile(str(tmp_path / "s.arrows"), "wb") as f, pa.ipc.new_stream(f, t.schema) as w:
        w.write_table(t)
    lines = [json.dumps(r) for r in t.to_pylist()]
    (tmp_path / "l.jsonl").write_text("\n".join(lines) + "\n")
    with gzip.open(tmp_path / "g.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (tmp_path / "arr.json").write_text("[" + ", ".join(lines) + "]")
    (tmp_path / "bad.jsonl").write_text("{not json\n" + "\n".join(lines) + "\n")  # a malformed line: keys only
    (tmp_path / "long.jsonl").write_text(json.dumps({"instruction": "x" * (3 << 20), "output": "a"}) + "\n")
    shards, _ = discover([str(tmp_path)])
    got = {Path(sh.path).name: input_columns(sh) for sh in shards}
    for name in ("a.parquet", "f.arrow", "s.arrows", "l.jsonl", "g.jsonl.gz"):
        assert list(got[name]) == ["instruction", "output", "reward"], name
        assert pa.types.is_floating(got[name]["reward"]), name
    assert got["arr.json"] == got["bad.jsonl"] == {"instruction": None, "output": None, "reward": None}
    assert set(got["long.jsonl"]) == {"instruction", "output"}


def test_config_values_keep_their_types():
    """An integer in a float field is stored as a float (the resume key hashes the config); bools are not ints."""
    cfg = load_config(overrides={"dedup": {"threshold": 1}})
    assert cfg.dedup.threshold == 1.0 and isinstance(cfg.dedup.threshold, float)
    with pytest.raises(UserError, match="must be an integer, got boolean"):
        load_config(overrides={"dedup": {"num_perm": True}})


def test_check_fields_names_the_flag_or_the_key():
    from engine.stages.labels import LabelNoiseConfig

    with pytest.raises(ValueError, match=r"^labels\.max_iter = 0: expected an integer >= 1$"):
        registry.check_fields(LabelNoiseConfig(max_iter=0), "labels", max_iter=registry.Range(1))
    with pytest.raises(ValueError, match=r"^--label-folds 1 \(labels\.n_folds\): expected an integer >= 2$"):
        registry.check_fields(LabelNoiseConfig(n_folds=1), "labels", n_folds=registry.Range(2))


@pytest.mark.parametrize("argv, want", [
    (["score", "x.jsonl", "--out", "o", "--batch-rows", "abc"], "argument --batch-rows: invalid int value: 'abc'"),
    (["score", "{in}", "--out", "{out}", "--config", "{bin}"], "not a text file"),
])  # fmt: skip
def test_real_cli_prints_one_line(argv, want, paths, tmp_path):
    argv = [
        a.replace("{in}", str(paths / "in.jsonl"))
        .replace("{out}", str(tmp_path / "o"))
        .replace("{bin}", str(paths / "binary.toml"))
        for a in argv
    ]
    r = subprocess.run(
        [sys.executable, "cli.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and want in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


def test_requires_python_has_tomllib():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'requires-python = ">=3.11"' in text  # engine.config imports tomllib (Python 3.11+)
