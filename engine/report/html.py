"""``cli.py report DIR``: one self-contained HTML page over a run folder (``run`` writes ``DIR/report.html`` at its
end).

The page is one file a user can mail: the charts are inline SVG (engine/report/svg.py), the compare plot is embedded
as a base64 PNG, there is no script, font or stylesheet from the network, and every piece of user text (rows,
labels, sources, details) goes through ``html.escape``. Sections, each with its numbers beside its chart (cleanlab's
Datalab report and Data-Juicer's analysis pages are the anchors), and the command that made the run at the top:

1. rows in and verdict counts (with the check that the verdicts sum to ``rows_in``), inputs, timings;
2. score distributions with the thresholds the rules used (read from the manifest's config), rows split into
   selected / kept but not selected / rejected, and the selection's ``quality`` recomputed over every kept row;
3. sample rows per verdict (3 per verdict, seeded, text cut to 300 characters);
4. duplicate cluster sizes: exact (``duplicate_of``), near (``minhash_cluster``), semantic and label conflicts;
5. per-label and per-source counts before and after selection (``selected/manifest.json``);
6. a 2-D map of the kept rows' embeddings (PCA of up to 3,000 rows, seeded), selected vs not, with the mean cosine
   from a row to its nearest selected row against a random pick of the same size;
7. fine-tune metrics (``DIR/model/metrics.json``) and the compare table (``DIR/compare/compare.json`` or
   ``DIR/compare.json``) where present, read defensively: a missing key shows as absent, never as an error.

A section with nothing to show says why and which command would fill it, instead of staying blank.

Cost: the report reads only the columns it draws (verdict, ids, the score columns) for every row, text only for the
sampled rows, and embeddings part by part for the sampled kept rows, so it stays bounded on big runs. On the
3,000-row demo it takes about 0.3 s.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import os
import shlex
from html import escape
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from engine.errors import UserError
from engine.report import svg

SAMPLES_PER_VERDICT = 3
TEXT_CHARS = 300
MAP_POINTS = 3000
SEED = 0

SELECTED, KEPT, REJECTED = "#1f6fb4", "#9cc3e4", "#e8a49c"

# What each verdict means, in a few words (README "Verdicts" has the long form).
VERDICT_MEANING = {
    "kept": "passed every rule; a candidate for selection",
    "malformed": "unparseable line, invalid UTF-8, wrong type or missing field",
    "empty_prompt": "empty prompt",
    "empty_response": "empty response",
    "empty_text": "empty text",
    "too_short": "response shorter than rules.min_response_chars",
    "too_long": "response longer than rules.max_response_chars",
    "prompt_too_long": "prompt longer than rules.max_prompt_chars",
    "response_equals_prompt": "the response repeats the prompt exactly",
    "placeholder": "placeholder text (N/A, <noinput>, lorem ipsum, ...)",
    "no_content": "only punctuation, spaces or invisible characters",
    "repeated_words": "one short unit of words repeated",
    "random_letters": "letters typed at random",
    "refusal": 'boilerplate refusal ("As an AI language model ...")',
    "repeats_prompt": "the response echoes the whole prompt and adds little",
    "truncated": "cut off mid-sentence or with an unclosed code block",
    "script_mismatch": "answered in an unrelated script",
    "gopher_repetition": "repeated lines or n-grams (Gopher repetition table)",
    "gopher_quality": "Gopher quality filter (word count, word length, ellipses, ...)",
    "contaminated": "overlaps an evaluation set given with --against",
    "exact_duplicate": "same normalised prompt + response as an earlier row",
    "label_conflict": "same text as another row under a different label",
    "near_duplicate": "MinHash near copy of a kept row",
    "semantic_duplicate": "embedding within the semantic-dedup cosine of a kept row",
}

# The score columns drawn, in order: (column, title, x label, log x, verdicts its rules give).
SCORES = [
    (
        "response_chars",
        "Response length",
        "characters after normalisation (log scale)",
        True,
        ("too_short", "too_long", "empty_response", "empty_text"),
    ),
    ("n_words", "Response words", "words (log scale)", True, ("gopher_quality",)),
    ("frac_dup_line", "Duplicate lines", "share of lines equal to an earlier line", False, ("gopher_repetition",)),
    (
        "top_2gram_frac",
        "Most frequent word 2-gram",
        "share of characters in the most frequent 2-gram",
        False,
        ("gopher_repetition",),
    ),
    (
        "dup_5gram_frac",
        "Duplicated word 5-grams",
        "share of characters in 5-grams seen earlier in the text",
        False,
        ("gopher_repetition",),
    ),
    ("label_quality", "Label quality", "out-of-fold probability of the given label (self-confidence)", False, ()),
    ("ifd", "Instruction-following difficulty (IFD)", "loss(response | prompt) / loss(response)", False, ()),
    ("loss_response_given_prompt", "LM loss of the response", "nats per token, given the prompt", False, ()),
]


def _thresholds(col: str, cfg: dict) -> list[tuple[float, str]]:
    """(value, label) of the rule thresholds on ``col`` in the run's config; -1 (off) is left out."""
    r, c = cfg.get("rules", {}), cfg.get("clean", {})

    def on(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0

    out = []
    if col == "response_chars":
        if on(r.get("min_response_chars")) and r["min_response_chars"] > 1:
            out.append((r["min_response_chars"], f"too_short < {r['min_response_chars']:,}"))
        if on(r.get("max_response_chars")):
            out.append((r["max_response_chars"], f"too_long > {r['max_response_chars']:,}"))
    elif col == "n_words":
        if on(c.get("repetition_min_words")):
            out.append((c["repetition_min_words"], f"Gopher rules judge from {c['repetition_min_words']} words"))
        if on(c.get("max_words")):
            out.append((c["max_words"], f"gopher_quality > {c['max_words']:,}"))
    elif col == "frac_dup_line" and on(c.get("max_dup_line_frac")):
        out.append((c["max_dup_line_frac"], f"gopher_repetition > {c['max_dup_line_frac']:g}"))
    elif col == "top_2gram_frac" and c.get("max_top_ngram_frac") and on(c["max_top_ngram_frac"][0]):
        out.append((c["max_top_ngram_frac"][0], f"gopher_repetition > {c['max_top_ngram_frac'][0]:g}"))
    elif col == "dup_5gram_frac" and c.get("max_dup_ngram_frac") and on(c["max_dup_ngram_frac"][0]):
        out.append((c["max_dup_ngram_frac"][0], f"gopher_repetition > {c['max_dup_ngram_frac'][0]:g}"))
    elif col == "ifd":
        out.append((1.0, "quality 0 above 1"))
    return out


# ---------------------------------------------------------------------------------------------------------- reading


class _Run:
    """What the page draws, read once: the manifests and one frame of the light columns of every row."""

    def __init__(self, run: Path):
        self.dir = run
        if not run.is_dir():
            raise UserError(f"{run}: no such folder (give a run folder written by `cli.py run` or `cli.py score`)")
        mpath = run / "manifest.json"
        if not mpath.is_file():
            raise UserError(f"{run}: no manifest.json (is this a run folder written by `cli.py run` or `score`?)")
        self.manifest = _read_json(mpath, "manifest.json")
        self.parts = sorted((run / "scores").glob("part-*.parquet"))
        if not self.parts:
            raise UserError(f"{run}: no scores/part-*.parquet (the run did not finish; rerun it to resume)")
        self.cfg = self.manifest.get("config") or {}
        sel = run / "selected" / "manifest.json"
        self.sel = _read_json(sel, "selected/manifest.json") if sel.is_file() else None
        names: set[str] = set()
        for f in self.parts:
            names.update(pq.read_schema(f).names)
        self.columns = names
        want = [
            "id",
            "verdict",
            "duplicate_of",
            "minhash_cluster",
            "label",
            "label_name",
            "source",
            "label_issue",
            *[s[0] for s in SCORES],
            "response_tokens",
            "prompt_tokens",
        ]
        from engine.select import quality as Q

        self.quality_formula = (self.sel or {}).get("quality") or Q.DEFAULT
        qcols = Q.columns("" if self.quality_formula == Q.DEFAULT else self.quality_formula)
        want = list(dict.fromkeys(c for c in want + qcols if c in names))
        frames = []
        for i, f in enumerate(self.parts):
            have = set(pq.read_schema(f).names)
            t = pq.read_table(f, columns=[c for c in want if c in have])
            df = pl.from_arrow(t)
            frames.append(
                df.with_columns(
                    pl.lit(i, pl.Int32).alias("_part"), pl.int_range(0, df.height, dtype=pl.Int64).alias("_idx")
                )
            )
        df = pl.concat(frames, how="diagonal_relaxed")
        selected_ids: set = set()
        if self.sel is not None and (run / "selected" / "selected.parquet").is_file():
            selected_ids = set(pq.read_table(run / "selected" / "selected.parquet", columns=["id"])["id"].to_pylist())
        self.has_selection = bool(selected_ids) or self.sel is not None
        df = df.with_columns(
            pl.col("id").is_in(list(selected_ids)).alias("_selected")
            if selected_ids
            else pl.lit(False).alias("_selected")
        )
        df = df.with_columns(
            pl.when(pl.col("_selected"))
            .then(pl.lit("selected"))
            .when(pl.col("verdict") == "kept")
            .then(pl.lit("kept"))
            .otherwise(pl.lit("rejected"))
            .alias("_group")
        )
        self.rows = df
        self.quality = None
        self.quality_error = None
        kept = df.filter(pl.col("verdict") == "kept")
        if kept.height:
            try:
                q = Q.compute(kept, "" if self.quality_formula == Q.DEFAULT else self.quality_formula)
                self.quality = kept.select("_group").with_columns(q.alias("quality"))
            except UserError as e:
                self.quality_error = str(e)


def _read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------------------- helpers


def _e(x) -> str:
    return escape("" if x is None else str(x), quote=True)


def _pct(n: float, d: float) -> str:
    return f"{100 * n / d:.1f}%" if d else "n/a"


def _table(header: list[str], rows: list[list], cls: str = "") -> str:
    """An HTML table; cells are escaped unless they are a ``_Raw``."""
    h = "".join(f"<th>{_e(c)}</th>" for c in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _e(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    head = f"<thead><tr>{h}</tr></thead>" if any(header) else ""
    return f"<table class='{cls}'>{head}<tbody>{body}</tbody></table>"


class _Raw(str):
    """Markup built here (already escaped), placed in a table cell as is."""


def _num(x) -> str:
    if isinstance(x, bool) or x is None:
        return _e(x)
    if isinstance(x, int):
        return f"{x:,}"
    if isinstance(x, float):  # metrics: 4 significant digits (0.8125, 12.21), big ones compact
        return f"{x:.4g}" if math.isfinite(x) and 1e-4 <= abs(x) < 1e4 or x == 0 else svg.fmt(x)
    return _e(x)


def _section(anchor: str, title: str, body: str, note: str = "") -> str:
    n = f"<p class='note'>{note}</p>" if note else ""
    return f"<section id='{anchor}'><h2>{_e(title)}</h2>{n}{body}</section>"


def _figure(chart: str, numbers: str) -> str:
    return f"<div class='fig'><div class='chart'>{chart}</div><div class='nums'>{numbers}</div></div>"


def _empty(why: str) -> str:
    return f"<p class='empty'>{why}</p>"


def _cut(text, n: int = TEXT_CHARS) -> str:
    if text is None:
        return "<span class='null'>null</span>"
    s = str(text)
    more = f"<span class='more'> … (+{len(s) - n:,} characters)</span>" if len(s) > n else ""
    return f"{_e(s[:n])}{more}" if s else "<span class='null'>(empty)</span>"


# ---------------------------------------------------------------------------------------------------------- sections


def command_line(manifest: dict, run: Path) -> tuple[str, bool]:
    """The command that made the run: ``manifest["argv"]`` when recorded, else an equivalent one rebuilt from the
    manifest's inputs and the config fields that differ from the defaults (True = rebuilt)."""
    if manifest.get("argv"):
        return shlex.join(["python", "cli.py", *map(str, manifest["argv"])]), False
    cmd = manifest.get("command") or "score"
    cfg = manifest.get("config") or {}
    inputs = [str(i.get("path")) for i in manifest.get("inputs", []) if i.get("path")]
    demo_in, demo_eval = str(run / "demo" / "input"), str(run / "demo" / "eval")
    is_demo = cmd == "run" and inputs and all(p.startswith(demo_in) for p in inputs)
    args = ["python", "cli.py", cmd]
    if is_demo:
        inputs = []
    elif len(inputs) > 6:
        try:
            inputs = [os.path.commonpath(inputs)]
        except ValueError:
            inputs = inputs[:6] + ["..."]
    args += inputs + ["--out", str(run)]
    try:
        from engine.config import Config, all_options

        default = Config().to_dict()
        opts = all_options()
    except Exception:  # noqa: BLE001 - the rebuilt command is a courtesy; the page must not fail on it
        return shlex.join(args), True
    for o in opts:
        if cmd == "score" and o.section == "select":
            continue
        v = cfg.get(o.section, {}).get(o.field, None)
        d = default.get(o.section, {}).get(o.field, None)
        if v is None or v == d or o.section == "embed" and o.field == "fingerprint":
            continue
        if o.type is None:
            if v == o.value:
                args.append(o.flag)
            continue
        if is_demo and o.flag == "--against" and v == [demo_eval]:
            continue
        args += [o.flag, *map(str, v)] if isinstance(v, list) else [o.flag, str(v)]
    m = cfg.get("read", {}).get("map")
    if m:
        args += ["--map", ",".join(f"{k}={v}" for k, v in m.items())]
    return shlex.join(args), True


def _header(r: _Run, command: str | None) -> str:
    m = r.manifest
    cmd, rebuilt = (command, False) if command else command_line(m, r.dir)
    how = (
        "equivalent command, rebuilt from manifest.json (the config fields that differ from the defaults)"
        if rebuilt
        else "command"
    )
    t = m.get("timings", {})
    resolved = m.get("resolved") or {}
    emb = (resolved.get("embed") or {}) if isinstance(resolved, dict) else {}
    emb_s = (emb.get("tier") or emb.get("choice")) if isinstance(emb, dict) else None
    facts = [
        ("winnow", m.get("winnow_version")),
        ("rows in", f"{m.get('rows_in', 0):,}"),
        ("kept", f"{m.get('kept', 0):,} ({_pct(m.get('kept', 0), m.get('rows_in', 0))})"),
        (
            "selected",
            f"{r.sel.get('selected', 0):,} ({_pct(r.sel.get('selected', 0), r.sel.get('rows_kept', 0))} of kept)"
            if r.sel
            else "no selection",
        ),
        ("embedder", emb_s or (r.cfg.get("embed", {}) or {}).get("embedder")),
        ("seed", m.get("seed")),
        ("scoring time", f"{t.get('total_s', 0):.1f} s" if t else None),
        ("selection time", f"{(r.sel or {}).get('seconds', {}).get('total', 0):.1f} s" if r.sel else None),
    ]
    dl = "".join(f"<div><dt>{_e(k)}</dt><dd>{_e(v)}</dd></div>" for k, v in facts if v is not None)
    gen = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<header><h1>winnow report: {_e(r.dir)}</h1><p class='note'>{_e(how)}:</p>"
        f"<pre class='cmd'>{_e(cmd)}</pre><dl class='facts'>{dl}</dl>"
        f"<p class='note'>Written {gen} from {_e(r.dir / 'manifest.json')}"
        f"{' and ' + _e(r.dir / 'selected' / 'manifest.json') if r.sel else ''}.</p></header>"
    )


def _verdicts(r: _Run) -> str:
    m = r.manifest
    n = int(m.get("rows_in", 0))
    v = m.get("verdicts", {}) or {}
    total = sum(v.values())
    vmax = max(v.values(), default=1) or 1
    rows = []
    for k, c in v.items():
        bar = _Raw(
            f"<span class='bar' style='width:{max(1, round(160 * c / vmax))}px;background:"
            f"{KEPT if k == 'kept' else REJECTED}'></span>"
        )
        rows.append(
            [
                k,
                _Raw(f"<span class='r'>{c:,}</span>"),
                _Raw(f"<span class='r'>{_pct(c, n)}</span>"),
                bar,
                VERDICT_MEANING.get(k, ""),
            ]
        )
    ok = total == n
    check = (
        f"<p class='{'ok' if ok else 'bad'}'>Verdicts sum to {total:,} {'=' if ok else '≠'} rows_in {n:,}: "
        f"{'every input row is accounted for' if ok else 'rows are missing or counted twice'}.</p>"
    )
    inputs = m.get("inputs", []) or []
    irows = [
        [
            i.get("path"),
            i.get("format"),
            _Raw(f"<span class='r'>{(i.get('rows') or 0):,}</span>"),
            _Raw(f"<span class='r'>{(i.get('size') or 0) / 1e6:.2f}</span>"),
            "yes" if i.get("reused") else "",
        ]
        for i in inputs[:50]
    ]
    more = (
        f"<p class='note'>... and {len(inputs) - 50:,} more inputs (manifest.json lists all).</p>"
        if len(inputs) > 50
        else ""
    )
    t = m.get("timings", {}) or {}
    g = t.get("global_s", {}) or {}
    trows = [
        ["map phase (read, rules, MinHash, embeddings, ...)", f"{t.get('map_s', 0):.1f}"],
        *[[f"global: {k.removesuffix('_s')}", f"{s:.1f}"] for k, s in g.items() if isinstance(s, (int, float))],
        ["finalize (write scores/)", f"{t.get('finalize_s', 0):.1f}"],
        ["total scoring", f"{t.get('total_s', 0):.1f}"],
    ]
    if r.sel:
        trows.append(["selection", f"{(r.sel.get('seconds') or {}).get('total', 0):.1f}"])
    body = (
        _table(["verdict", "rows", "share", "", "meaning"], rows, "verdicts")
        + check
        + "<h3>Inputs</h3>"
        + _table(["path", "format", "rows", "MB", "reused"], irows)
        + more
        + "<h3>Timings</h3>"
        + _table(["step", "seconds"], trows, "narrow")
        + f"<p class='note'>{t.get('shards_done', 0)} shard(s) scored by {t.get('workers', 0)} worker(s), "
        f"{t.get('shards_reused', 0)} reused from an earlier run.</p>"
    )
    return _section(
        "verdicts",
        f"Rows in and verdicts ({n:,} rows)",
        body,
        "Every input row gets exactly one verdict: kept, or the first rule that rejected it.",
    )


def _hist_edges(vals: np.ndarray, log_x: bool, lines: list, bins: int = 40) -> np.ndarray:
    """Bin edges over the values; a linear axis also reaches the thresholds (a share of 0.5 is drawn where it is
    even when every row scored 0), a log axis does not (a 32,768-character limit would squash 300-character rows)."""
    lo, hi = float(vals.min()), float(vals.max())
    if log_x:
        lo = max(lo, 1.0)
        hi = max(hi, lo * 1.01)
        return np.logspace(math.log10(lo), math.log10(hi) + 1e-9, bins + 1)
    if lines:
        hi = max(hi, max(v for v, _l in lines) * 1.05)
    if hi <= lo:
        lo, hi = (0.0, 1.0) if lo == 0 else (lo - abs(lo) * 0.5, lo + abs(lo) * 0.5)
    return np.linspace(lo, hi, bins + 1)


def _dist_block(
    title: str,
    xlabel: str,
    col: str,
    frame: pl.DataFrame,
    groups: list[tuple[str, str, str]],
    log_x: bool,
    lines: list[tuple[float, str]],
    extra: list[tuple[str, str]],
) -> str:
    s = frame.select(pl.col(col).cast(pl.Float64).alias("v"), "_group").drop_nulls("v").filter(pl.col("v").is_finite())
    if not s.height:
        return ""
    vals = s["v"].to_numpy()
    if log_x:
        vals = np.maximum(vals, 1.0)
    edges = _hist_edges(vals, log_x, lines)
    stacks = []
    nums = []
    for key, name, color in groups:
        g = s.filter(pl.col("_group") == key)["v"].to_numpy()
        if log_x:
            g = np.maximum(g, 1.0)
        if not len(g):
            continue
        counts, _ = np.histogram(np.clip(g, edges[0], edges[-1]), bins=edges)
        stacks.append((name, counts, color))
        p5, p50, p95 = np.percentile(g, [5, 50, 95])
        nums.append(
            [
                _Raw(f"<span class='sw' style='background:{color}'></span>{_e(name)}"),
                _Raw(f"<span class='r'>{len(g):,}</span>"),
                svg.fmt(p50),
                f"{svg.fmt(p5)} – {svg.fmt(p95)}",
            ]
        )
    chart = svg.histogram(edges, stacks, lines, log_x, xlabel)
    tab = _table(["rows", "n", "median", "5% – 95%"], nums, "narrow")
    thr = ""
    for v, label in lines:
        if " < " in label:
            above, side = int((s["v"] < v).sum()), "below"
        elif " > " in label:
            above, side = int((s["v"] > v).sum()), "above"
        else:
            above, side = int((s["v"] >= v).sum()), "at or above"
        where = "" if edges[0] <= v <= edges[-1] else " (outside the range drawn)"
        thr += f"<li><b>{_e(label)}</b>{_e(where)}: {above:,} rows {side}</li>"
    ex = "".join(f"<li>{_e(k)}: {v}</li>" for k, v in extra)
    lst = f"<ul>{thr}{ex}</ul>" if thr or ex else ""
    return f"<h3>{_e(title)} <code>{_e(col)}</code></h3>" + _figure(chart, tab + lst)


def _distributions(r: _Run) -> str:
    df = r.rows
    groups = [
        ("selected", "selected", SELECTED),
        ("kept", "kept, not selected" if r.has_selection else "kept", KEPT),
        ("rejected", "rejected", REJECTED),
    ]
    blocks = []
    verdicts = r.manifest.get("verdicts", {}) or {}
    for col, title, xlabel, log_x, rule_verdicts in SCORES:
        if col not in df.columns:
            continue
        extra = [(f"verdict {v}", f"{verdicts[v]:,} rows") for v in rule_verdicts if verdicts.get(v)]
        if col == "label_quality" and "label_issue" in df.columns:
            k = df.filter(pl.col("verdict") == "kept")
            extra.append(
                (
                    "label_issue (likely wrong label) among kept rows",
                    (
                        f"{int(k['label_issue'].fill_null(False).sum()):,} of "
                        f"{int(k['label_quality'].is_not_null().sum()):,} labelled"
                    ),
                )
            )
        blocks.append(_dist_block(title, xlabel, col, df, groups, log_x, _thresholds(col, r.cfg), extra))
    if r.quality is not None:
        blocks.append(
            _dist_block(
                "Selection quality (kept rows)",
                "quality in [0, 1]: the mean of the signals present",
                "quality",
                r.quality,
                groups[:2],
                False,
                [],
                [("formula", f"<code>{_e(r.quality_formula)}</code>")],
            )
        )
    elif r.quality_error:
        blocks.append(_empty(f"quality could not be recomputed: {_e(r.quality_error)}"))
    blocks = [b for b in blocks if b]
    if not blocks:
        return _section(
            "scores",
            "Score distributions",
            _empty("No score columns in scores/ (the clean and rules stages were skipped)."),
        )
    note = (
        "Histograms over every row with a value (rows rejected before a signal was computed have none). Dashed "
        "red lines are the thresholds this run's rules used; the numbers beside each chart are per group."
    )
    return _section("scores", "Score distributions", "".join(blocks), note)


def _samples(r: _Run) -> str:
    df = r.rows
    order = list((r.manifest.get("verdicts") or {}).keys()) or sorted(df["verdict"].unique().to_list())
    picks = []
    for v in order:
        sub = df.filter(pl.col("verdict") == v)
        if not sub.height:
            continue
        if sub.height > SAMPLES_PER_VERDICT:
            sub = sub.sample(SAMPLES_PER_VERDICT, seed=SEED).sort(["_part", "_idx"])
        picks.append(sub.select("verdict", "_part", "_idx", "id", "_selected"))
    if not picks:
        return _section("samples", "Sample rows per verdict", _empty("No rows."))
    picked = pl.concat(picks)
    texts: dict[tuple[int, int], dict] = {}
    for part in picked["_part"].unique().to_list():
        idx = picked.filter(pl.col("_part") == part)["_idx"].to_list()
        f = r.parts[part]
        have = pq.read_schema(f).names
        cols = [c for c in ("prompt", "response", "detail", "duplicate_of", "label", "source", "raw") if c in have]
        t = pq.read_table(f, columns=cols).take(pa.array(idx, pa.int64())).to_pylist()
        for i, row in zip(idx, t, strict=True):
            texts[(part, i)] = row
    out = []
    for v in order:
        sub = picked.filter(pl.col("verdict") == v)
        if not sub.height:
            continue
        rows = []
        for part, i, rid, sel in sub.select("_part", "_idx", "id", "_selected").iter_rows():
            t = texts.get((part, i), {})
            what = t.get("raw") if v == "malformed" and t.get("raw") else t.get("response")
            extra = []
            if t.get("detail"):
                extra.append(f"detail: {_e(t['detail'])}")
            if t.get("duplicate_of") and t["duplicate_of"] not in str(t.get("detail")):
                extra.append(f"duplicate of {_e(t['duplicate_of'])}")
            if t.get("label") is not None:
                extra.append(f"label: {_e(t['label'])}")
            if sel:
                extra.append("<b>selected</b>")
            src = Path(str(t.get("source") or "")).name
            rows.append(
                [
                    _Raw(f"<code>{_e(rid)}</code><br><span class='note'>{_e(src)}</span>"),
                    _Raw(_cut(t.get("prompt"))),
                    _Raw(_cut(what)),
                    _Raw("<br>".join(extra)),
                ]
            )
        n = (r.manifest.get("verdicts") or {}).get(v, sub.height)
        out.append(
            f"<h3>{_e(v)} <span class='note'>({n:,} rows; {sub.height} shown)</span></h3>"
            + _table(["id / file", "prompt", "response (raw line if malformed)", "why"], rows, "samples")
        )
    note = (
        f"Up to {SAMPLES_PER_VERDICT} rows per verdict, drawn at random (seed {SEED}); text cut at "
        f"{TEXT_CHARS} characters. Classification and plain-text rows have an empty prompt: their text is the "
        "response."
    )
    return _section("samples", "Sample rows per verdict", "".join(out), note)


def _size_buckets(sizes: np.ndarray) -> tuple[list[str], list[int], list[int]]:
    edges = [2, 3, 4, 5, 10, 20, 50, 100, 1000]
    labels, clusters, rows = [], [], []
    for i, lo in enumerate(edges):
        hi = edges[i + 1] if i + 1 < len(edges) else None
        m = (sizes >= lo) & (sizes < hi) if hi else sizes >= lo
        if not m.any():
            continue
        labels.append("size " + (str(lo) if hi == lo + 1 else (f"{lo}–{hi - 1}" if hi else f"{lo}+")))
        clusters.append(int(m.sum()))
        rows.append(int(sizes[m].sum()))
    return labels, clusters, rows


def _duplicates(r: _Run) -> str:
    df = r.rows
    kinds = []
    for verdict, title in (
        ("exact_duplicate", "Exact duplicates"),
        ("semantic_duplicate", "Semantic duplicates"),
        ("label_conflict", "Label conflicts"),
    ):
        if "duplicate_of" not in df.columns:
            break
        d = df.filter((pl.col("verdict") == verdict) & pl.col("duplicate_of").is_not_null())
        if d.height:
            g = d.group_by("duplicate_of").len()
            kinds.append(
                (
                    title,
                    verdict,
                    g["len"].to_numpy() + 1,
                    g.sort("len", descending=True)["duplicate_of"][0],
                    f"rows with verdict {verdict}, grouped by the kept row they name (duplicate_of) + that row",
                )
            )
    if "minhash_cluster" in df.columns:
        c = df.filter(pl.col("minhash_cluster").is_not_null())
        if c.height:
            g = c.group_by("minhash_cluster").len()
            kinds.insert(
                1 if kinds else 0,
                (
                    "Near duplicates (MinHash)",
                    "near_duplicate",
                    g["len"].to_numpy(),
                    None,
                    "rows sharing a minhash_cluster (one row per cluster is kept)",
                ),
            )
    if not kinds:
        dd = r.cfg.get("dedup", {}) or {}
        why = "near dedup was off (--no-near-dedup); " if dd.get("enabled") is False else ""
        return _section(
            "duplicates",
            "Duplicate clusters",
            _empty(f"No duplicate clusters: {why}no two rows were exact, near or semantic copies."),
        )
    verdicts = r.manifest.get("verdicts", {}) or {}
    out = []
    for title, verdict, sizes, biggest, how in kinds:
        labels, clusters, rows = _size_buckets(sizes)
        chart = svg.bars(
            labels,
            [("clusters", clusters, SELECTED), ("rows in them", rows, KEPT)],
            "clusters (and rows) by cluster size",
            label_chars=10,
        )
        nums = _table(
            ["", ""],
            [
                ["clusters", f"{len(sizes):,}"],
                ["rows in clusters", f"{int(sizes.sum()):,}"],
                ["largest cluster", f"{int(sizes.max()):,} rows"],
                ["mean size", f"{sizes.mean():.2f}"],
                [f"rows rejected as {verdict}", f"{verdicts.get(verdict, 0):,}"],
            ],
            "narrow",
        )
        ex = ""
        if biggest is not None:
            ex = f"<p class='note'>largest cluster's kept row: <code>{_e(biggest)}</code></p>"
        out.append(f"<h3>{_e(title)}</h3><p class='note'>{_e(how)}</p>" + _figure(chart, nums + ex))
    note = "A cluster of size s is one kept row and s - 1 rejected copies; sizes are bucketed (2, 3, 4, 5–9, ...)."
    return _section("duplicates", "Duplicate clusters", "".join(out), note)


def _label_names(r: _Run) -> dict:
    """label -> "label (label_name)" where the input has a ``label_name`` column (classification data whose labels
    are class ids: "0 (negative)")."""
    if "label_name" not in r.rows.columns or "label" not in r.rows.columns:
        return {}
    pairs = r.rows.filter(pl.col("label_name").is_not_null() & pl.col("label").is_not_null())
    pairs = pairs.group_by("label", "label_name").len().sort("len", descending=True).unique("label", keep="first")
    return {lab: f"{lab} ({name})" for lab, name in pairs.select("label", "label_name").iter_rows() if name != lab}


def _before_after(
    title: str, before: dict, after: dict, what: str, base: bool = False, rename: dict | None = None
) -> str:
    keys = sorted(set(before) | set(after), key=lambda k: -(before.get(k, 0)))
    if not keys:
        return ""
    shown = keys[:25]
    rename = rename or {}
    names = [Path(k).name if base else rename.get(k, k if k != "" else "(no label)") for k in shown]
    nb, na = sum(before.values()) or 1, sum(after.values()) or 1
    chart = svg.bars(
        names,
        [
            ("kept (before)", [before.get(k, 0) for k in shown], KEPT),
            ("selected (after)", [after.get(k, 0) for k in shown], SELECTED),
        ],
        "rows",
    )
    rows = [
        [
            _Raw(f"<span title='{_e(k)}'>{_e(n)}</span>"),
            _Raw(f"<span class='r'>{before.get(k, 0):,}</span>"),
            _Raw(f"<span class='r'>{after.get(k, 0):,}</span>"),
            f"{_pct(before.get(k, 0), nb)} → {_pct(after.get(k, 0), na)}",
            _pct(after.get(k, 0), before.get(k, 0)),
        ]
        for k, n in zip(shown, names, strict=True)
    ]
    more = f"<p class='note'>{len(keys) - 25} more {what}s in selected/manifest.json.</p>" if len(keys) > 25 else ""
    return f"<h3>{_e(title)}</h3>" + _figure(
        chart, _table([what, "kept", "selected", "share kept → selected", "kept rows selected"], rows, "narrow") + more
    )


def _selection(r: _Run) -> str:
    s = r.sel
    if not s:
        return _section(
            "selection",
            "Selection: labels and sources before and after",
            _empty(
                f"No selection in this run folder: <code>python cli.py select {_e(r.dir)} --out "
                f"{_e(r.dir / 'selected')}</code> makes one (<code>cli.py run</code> does it after scoring)."
            ),
        )
    p = s.get("parameters") or {}
    facts = [
        ["method", s.get("method")],
        ["budget", (f"{s.get('budget')} ({s.get('budget_kind')}, {(s.get('budget_rows') or 0):,} rows)")],
        ["kept rows (candidates)", f"{(s.get('rows_kept') or 0):,}"],
        ["selected", f"{(s.get('selected') or 0):,} ({_pct(s.get('selected') or 0, s.get('rows_kept') or 0)})"],
        ["tokens selected", f"{(s.get('tokens_selected') or 0):,.0f} ({s.get('token_count')})"],
        ["objective", _num(s.get("objective"))],
        ["parameters", ", ".join(f"{k}={v}" for k, v in p.items()) if isinstance(p, dict) else str(p)],
    ]
    if s.get("balance") and s.get("balance") != "none":
        facts.append(["label quotas", f"{s.get('balance')}: {s.get('quotas')}"])
    if s.get("oversampled"):
        facts.append(["oversampled (repeated) labels", json.dumps(s["oversampled"])])
    if s.get("source_cap"):
        facts.append(["source cap", f"{s['source_cap']} per {s.get('cap_by')}"])
    body = _table(["", ""], facts, "narrow")
    lab = _before_after(
        "Per label", s.get("labels_before") or {}, s.get("labels_after") or {}, "label", rename=_label_names(r)
    )
    sb, sa = s.get("sources_before") or {}, s.get("sources_after") or {}
    if not sb and "source" in r.rows.columns:  # the selection manifest has none: count them from scores/
        k = r.rows.filter(pl.col("verdict") == "kept")
        sb = dict(k.group_by("source").len().iter_rows())
        sa = dict(k.filter(pl.col("_selected")).group_by("source").len().iter_rows())
    src = _before_after("Per source (input file)", sb, sa, "source", base=True)
    body += lab or _empty(
        "No labelled rows (labels appear with classification data: <code>text</code> + <code>label</code> columns)."
    )
    body += src
    return _section(
        "selection",
        "Selection: labels and sources before and after",
        body,
        "Before = the kept rows (the candidates); after = the selected rows. A selection that skews the "
        "label mix can train a worse model than a random pick of the same size.",
    )


def _embedding_map(r: _Run) -> str:
    title = "Embedding map: kept rows, selected or not"
    if "embedding" not in r.columns:
        emb = (r.cfg.get("embed") or {}).get("embedder")
        return _section(
            "map",
            title,
            _empty(
                f"No embeddings in this run (embedder: {_e(emb)}); rerun with <code>--embedder static</code> (fast) or "
                "<code>--embedder minilm</code> to draw the map."
            ),
        )
    kept = r.rows.filter(pl.col("verdict") == "kept").select("_part", "_idx", "_selected")
    if not kept.height:
        return _section("map", title, _empty("No kept rows."))
    n_kept = kept.height
    if n_kept > MAP_POINTS:
        kept = kept.sample(MAP_POINTS, seed=SEED)
    kept = kept.sort(["_part", "_idx"])
    vecs, sel = [], []
    for part in kept["_part"].unique().sort().to_list():
        k = kept.filter(pl.col("_part") == part)
        col = pq.read_table(r.parts[part], columns=["embedding"])["embedding"].combine_chunks()
        col = col.take(pa.array(k["_idx"].to_list(), pa.int64()))
        valid = np.asarray(col.is_valid())
        if not valid.any():
            continue
        col = col.filter(pa.array(valid))
        d = col.type.list_size if pa.types.is_fixed_size_list(col.type) else len(col[0].as_py())
        flat = col.flatten() if not pa.types.is_fixed_size_list(col.type) else col.values
        vecs.append(np.asarray(flat.to_numpy(zero_copy_only=False), np.float32).reshape(-1, d))
        sel.append(k["_selected"].to_numpy()[valid])
    if not vecs:
        return _section("map", title, _empty("The kept rows have no embedding (embed.only_kept with no kept rows?)."))
    x = np.concatenate(vecs)
    s = np.concatenate(sel).astype(bool)
    xc = x - x.mean(axis=0)
    # PCA through the d x d covariance (eigh of 256 x 256 or 384 x 384) rather than an SVD of the n x d rows: the
    # same components for less work (an SVD of the 3,000 x 256 rows took 9 s on two busy cores)
    ev, vec = np.linalg.eigh((xc.T @ xc).astype(np.float64))
    ev, vec = np.clip(ev[::-1], 0, None), vec[:, ::-1]
    xy = xc @ vec[:, :2].astype(np.float32)
    var = ev / max(float(ev.sum()), 1e-12)
    groups = [("kept, not selected" if r.has_selection else "kept", xy[~s], "#b9c3cc", 2.0)]
    if s.any():
        groups.append(("selected", xy[s], SELECTED, 2.4))
    chart = svg.scatter(
        groups,
        f"PC 1 ({100 * var[0]:.1f}% of variance)",
        f"PC 2 ({100 * var[1]:.1f}% of variance)" if len(var) > 1 else "PC 2",
    )
    rows = [
        ["kept rows", f"{n_kept:,}"],
        ["drawn", f"{len(x):,}" + (" (random sample)" if n_kept > len(x) else "")],
        ["selected among them", f"{int(s.sum()):,}"],
        ["embedding dimension", f"{x.shape[1]}"],
        ["variance shown (PC 1 + 2)", f"{100 * var[:2].sum():.1f}%"],
    ]
    if s.any() and (~s).any():
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        cov_sel = float(np.mean((xn[~s] @ xn[s].T).max(axis=1)))
        rng = np.random.default_rng(SEED)
        rand = rng.choice(len(xn), int(s.sum()), replace=False)
        rmask = np.zeros(len(xn), bool)
        rmask[rand] = True
        cov_rand = float(np.mean((xn[~rmask] @ xn[rmask].T).max(axis=1)))
        rows += [
            ["coverage: mean cosine of an unselected row to its nearest selected row", f"{cov_sel:.3f}"],
            ["the same for a random pick of the same size", f"{cov_rand:.3f}"],
        ]
    note = (
        "PCA of the kept rows' embeddings onto their first two principal components; each dot is a row. A good "
        "selection spreads over the clusters instead of piling into a few. Coverage is measured on the "
        "full-dimensional vectors of the rows drawn, not on the 2-D picture."
    )
    return _section("map", title, _figure(chart, _table(["", ""], rows, "narrow")), note)


def _metric_table(d: dict) -> str:
    rows = [
        [k, _Raw(f"<span class='r'>{_num(v)}</span>")]
        for k, v in d.items()
        if isinstance(v, (int, float, str, bool)) or v is None
    ]
    return _table(["metric", "value"], rows, "narrow") if rows else ""


def _split_metrics(name: str, d: dict, names: dict) -> str:
    """One evaluation split: its scalar metrics, the per-class table and the confusion matrix (labels shown with
    their names where the input had a ``label_name`` column)."""
    out = f"<h3>{_e(name)}</h3>" + _metric_table(d)
    pc = d.get("per_class")
    if isinstance(pc, dict) and pc:
        keys = list(dict.fromkeys(k for v in pc.values() if isinstance(v, dict) for k in v))
        rows = [
            [names.get(str(lab), lab), *[_Raw(f"<span class='r'>{_num(v.get(k))}</span>") for k in keys]]
            for lab, v in pc.items()
            if isinstance(v, dict)
        ]
        out += "<p class='note'>per class</p>" + _table(["label", *keys], rows, "narrow")
    cm = d.get("confusion")
    if isinstance(cm, list) and cm and all(isinstance(row, list) for row in cm):
        labels = d.get("labels") if isinstance(d.get("labels"), list) else list(range(len(cm)))
        vmax = max((max((v for v in row if isinstance(v, (int, float))), default=0) for row in cm), default=1) or 1
        labels = [names.get(str(lab), lab) for lab in labels]
        head = "".join(f"<th>{_e(lab)}</th>" for lab in labels)
        body = ""
        for i, row in enumerate(cm):
            cells = ""
            for j, v in enumerate(row):
                a = (v / vmax) if isinstance(v, (int, float)) else 0
                style = f"background:rgba(31,111,180,{0.08 + 0.6 * a:.2f})" + (";font-weight:bold" if i == j else "")
                cells += f"<td style='text-align:right;{style}'>{_num(v)}</td>"
            body += f"<tr><th>{_e(labels[i] if i < len(labels) else i)}</th>{cells}</tr>"
        out += (
            "<p class='note'>confusion matrix: rows = true label, columns = predicted</p>"
            f"<table class='narrow confusion'><thead><tr><th></th>{head}</tr></thead><tbody>{body}</tbody></table>"
        )
    return out


def _finetune(r: _Run) -> str:
    title = "Fine-tune metrics"
    path = r.dir / "model" / "metrics.json"
    if not path.is_file():
        return _section(
            "finetune",
            title,
            _empty(
                f"No fine-tune in this run folder: <code>python cli.py finetune {_e(r.dir / 'selected')} --out "
                f"{_e(r.dir / 'model')}</code> writes {_e(path)} (after <code>cli.py split {_e(r.dir)}</code>, or with "
                "<code>--val</code>/<code>--test</code>)."
            ),
        )
    try:
        m = json.loads(path.read_text())
        if not isinstance(m, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:
        return _section("finetune", title, _empty(f"{_e(path)} could not be read: {_e(e)}"))
    try:
        top = {k: v for k, v in m.items() if isinstance(v, (int, float, str, bool))}
        rows = m.get("rows") if isinstance(m.get("rows"), dict) else {}
        flat = {}  # rows: {train, val, test, leak_dropped, unlabelled_dropped: {train, val, test}}
        for k, v in rows.items():
            for kk, vv in v.items() if isinstance(v, dict) else [("", v)]:
                flat[f"rows: {k}" + (f" ({kk})" if kk else "")] = vv
        body = _metric_table({**top, **flat})
        cfg = m.get("config") if isinstance(m.get("config"), dict) else {}
        if cfg:
            body += (
                "<p class='note'>recipe: "
                + _e(", ".join(f"{k}={v}" for k, v in cfg.items() if isinstance(v, (int, float, str, bool))))
                + "</p>"
            )
        if isinstance(m.get("before"), dict) or isinstance(m.get("after"), dict):
            b, a = m.get("before") or {}, m.get("after") or {}
            keys = list(dict.fromkeys([*b, *a]))
            body += "<h3>held-out response loss before and after training</h3>" + _table(
                ["metric", "before", "after"],
                [
                    [
                        k,
                        _Raw(f"<span class='r'>{_num(b.get(k))}</span>"),
                        _Raw(f"<span class='r'>{_num(a.get(k))}</span>"),
                    ]
                    for k in keys
                ],
                "narrow",
            )
        names = _label_names(r)
        splits = [
            f"<div>{_split_metrics(title + ' set', m[split], names)}</div>"
            for split, title in (("val", "validation"), ("test", "test"))
            if isinstance(m.get(split), dict)
        ]
        body += f"<div class='fig'>{''.join(splits)}</div>"
        for k, v in m.items():
            if isinstance(v, dict) and k not in ("val", "test", "before", "after", "rows", "config"):
                body += f"<h3>{_e(k)}</h3>" + (_metric_table(v) or f"<pre>{_e(json.dumps(v, indent=1))[:4000]}</pre>")
    except Exception as e:  # noqa: BLE001 - an unexpected shape shows as JSON, never breaks the page
        body = (
            f"<p class='empty'>unexpected shape ({_e(type(e).__name__)}: {_e(e)}); the file as written:</p>"
            f"<pre>{_e(json.dumps(m, indent=1, default=str)[:20000])}</pre>"
        )
    return _section("finetune", title, body, f"From {_e(path)}.")


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _list(x) -> list:
    return x if isinstance(x, list) else []


def _compare_path(run: Path) -> Path | None:
    for p in (run / "compare" / "compare.json", run / "compare.json"):
        if p.is_file():
            return p
    return None


def _mean_std(arm: dict, key: str) -> str:
    mean, std = arm.get("mean"), arm.get("std")
    mv = mean.get(key) if isinstance(mean, dict) else None
    sv = std.get(key) if isinstance(std, dict) else None
    if not isinstance(mv, (int, float)):
        return ""
    return f"{mv:.4f}" + (f" ± {sv:.4f}" if isinstance(sv, (int, float)) else "")


def _compare(r: _Run) -> str:
    title = "Compare: winnow's selection against random and the other arms"
    path = _compare_path(r.dir)
    if path is None:
        return _section(
            "compare",
            title,
            _empty(
                f"No compare in this run folder: <code>python cli.py compare</code> writes {_e(r.dir / 'compare')}"
                "/compare.json (winnow's selection vs random picks of the same budget, each fine-tuned the same way)."
            ),
        )
    try:
        c = json.loads(path.read_text())
        if not isinstance(c, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as e:
        return _section("compare", title, _empty(f"{_e(path)} could not be read: {_e(e)}"))
    try:
        metric = c.get("metric") or "macro_f1"
        facts = {k: v for k, v in c.items() if isinstance(v, (int, float, str, bool)) and k != "plot"}
        for k in ("budget", "pool"):  # small records: their scalar fields on one line
            if isinstance(c.get(k), dict):
                facts[k] = ", ".join(f"{kk}={vv}" for kk, vv in c[k].items() if isinstance(vv, (int, float, str)))
        share_ci = c.get("oracle_gap_recovered_ci95")
        if isinstance(share_ci, list) and len(share_ci) == 2 and all(isinstance(v, (int, float)) for v in share_ci):
            # next to the share it bounds
            ordered: dict = {}
            for k, v in facts.items():
                ordered[k] = v
                if k == "oracle_gap_recovered":
                    ordered["oracle_gap_recovered_ci95"] = f"[{share_ci[0]:.3f}, {share_ci[1]:.3f}]"
            facts = ordered
        body = _metric_table(facts)
        recipe = _dict(c.get("recipe"))
        if recipe:
            body += (
                "<p class='note'>recipe: "
                + _e(
                    ", ".join(
                        f"{k}={v}"
                        for k, v in recipe.items()
                        if isinstance(v, (int, float, str, bool, list)) and v != ""
                    )
                )
                + "</p>"
            )
        arms = [a for a in _list(c.get("arms")) if isinstance(a, dict)]
        if arms:
            keys = list(dict.fromkeys(k for a in arms for k in _dict(a.get("mean"))))
            keys = sorted(keys, key=lambda k: (k != metric, k != "accuracy", k))
            rows = []
            for a in arms:
                runs = [x for x in _list(a.get("runs")) if isinstance(x, dict)]
                inj: dict[str, float] = {}
                for x in runs:
                    for k, v in _dict(x.get("injected")).items():
                        if isinstance(v, (int, float)):
                            inj[k] = inj.get(k, 0) + v
                inj_s = ", ".join(f"{k} {v / max(len(runs), 1):.1f}" for k, v in inj.items())
                ns = sorted({x.get("n") for x in runs if x.get("n") is not None})
                rows.append(
                    [
                        _Raw(f"<b>{_e(a.get('name'))}</b>"),
                        len(runs),
                        ", ".join(map(str, ns)),
                        *[_Raw(f"<span class='r'>{_mean_std(a, k)}</span>") for k in keys],
                        inj_s,
                    ]
                )
            body += "<h3>Arms (mean ± std over seeds)</h3>" + _table(
                ["arm", "runs", "rows trained on", *keys, "injected rows selected (mean per run)"], rows
            )
        gains = [g for g in _list(c.get("gains")) if isinstance(g, dict)]
        if gains:
            rows = []
            for g in gains:
                ci = g.get("ci95")
                ok = isinstance(ci, list) and len(ci) == 2 and all(isinstance(v, (int, float)) for v in ci)
                excl = ("yes" if ci[0] > 0 or ci[1] < 0 else "no") if ok else ""
                rows.append(
                    [
                        g.get("arm"),
                        g.get("vs"),
                        g.get("metric", metric),
                        _Raw(f"<span class='r'>{_num(g.get('mean'))}</span>"),
                        f"[{ci[0]:.4f}, {ci[1]:.4f}]" if ok else ("" if ci is None else str(ci)),
                        excl,
                    ]
                )
            body += "<h3>Gains (paired bootstrap over test rows)</h3>" + _table(
                ["arm", "vs", "metric", "mean gain", "95% interval", "interval excludes 0"], rows
            )
        from engine.train.compare import val_test_disagreement

        shift = val_test_disagreement(c)
        if shift:
            body += f"<p class='note'><b>{_e(shift)}</b></p>"
        plot = c.get("plot")
        if isinstance(plot, str) and plot:
            p = (path.parent / plot).resolve()
            if p.is_file() and p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.stat().st_size < 8 << 20:
                kind = "png" if p.suffix.lower() == ".png" else "jpeg"
                data = base64.b64encode(p.read_bytes()).decode()
                body += f"<p><img alt='compare plot' src='data:image/{kind};base64,{data}' style='max-width:100%'></p>"
            elif p.is_file() and p.suffix.lower() == ".svg" and p.stat().st_size < 8 << 20:
                data = base64.b64encode(p.read_bytes()).decode()
                body += (
                    f"<p><img alt='compare plot' src='data:image/svg+xml;base64,{data}' style='max-width:100%'></p>"
                )
            else:
                body += f"<p class='note'>plot {_e(plot)} not found next to {_e(path)}.</p>"
        if not arms and not gains:
            body += f"<pre>{_e(json.dumps(c, indent=1, default=str)[:20000])}</pre>"
    except Exception as e:  # noqa: BLE001 - an unexpected shape shows as JSON, never breaks the page
        body = (
            f"<p class='empty'>unexpected shape ({_e(type(e).__name__)}: {_e(e)}); the file as written:</p>"
            f"<pre>{_e(json.dumps(c, indent=1, default=str)[:20000])}</pre>"
        )
    return _section("compare", title, body, f"From {_e(path)}.")


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;margin:0 auto;max-width:1240px;
padding:16px 28px;color:#222;font-size:14px;line-height:1.4}
h1{font-size:22px;margin:6px 0}h2{font-size:18px;border-bottom:2px solid #1f6fb4;padding-bottom:3px;margin-top:34px}
h3{font-size:15px;margin:20px 0 6px}code,pre{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:12px}
pre.cmd{background:#f3f5f7;border:1px solid #dde;padding:8px 10px;white-space:pre-wrap;word-break:break-all}
dl.facts{display:flex;flex-wrap:wrap;gap:6px 22px;margin:8px 0}dl.facts div{display:flex;gap:6px}
dt{color:#666}dd{margin:0;font-weight:600}nav a{margin-right:14px}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{border-bottom:1px solid #e3e3e3;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f6f7f9}td .r,.r{display:block;text-align:right}
table.samples{width:100%;table-layout:fixed}table.samples td{word-wrap:break-word;white-space:pre-wrap}
table.samples td:first-child{width:15%}table.samples td:last-child{width:18%}
.fig{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}.nums{min-width:280px;max-width:600px}
.note{color:#666;font-size:12px;margin:3px 0}.empty{color:#8a6d3b;background:#fcf8e3;border:1px solid #faebcc;
padding:8px 10px}.ok{color:#2d7a2d;font-weight:600}.bad{color:#b00;font-weight:700}
.bar{display:inline-block;height:10px}.sw{display:inline-block;width:10px;height:10px;margin-right:5px}
.null,.more{color:#999;font-style:italic}ul{margin:4px 0;padding-left:18px}
"""


def _map_one_thread(r: _Run) -> str:
    """The map's linear algebra on one BLAS thread: its products are small (3,000 x 256), and OpenBLAS's threads
    spin-waiting on busy cores made the 256 x 256 eigh take 2.7 s instead of 0.09 s (measured on two shared cores).
    threadpoolctl comes with scikit-learn."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _embedding_map(r)


def render(run: str | Path, command: str | None = None) -> str:
    """The report page of run folder ``run`` as one HTML string."""
    r = _Run(Path(run))
    sections = [
        ("verdicts", "Verdicts", _verdicts(r)),
        ("scores", "Scores", _distributions(r)),
        ("samples", "Samples", _samples(r)),
        ("duplicates", "Duplicates", _duplicates(r)),
        ("selection", "Selection", _selection(r)),
        ("map", "Embedding map", _map_one_thread(r)),
        ("finetune", "Fine-tune", _finetune(r)),
        ("compare", "Compare", _compare(r)),
    ]
    nav = "<nav>" + "".join(f"<a href='#{a}'>{_e(t)}</a>" for a, t, _ in sections) + "</nav>"
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>winnow report: {_e(Path(run).name)}</title><style>{CSS}</style></head><body>"
        + _header(r, command)
        + nav
        + "".join(s for _a, _t, s in sections)
        + "<footer><p class='note'>Written by winnow's <code>cli.py report</code>; one self-contained file (no "
        "network access needed).</p></footer></body></html>"
    )


def write_report(run: str | Path, out: str | Path | None = None, command: str | None = None) -> Path:
    """Render the report of ``run`` into ``out`` (default ``run/report.html``), written atomically; returns the
    path. ``out`` is checked before anything is read."""
    out = Path(out) if out else Path(run) / "report.html"
    if out.is_dir():
        raise UserError(f"--out {out}: is a folder; give a file name like report.html")
    if out.name and not out.parent.is_dir() and Path(run).is_dir():
        raise UserError(f"--out {out}: folder {out.parent} does not exist")
    page = render(run, command)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
