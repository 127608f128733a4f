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
from engine.io.writers import META_INPUT_COLUMNS, write_json_atomic

CHARS_PER_TOKEN = 4.0


@dataclass
class Budget:
    kind: str  # count | fraction | tokens
    value: float

    @classmethod
    def parse(cls, text: str) -> Budget:
        """``5000`` -> count; ``0.2`` / ``20%`` / ``1.0`` -> fraction of the kept rows in (0, 1]; ``tokens:2e6`` ->
        tokens. Anything else (zero, negative, infinite, a non-integer count, a percentage over 100) is a UserError."""
        t = str(text).strip().lower()
        bad = UserError(f"--budget {text}: expected a count (5000), a fraction of the kept rows in (0, 1] (0.2 or "
                        "20%) or tokens (tokens:2e6)")
        try:
            if t.startswith("tokens:"):
                v = float(t.split(":", 1)[1])
                kind = "tokens"
            elif t.endswith("%"):
                v = float(t[:-1]) / 100
                kind = "fraction"
            else:
                v = float(t)
                kind = "fraction" if v < 1 or (v == 1 and "." in t) else "count"
        except ValueError:
            raise bad from None
        if not (math.isfinite(v) and v > 0) or (kind == "fraction" and v > 1) or (kind == "count" and v != int(v)):
            raise bad
        return cls(kind, v)


def check_options(config: SelectConfig, columns: dict | None = None, complete: bool = True) -> tuple[str, Budget]:
    """(method, budget) of ``config``, or a UserError naming the flag: the method, the budget and, when the columns
    are known (name -> Arrow type, None = numeric or unknown: a scores folder's, or what a run will produce), that
    ``--score`` names a numeric one. Runs before any row is read."""
    method = config.method
    if method == "auto":
        method = "topk" if config.score else "random"
    if method not in ("topk", "random"):
        raise UserError(f"--method {config.method}: expected one of auto, topk, random")
    if method == "topk" and not config.score:
        raise UserError("--method topk needs --score COLUMN (a numeric score column of the scores folder)")
    budget = Budget.parse(config.budget)
    if method == "topk" and columns is not None:
        from engine.config import check_column

        check_column("--score", config.score, columns, complete)
    return method, budget


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
    method, budget = check_options(config, {f.name: f.type for s in schemas for f in s})
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
    written, rebuilt = _write_selected(files, chosen, out, Path(scores_dir))
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
        # selected.jsonl copies each JSON-lines row as it was read; these inputs changed since scoring, so their rows
        # were rebuilt from the scored columns instead
        "jsonl_rebuilt_from_scores": rebuilt,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _stats(df: pl.DataFrame, col: str) -> dict | None:
    if not df.height:
        return None
    s = df[col].cast(pl.Float64)
    return {"min": s.min(), "mean": s.mean(), "max": s.max()}


def _run_inputs(scores_dir: Path) -> dict[str, dict]:
    """{input path: its manifest entry (kind, size, hash)} from the run folder's manifest, if there is one."""
    d = Path(scores_dir)
    for m in (d / "manifest.json", d.parent / "manifest.json"):
        if m.is_file():
            try:
                return {e["path"]: e for e in json.loads(m.read_text()).get("inputs", []) if e.get("path")}
            except (OSError, ValueError, TypeError, KeyError):
                return {}
    return {}


def union_schema(schemas: list[pa.Schema]) -> pa.Schema:
    """Every column of every part, in first-seen order; a column whose type differs between parts gets the type
    Arrow promotes both to, or large_string (values as text) when there is none."""
    fields: dict[str, pa.Field] = {}
    for sch in schemas:
        for f in sch:
            old = fields.get(f.name)
            if old is None:
                fields[f.name] = f.remove_metadata()
            elif not old.type.equals(f.type):
                try:
                    fields[f.name] = pa.unify_schemas([pa.schema([old]), pa.schema([f.remove_metadata()])],
                                                      promote_options="permissive").field(0)
                except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                    fields[f.name] = pa.field(f.name, pa.large_string())
    return pa.schema(list(fields.values()))


