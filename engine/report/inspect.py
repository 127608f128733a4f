"""``cli.py inspect DIR``: what a run folder holds (rows, verdicts, columns, score ranges), read from the
manifest and the Parquet metadata/column statistics, never the text."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import UserError


def inspect_run(run: str | Path) -> dict:
    run = Path(run)
    if not run.exists():
        raise UserError(f"{run}: no such folder")
    scores = run / "scores" if (run / "scores").is_dir() else run
    files = sorted(scores.glob("part-*.parquet"))
    if not files:
        raise UserError(f"{run}: no scores/part-*.parquet (is this a run folder written by `cli.py score`?)")
    manifest = json.loads((run / "manifest.json").read_text()) if (run / "manifest.json").exists() else None
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    numeric = [
        f.name
        for f in schema
        if (pa.types.is_integer(f.type) or pa.types.is_floating(f.type))
        and f.name not in ("row",)
        and not pa.types.is_uint64(f.type)
    ]
    frames = []
    for f in files:
        avail = pq.read_schema(f).names
        frames.append(pl.from_arrow(pq.read_table(f, columns=["verdict"] + [c for c in numeric if c in avail])))
    df = pl.concat(frames, how="diagonal_relaxed")
    verdicts = dict(sorted(df["verdict"].value_counts().iter_rows(), key=lambda kv: -kv[1]))
    stats = {}
    kept = df.filter(pl.col("verdict") == "kept")
    for c in numeric:
        s = kept[c].cast(pl.Float64).drop_nulls()
        if len(s):
            stats[c] = {"min": s.min(), "mean": s.mean(), "max": s.max(), "non_null": len(s)}
    out = {
        "run": str(run),
        "parts": len(files),
        "rows": df.height,
        "verdicts": verdicts,
        "columns": {f.name: str(f.type) for f in schema},
        "score_stats_kept_rows": stats,
    }
    if manifest:
        out["manifest"] = {k: manifest.get(k) for k in ("rows_in", "kept", "timings", "warnings")}
        out["inputs"] = [{k: i.get(k) for k in ("path", "format", "rows")} for i in manifest.get("inputs", [])]
    if (run / "selected" / "manifest.json").exists():
        sm = json.loads((run / "selected" / "manifest.json").read_text())
        out["selected"] = {k: sm.get(k) for k in ("method", "score", "budget", "selected", "tokens_selected")}
    return out


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    con.print(f"[b]{s['run']}[/b]: {s['rows']:,} rows in {s['parts']} part(s)")
    for i in s.get("inputs", []):
        con.print(f"  input {i['path']} ({i['format']}, {i['rows']:,} rows)")
    t = Table(title="verdicts")
    t.add_column("verdict")
    t.add_column("rows", justify="right")
    for v, c in s["verdicts"].items():
        t.add_row(v, f"{c:,}")
    con.print(t)
    if s["score_stats_kept_rows"]:
        t = Table(title="scores (kept rows)")
        for c in ("column", "min", "mean", "max"):
            t.add_column(c, justify="right" if c != "column" else "left")
        for c, st in s["score_stats_kept_rows"].items():
            t.add_row(c, f"{st['min']:.4g}", f"{st['mean']:.4g}", f"{st['max']:.4g}")
        con.print(t)
    if "selected" in s:
        con.print(f"selected: {s['selected']}")
