"""Selection: pick a budget of ``kept`` rows from a scores folder and write them out.

Methods: ``topk`` on a score column (highest first, or lowest with ``ascending``; ties and nulls broken by input
order, nulls last) and ``random`` (seeded). Budgets: a count (``5000``), a fraction of the kept rows (``0.2`` or
``20%``) or a token budget (``tokens:2e6``). Tokens are the ``response_tokens`` + ``prompt_tokens`` columns where
a stage has counted them, else estimated as (prompt_chars + response_chars) / 4, the usual English
characters-per-token ratio of BPE tokenizers; the manifest says which.

Writes ``SEL/selected.parquet`` (every column), ``SEL/selected.jsonl`` (each row in its input's own format: the
input's columns as they were read, so fine-tuning tools load it directly) and ``SEL/manifest.json``.
Memory: the selection reads only (id, shard, row, score, length) columns; rows are copied out batch by batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.config import SelectConfig
from engine.errors import UserError
from engine.io.columns import unescape
from engine.io.writers import META_INPUT_COLUMNS, align_table, write_json_atomic

CHARS_PER_TOKEN = 4.0


@dataclass
class Budget:
    kind: str  # count | fraction | tokens
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        t = str(text).strip().lower()
        try:
            if t.startswith("tokens:"):
                v = float(t.split(":", 1)[1])
                if v <= 0:
                    raise ValueError
                return cls("tokens", v)
            if t.endswith("%"):
                v = float(t[:-1]) / 100
                if not 0 < v <= 1:
                    raise ValueError
                return cls("fraction", v)
            v = float(t)
        except ValueError:
            raise UserError(
                f"--budget {text}: expected a count (5000), a fraction (0.2 or 20%) or tokens (tokens:2e6)"
            ) from None
        if 0 < v < 1 or (v == 1 and "." in t):
            return cls("fraction", v)
        if v >= 1 and v == int(v):
            return cls("count", v)
        raise UserError(f"--budget {text}: must be a positive count, a fraction in (0, 1], or tokens:N")


def _parts(scores_dir: Path) -> list[Path]:
    d = Path(scores_dir)
    if (d / "scores").is_dir():
        d = d / "scores"
    if not d.exists():
        raise UserError(f"{scores_dir}: no such folder (expected a run folder or its scores/ folder)")
    files = sorted(d.glob("part-*.parquet"))
    if not files:
        raise UserError(f"{scores_dir}: no scores/part-*.parquet here; run `cli.py score` first")
    return files


def _read_columns(files: list[Path], columns: list[str]) -> pl.DataFrame:
    frames = []
    for i, f in enumerate(files):
        avail = pq.read_schema(f).names
        t = pq.read_table(f, columns=[c for c in columns if c in avail])
        df = pl.from_arrow(t).with_columns(pl.lit(i, dtype=pl.Int32).alias("_part"))
        for c in columns:
            if c not in avail:
                df = df.with_columns(pl.lit(None).alias(c))
        frames.append(df)
    return pl.concat(frames, how="diagonal_relaxed").with_row_index("_order")


def select(scores_dir: str | Path, out: str | Path, config: SelectConfig, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    files = _parts(Path(scores_dir))
    schemas = [pq.read_schema(f) for f in files]
    all_cols = set().union(*(s.names for s in schemas))
    method = config.method
    if method == "auto":
        method = "topk" if config.score else "random"
    if method not in ("topk", "random"):
        raise UserError(f"--method {method}: choose topk or random")
    if method == "topk":
        if not config.score:
            raise UserError("--method topk needs --score COLUMN (a numeric score column of the scores folder)")
        if config.score not in all_cols:
            numeric = sorted(
                f.name for s in schemas for f in s if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
            )
            raise UserError(f"--score {config.score}: no such column; numeric columns are {sorted(set(numeric))}")
    budget = Budget.parse(config.budget)
    tok_cols = ["prompt_tokens", "response_tokens"] if {"prompt_tokens", "response_tokens"} <= all_cols else []
    cols = ["id", "verdict", "row", "prompt_chars", "response_chars"] + tok_cols
    if method == "topk":
        cols.append(config.score)
    df = _read_columns(files, list(dict.fromkeys(cols)))
    rows_total = df.height
    kept = df.filter(pl.col("verdict") == "kept")
    if tok_cols:
        kept = kept.with_columns((pl.col("prompt_tokens") + pl.col("response_tokens")).alias("_tokens"))
        token_source = "prompt_tokens + response_tokens"
    else:
        kept = kept.with_columns(
            ((pl.col("prompt_chars").fill_null(0) + pl.col("response_chars").fill_null(0)) / CHARS_PER_TOKEN)
            .ceil()
            .alias("_tokens")
        )
        token_source = f"(prompt_chars + response_chars) / {CHARS_PER_TOKEN:g}"
    if method == "topk":
        kept = kept.sort([config.score, "_order"], descending=[not config.ascending, False], nulls_last=True)
    else:
        rng = np.random.default_rng(seed)
        kept = kept.with_columns(pl.Series("_rand", rng.permutation(kept.height))).sort("_rand")
    if budget.kind == "count":
        n = min(int(budget.value), kept.height)
    elif budget.kind == "fraction":
        n = min(kept.height, math.floor(budget.value * kept.height + 1e-9))
    else:
        cum = kept["_tokens"].cum_sum().to_numpy() if kept.height else np.zeros(0)
        n = int(np.searchsorted(cum, budget.value, side="right"))
    chosen = kept.head(n)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = _write_selected(files, chosen, out)
    manifest = {
        "scores": str(Path(scores_dir)),
        "method": method,
        "score": config.score or None,
        "ascending": config.ascending,
        "budget": config.budget,
        "budget_kind": budget.kind,
        "seed": seed,
        "rows_in_scores": rows_total,
        "rows_kept": kept.height,
        "selected": chosen.height,
        "tokens_selected": float(chosen["_tokens"].sum() or 0),
        "token_count": token_source,
        "score_stats": _stats(chosen, config.score) if method == "topk" else None,
        "files": written,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _stats(df: pl.DataFrame, col: str) -> dict | None:
    if not df.height:
        return None
    s = df[col].cast(pl.Float64)
    return {"min": s.min(), "mean": s.mean(), "max": s.max()}


def _write_selected(files: list[Path], chosen: pl.DataFrame, out: Path) -> list[str]:
    pq_path, jl_path = out / "selected.parquet", out / "selected.jsonl"
    tmp_pq, tmp_jl = out / "selected.parquet.tmp", out / "selected.jsonl.tmp"
    by_part = chosen.group_by("_part").agg(pl.col("row")) if chosen.height else None
    wanted: dict[int, set] = {}
    if by_part is not None:
        for part, rows in by_part.iter_rows():
            wanted[part] = rows
    writer = None
    schema0 = None
    with open(tmp_jl, "wb") as jl:
        for i, f in enumerate(files):
            if i not in wanted:
                continue
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            in_cols = json.loads(meta.get(META_INPUT_COLUMNS, b"[]"))
            rows = pa.array(np.asarray(wanted[i], dtype=np.int64))
            for b in pf.iter_batches():
                sel = b.filter(pc.is_in(b.column("row"), value_set=rows))
                if not sel.num_rows:
                    continue
                if writer is None:
                    schema0 = sel.schema
                    writer = pq.ParquetWriter(tmp_pq, schema0, compression="zstd")
                t = pa.Table.from_batches([sel])
                if not t.schema.equals(schema0, check_metadata=False):
                    t = align_table(t, schema0)
                if t is not None:
                    writer.write_table(t)
                _write_jsonl(sel, in_cols, jl)
    if writer is None:
        pq.write_table(pa.table({"id": pa.array([], pa.large_string())}), tmp_pq)
    else:
        writer.close()
    os.replace(tmp_pq, pq_path)
    os.replace(tmp_jl, jl_path)
    return [pq_path.name, jl_path.name]


def _write_jsonl(batch: pa.RecordBatch, in_cols: list[str], fh) -> None:
    """Rows in their input's own format: the input's columns under their original names."""
    cols = [c for c in in_cols if c in batch.schema.names]
    if not cols:  # no input columns known (should not happen): fall back to the canonical prompt/response
        cols = ["prompt", "response"]
    t = pa.Table.from_batches([batch.select(cols)])
    t = t.rename_columns([unescape(c) for c in cols])
    pl.from_arrow(t).write_ndjson(fh)