def _conform(t: pa.Table, schema: pa.Schema) -> pa.Table:
    """``t`` in ``schema``: missing columns as nulls, other types cast (to text through JSON where Arrow cannot)."""
    cols = []
    for f in schema:
        if f.name not in t.column_names:
            cols.append(pa.nulls(t.num_rows, f.type))
            continue
        c = t.column(f.name)
        if c.type.equals(f.type):
            cols.append(c)
            continue
        try:
            cols.append(c.cast(f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            vals = [None if v is None else json.dumps(v, ensure_ascii=False, default=str) for v in c.to_pylist()]
            cols.append(pa.array(vals, f.type))
    return pa.Table.from_arrays(cols, schema=schema)


def _source_lines(path: str, kind: str, rows: np.ndarray, fh) -> None:
    """Copy the lines (JSONL; items of a JSON array) numbered ``rows`` (sorted) from the input file as they are."""
    import gzip

    if kind == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"["):
            data = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
            for r in rows:
                fh.write(json.dumps(data[int(r)], ensure_ascii=False).encode() + b"\n")
            return
    opener = gzip.open if kind == "jsonl.gz" else open
    want = iter(rows.tolist())
    nxt = next(want, None)
    with opener(path, "rb") as f:
        for i, line in enumerate(f):
            if nxt is None:
                break
            if i != nxt:
                continue
            if i == 0 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            fh.write(line if line.endswith(b"\n") else line + b"\n")
            nxt = next(want, None)


def _write_selected(files: list[Path], chosen: pl.DataFrame, out: Path,
                    scores_dir: Path | None = None) -> tuple[list[str], list[str]]:
    """``selected.parquet``: the chosen rows with every column of scores/ (the union of all parts' schemas, so rows
    of a chat shard behind an alpaca shard keep their ``messages``). ``selected.jsonl``: each chosen row exactly as
    it was read: the input's own line for JSON lines / JSON inputs whose content hash still matches the run's
    manifest, else (Parquet, Arrow, or a changed input) the row rebuilt from its input columns under their own
    names. Rows are in input order (shard, then row). Returns (file names, JSON inputs whose rows were rebuilt
    because the file changed or vanished since scoring)."""
    from engine.io.hashing import file_hash

    pq_path, jl_path = out / "selected.parquet", out / "selected.jsonl"
    tmp_pq, tmp_jl = out / "selected.parquet.tmp", out / "selected.jsonl.tmp"
    wanted: dict[int, np.ndarray] = {}
    if chosen.height:
        for part, rows in chosen.group_by("_part").agg(pl.col("row")).iter_rows():
            wanted[part] = np.sort(np.asarray(rows, dtype=np.int64))
    inputs = _run_inputs(scores_dir) if scores_dir is not None else {}
    pfs = {i: pq.ParquetFile(files[i]) for i in sorted(wanted)}
    schema = union_schema([pf.schema_arrow for pf in pfs.values()]) if pfs else None
    rebuilt: list[str] = []
    try:
        writer = pq.ParquetWriter(tmp_pq, schema, compression="zstd") if schema is not None else None
        # One pass over the chosen parts writes the Parquet file and collects what the JSONL needs per source.
        per_source: dict[str, dict] = {}
        for i, pf in pfs.items():
            rows = pa.array(wanted[i])
            meta = pf.schema_arrow.metadata or {}
            in_cols = json.loads(meta.get(META_INPUT_COLUMNS, b"[]"))
            for b in pf.iter_batches():
                sel = b.filter(pc.is_in(b.column("row"), value_set=rows))
                if not sel.num_rows:
                    continue
                writer.write_table(_conform(pa.Table.from_batches([sel]), schema))
                src = sel.column("source")[0].as_py()
                entry = per_source.setdefault(src, {"rows": [], "parts": [], "in_cols": in_cols})
                entry["rows"].append(sel.column("row").to_numpy())
                if i not in entry["parts"]:
                    entry["parts"].append(i)
        with open(tmp_jl, "wb") as jl:
            for src, entry in per_source.items():
                rows = np.sort(np.concatenate(entry["rows"]))
                info = inputs.get(src, {})
                kind = info.get("kind") or ""
                exact = kind in ("jsonl", "jsonl.gz", "json") and os.path.isfile(src) and info.get("hash") and \
                    file_hash(src) == info["hash"]
                if exact:
                    _source_lines(src, kind, rows, jl)
                    continue
                if kind in ("jsonl", "jsonl.gz", "json"):
                    rebuilt.append(src)
                for i in entry["parts"]:
                    rows_i = pa.array(wanted[i])
                    for b in pfs[i].iter_batches():
                        sel = b.filter(pc.is_in(b.column("row"), value_set=rows_i))
                        if sel.num_rows:
                            _write_jsonl(sel, entry["in_cols"], jl)
        if writer is None:
            pq.write_table(pa.table({"id": pa.array([], pa.large_string())}), tmp_pq)
        else:
            writer.close()
    except BaseException:
        tmp_pq.unlink(missing_ok=True)
        tmp_jl.unlink(missing_ok=True)
        raise
    os.replace(tmp_pq, pq_path)
    os.replace(tmp_jl, jl_path)
    return [pq_path.name, jl_path.name], rebuilt


def _write_jsonl(batch: pa.RecordBatch, in_cols: list[str], fh) -> None:
    """Rows rebuilt in their input's own format: the input's columns under their input names (engine.io.columns)."""
    cols = [c for c in in_cols if c in batch.schema.names]
    if not cols:  # no input columns known (should not happen): fall back to the canonical prompt/response
        cols = ["prompt", "response"]
    t = pa.Table.from_batches([batch.select(cols)])
    t = t.rename_columns([unescape(c) for c in cols])
    pl.from_arrow(t).write_ndjson(fh)
