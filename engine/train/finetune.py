"""``cli.py finetune SEL --task classification|sft --out MODEL``: one entry point, two trainers.

This module owns what both tasks share: the config (one dataclass, one CLI flag per field), reading the rows to
train and evaluate on, the leak check against the evaluation sets, and the ``MODEL/metrics.json`` envelope. The
trainers live beside it, one noun per file:
- ``engine.train.classify.train_classifier(train, val, test, config, out) -> dict`` (sequence classification:
  ``AutoModelForSequenceClassification`` on the local MiniLM encoder by default);
- ``engine.train.sft.train_sft(train, val, test, config, out) -> dict`` (causal-LM SFT: SmolLM2-135M by default,
  LoRA via peft or full).
Each writes a ``save_pretrained`` folder into ``out`` and a training log ``out/train_log.jsonl``, and returns its
metrics (validation and test); ``finetune`` adds the envelope and writes ``metrics.json``.

**Rows.** ``SEL`` is a selection folder (``SEL/selected.parquet``), a run folder (``RUN/selected/selected.parquet``),
or any file or folder of rows. winnow's own Parquet files (``selected.parquet``, ``scores/``, ``splits/*.parquet``)
are read as they are; any other input (a user's JSONL or Parquet: alpaca, chat, classification...) goes through
winnow's readers and canonicalisation, so ``prompt``, ``response`` and ``label`` mean what they mean everywhere
else (a classification row's text is ``response``). A selected row oversampled by ``--balance`` is repeated
``selection_repeats`` times. Training reads kept rows only when a ``verdict`` column is present.

**Evaluation sets.** ``--val FILE --test FILE``; else, when SEL lies in a run folder that holds ``splits/`` (made by
``cli.py split RUN``), that run's ``splits/val.parquet`` and ``splits/test.parquet``. Either way, training rows whose
``id`` or exact text is in the validation or test set are dropped before training (counted in
``metrics.json`` as ``leak_dropped``), and with ``splits/assignment.parquet`` present every training row outside
the train split is dropped too (a selection made over the whole run would otherwise train on test neighbours).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa

from engine.errors import UserError
from engine.registry import Option, Range, expected

TASKS = ("classification", "sft")


@dataclass
class FinetuneConfig:
    # classification | sft.
    task: str = "classification"
    # Local model folder ("" = the task's default: the shipped MiniLM encoder for classification, the shipped
    # SmolLM2-135M-Instruct for sft). Never downloaded.
    model: str = ""
    # Learning rate (-1 = the task's and strategy's default, chosen by the trainer and recorded in metrics.json).
    lr: float = -1.0
    # Passes over the training rows (early stopping may end sooner).
    epochs: int = 3
    # Rows per optimiser step (-1 = the trainer's default for the task and strategy).
    batch_size: int = -1
    # Tokens per row; longer rows are truncated (-1 = the trainer's default: 128 classification, 512 sft).
    max_length: int = -1
    # Seed of initialisation, shuffling and dropout.
    seed: int = 0
    # Stop after this many optimiser steps (-1 = no cap); bounds a CPU run.
    max_steps: int = -1
    # Epochs without a better validation loss before stopping (0 = no early stopping).
    patience: int = 2
    # auto (CUDA when present) | cpu | cuda.
    device: str = "auto"
    # classification: head (encoder frozen; the head trains on cached features) | last-k (top --last-k layers
    # unfrozen) | full | gradual (one more layer unfrozen from the top each epoch).
    strategy: str = "head"
    # classification, strategy last-k: how many top encoder layers train.
    last_k: int = 2
    # classification: weight (class-weighted loss) | resample (class-balanced sampling) | none.
    imbalance: str = "weight"
    # sft: lora (peft adapters, merged into the saved model) | full (every weight trains).
    adapter: str = "lora"
    # sft, adapter lora: rank of the LoRA matrices.
    lora_r: int = 16
    # sft, adapter lora: LoRA alpha (scaling = alpha / r).
    lora_alpha: int = 32


FINETUNE_OPTIONS = [
    Option("--task", "task", "classification | sft (default: classification)", allowed=TASKS),
    Option("--model", "model", "local model folder (default: MiniLM for classification, SmolLM2-135M for sft)"),
    Option(
        "--lr",
        "lr",
        "learning rate (default: -1 = the trainer's default for the task and strategy)",
        float,
        allowed=Range(0, lo_open=True, also=(-1,)),
    ),
    Option("--epochs", "epochs", "passes over the training rows (default: 3)", int, allowed=Range(1)),
    Option(
        "--batch-size",
        "batch_size",
        "rows per optimiser step (default: -1 = the trainer's default)",
        int,
        allowed=Range(1, also=(-1,)),
    ),
    Option(
        "--max-length",
        "max_length",
        "tokens per row, longer rows truncated (default: -1 = 128 classification, 512 sft)",
        int,
        allowed=Range(8, also=(-1,)),
    ),
    Option("--seed", "seed", "seed of initialisation and shuffling (default: 0)", int, allowed=Range(0)),
    Option(
        "--max-steps",
        "max_steps",
        "stop after N optimiser steps (default: -1 = no cap)",
        int,
        allowed=Range(1, also=(-1,)),
    ),
    Option(
        "--patience",
        "patience",
        "epochs without a better validation loss before stopping (default: 2; 0 = off)",
        int,
        allowed=Range(0),
    ),
    Option("--device", "device", "auto | cpu | cuda (default: auto)", allowed=("auto", "cpu", "cuda")),
    Option(
        "--strategy",
        "strategy",
        "classification: head | last-k | full | gradual (default: head)",
        allowed=("head", "last-k", "full", "gradual"),
    ),
    Option(
        "--last-k",
        "last_k",
        "classification, --strategy last-k: top layers trained (default: 2)",
        int,
        allowed=Range(1),
    ),
    Option(
        "--imbalance",
        "imbalance",
        "classification: weight | resample | none (default: weight)",
        allowed=("weight", "resample", "none"),
    ),
    Option("--adapter", "adapter", "sft: lora | full (default: lora)", allowed=("lora", "full")),
    Option("--lora-r", "lora_r", "sft, LoRA rank (default: 16)", int, allowed=Range(1)),
    Option("--lora-alpha", "lora_alpha", "sft, LoRA alpha (default: 32)", int, allowed=Range(1)),
]


def check_config(config: FinetuneConfig) -> None:
    """UserError naming the flag of the first field outside what it allows."""
    for o in FINETUNE_OPTIONS:
        v = getattr(config, o.field)
        if o.allowed is not None and (want := expected(o.allowed, v)) is not None:
            raise UserError(f"{o.flag} {v}: expected {want}")
    if config.model and not Path(config.model).is_dir():
        raise UserError(f"--model {config.model}: no such folder (a local model folder; nothing is downloaded)")


def config_from_args(args) -> FinetuneConfig:
    """FinetuneConfig from argparse values (``dest`` = the field name; None = not given)."""
    cfg = FinetuneConfig()
    for f in fields(FinetuneConfig):
        v = getattr(args, f.name, None)
        if v is not None:
            setattr(cfg, f.name, v)
    check_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------------------------

ROW_COLUMNS = ("id", "prompt", "response", "label")


def _winnow_parquet(path: Path) -> bool:
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid):
        return False
    return {"id", "prompt", "response", "verdict"} <= set(names)


def _rows_of(path: Path) -> list[Path]:
    """winnow Parquet files standing for ``path`` (a selection, run, scores/ or splits/ file), or []."""
    if path.is_file():
        return [path] if path.suffix == ".parquet" and _winnow_parquet(path) else []
    for cand in (path / "selected.parquet", path / "selected" / "selected.parquet"):
        if cand.is_file():
            return [cand]
    for d in (path / "scores", path):
        parts = sorted(d.glob("part-*.parquet"))
        if parts and _winnow_parquet(parts[0]):
            return parts
    return []


def _read_input_rows(path: str, what: str) -> pl.DataFrame:
    """A user's own file or folder of rows, through winnow's readers: canonical prompt / response / label."""
    from engine.io.readers import discover, read_shard
    from engine.io.schema import canonicalize, detect_format

    shards, _warnings = discover([path])
    if not shards:
        raise UserError(f"{what} {path}: no readable rows (.parquet .arrow .jsonl .jsonl.gz .json)")
    frames = []
    for si, shard in enumerate(shards):
        fmt = None
        for batch in read_shard(shard):
            if fmt is None:
                have = [n for n in batch.schema.names if not n.startswith("__")]
                fmt = detect_format(have)
            out = canonicalize(batch, fmt, shard.path, None, f"{what.lstrip('-')}{si}")
            t = pa.Table.from_batches([out]).select([c for c in ROW_COLUMNS + ("verdict",) if c in out.schema.names])
            frames.append(pl.from_arrow(t))
    df = pl.concat(frames, how="diagonal_relaxed")
    bad = df.filter(pl.col("verdict") != "kept") if "verdict" in df.columns else df.clear()
    if bad.height:
        raise UserError(f"{what} {path}: {bad.height} row(s) could not be read, e.g. {bad['id'][0]}; fix the input")
    return df


def load_rows(path: str | Path, what: str, kept_only: bool = True) -> pl.DataFrame:
    """Rows of ``path`` as a frame with ``id``, ``prompt``, ``response``, ``label`` (module docstring); ``what``
    names the flag or argument in errors. Oversampled selected rows are repeated."""
    p = Path(path)
    if not p.exists():
        raise UserError(f"{what} {path}: no such file or folder")
    files = _rows_of(p)
    if not files:
        df = _read_input_rows(str(p), what)
    else:
        frames = []
        for f in files:
            df = pl.read_parquet(f)
            if kept_only and "verdict" in df.columns:
                df = df.filter(pl.col("verdict") == "kept")
            keep = [c for c in ROW_COLUMNS + ("selection_repeats",) if c in df.columns]
            frames.append(df.select(keep))
        df = pl.concat(frames, how="diagonal_relaxed")
        if "selection_repeats" in df.columns:
            reps = df["selection_repeats"].fill_null(1).to_numpy().clip(1)
            df = df.drop("selection_repeats")
            if (reps > 1).any():
                df = df[np.repeat(np.arange(df.height), reps)]
    for c in ROW_COLUMNS:
        if c not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias(c))
    df = df.with_columns(pl.col("prompt").fill_null(""), pl.col("response").fill_null(""))
    if not df.height:
        raise UserError(f"{what} {path}: no rows to use (no kept rows?)")
    return df.select(ROW_COLUMNS)


def _splits_dir(selection: Path) -> Path | None:
    """RUN/splits for a selection inside a run folder (RUN/selected, RUN itself), if ``cli.py split`` made one."""
    for run in (selection, selection.parent, selection.parent.parent):
        s = run / "splits"
        if (s / "val.parquet").is_file() and (s / "test.parquet").is_file():
            return s
    return None


def _text_key(df: pl.DataFrame) -> pl.Series:
    return (df["prompt"] + "\x1f" + df["response"]).alias("_key")


def drop_leaks(
    train: pl.DataFrame, held_out: list[pl.DataFrame], assignment: Path | None = None
) -> tuple[pl.DataFrame, int]:
    """Training rows without any row whose id or exact prompt + response is in a held-out set, nor (with a split's
    assignment.parquet) any row assigned to another split. Returns (rows, how many were dropped)."""
    ids = set()
    keys = set()
    for h in held_out:
        ids.update(x for x in h["id"].to_list() if x is not None)
        keys.update(_text_key(h).to_list())
    bad = train["id"].is_in(list(ids)) | _text_key(train).is_in(list(keys))
    if assignment is not None and assignment.is_file():
        a = pl.read_parquet(assignment, columns=["id", "split"])
        other = a.filter(pl.col("split") != "train")["id"]
        bad = bad | train["id"].is_in(other.implode())
    n = int(bad.sum())
    return train.filter(~bad), n


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_libraries(quiet: bool = True):
    """Inside the block, with ``quiet``: no progress bars nor warnings from transformers (weight loading and saving
    bars), datasets (TRL's map passes) or huggingface_hub; the trainers switch off their own bars and log printing
    (``progress=False``). Restored afterwards."""
    if not quiet:
        yield
        return
    import logging

    from transformers.utils import logging as hf_logging

    restore = []
    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    restore.append(lambda: hf_logging.set_verbosity(level))
    restore.append(lambda: hf_logging.enable_progress_bar() if bars else None)
    try:
        from datasets.utils import logging as ds_logging

        ds_bars = ds_logging.is_progress_bar_enabled()
        ds_logging.disable_progress_bar()
        restore.append(lambda: ds_logging.enable_progress_bar() if ds_bars else None)
    except ImportError:  # datasets comes with trl; a classification-only install may lack it
        pass
    old = {name: logging.getLogger(name).level for name in ("trl", "peft", "datasets", "huggingface_hub")}
    for name in old:
        logging.getLogger(name).setLevel(logging.ERROR)
    restore.append(lambda: [logging.getLogger(n).setLevel(lv) for n, lv in old.items()])
    try:
        yield
    finally:
        for f in reversed(restore):
            f()


def finetune(
    selection: str | Path,
    out: str | Path,
    config: FinetuneConfig,
    val: str | None = None,
    test: str | None = None,
    progress: bool = True,
) -> dict:
    """Train ``config.task`` on the rows of ``selection``, evaluate on val/test, write ``out`` (module docstring).
    ``progress`` False (``--quiet``): no progress bar, log line or library warning is printed (quiet_libraries)."""
    check_config(config)
    sel = Path(selection)
    train = load_rows(sel, "SEL")
    assignment = None
    if val is None and test is None:
        s = _splits_dir(sel)
        if s is None:
            raise UserError(
                f"{selection}: give --val FILE and --test FILE, or make a leak-free split first "
                "(`cli.py split RUN`) and select from that run"
            )
        val, test, assignment = str(s / "val.parquet"), str(s / "test.parquet"), s / "assignment.parquet"
    elif val is None or test is None:
        raise UserError("--val and --test go together: give both, or neither to use RUN/splits/")
    val_df, test_df = load_rows(val, "--val"), load_rows(test, "--test")
    unlabelled = {}
    if config.task == "classification":
        # A mixed corpus (instruction rows beside labelled text, like the demo's) trains the classifier on its
        # labelled rows; the others are counted, not an error, unless no row of a set has a label.
        for name, what, src in (("train", "SEL", selection), ("val", "--val", val), ("test", "--test", test)):
            df = {"train": train, "val": val_df, "test": test_df}[name]
            n = int(df["label"].is_null().sum())
            if n == df.height:
                raise UserError(
                    f"{what} {src}: no row has a label; classification needs labelled rows "
                    "(--task sft for instruction data)"
                )
            unlabelled[name] = n
        train, val_df, test_df = (d.filter(pl.col("label").is_not_null()) for d in (train, val_df, test_df))
    train, leaked = drop_leaks(train, [val_df, test_df], assignment)
    if not train.height:
        raise UserError(f"{selection}: every training row is also in --val/--test; nothing left to train on")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with quiet_libraries(not progress):
        if config.task == "classification":
            from engine.train.classify import train_classifier

            metrics = train_classifier(train, val_df, test_df, config, out, progress=progress)
        else:
            from engine.train.sft import train_sft

            metrics = train_sft(train, val_df, test_df, config, out, progress=progress)
    envelope = {
        "task": config.task,
        "selection": str(selection),
        "val": str(val),
        "test": str(test),
        "rows": {
            "train": train.height,
            "val": val_df.height,
            "test": test_df.height,
            "leak_dropped": leaked,
            **({"unlabelled_dropped": unlabelled} if unlabelled else {}),
        },
        "config": asdict(config),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    metrics = {**envelope, **metrics}
    from engine.io.writers import write_json_atomic

    write_json_atomic(out / "metrics.json", json.loads(json.dumps(metrics, default=_jsonable)))
    return metrics


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
