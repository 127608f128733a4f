"""Selection: choose a budget of ``kept`` rows from a scores folder and write them out.

``select`` reads only what the selector needs (ids, verdicts, labels, the cap column, token counts, the quality
formula's columns, embeddings for the diversity methods; text only for ``--target`` with DSIR), builds the
candidates (kept rows only), computes ``quality`` (engine/select/quality.py) and ``relevance`` (``--target``,
engine/select/relevance.py), turns the budget, ``--balance`` and ``--source-cap`` into limits
(engine/select/budget.py), runs the ``--method`` (engine/select/<method>.py; GreeDi partitions past 4M candidates,
engine/select/greedi.py), oversamples labels below their quota, and writes:
- ``SEL/selected.parquet``: every column of scores/ for the chosen rows plus ``selection_rank`` (0 = first pick),
  ``selection_gain`` (the pick's marginal gain), ``quality``, ``relevance`` and ``selection_repeats``;
- ``SEL/selected.jsonl``: each chosen row exactly as it was read (the input's own format), repeated
  ``selection_repeats`` times, in input order;
- ``SEL/manifest.json``: method, parameters, objective, quality formula, per-label and per-source counts before and
  after, the token count's source, seed, timings.
The same inputs and seed give identical output. ``auto`` is ``topk`` when ``--score`` is given (or when the run
has no embeddings: by quality); on labelled rows scored for label noise, ``stratified`` after dropping the rows
flagged ``label_issue``, with proportional label quotas (``random`` within the quotas without embeddings); else
``facility`` (the methods with the evidence behind them: bench/RESULTS.md and the compare issue).
"""

from __future__ import annotations

import json
import math
import os
import time
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
from engine.select import base
from engine.select import budget as B
from engine.select import quality as Q
from engine.select.budget import Budget

CHARS_PER_TOKEN = 4.0
PARTITION_ROWS = 4_000_000  # candidates per GreeDi partition when --partitions is auto


def label_issue_policy(config: SelectConfig, method: str, columns: set[str]) -> bool:
    """Whether rows flagged ``label_issue`` leave the candidates: ``--label-issues drop|keep``; ``auto`` drops them
    when the method is auto-chosen and the run has the column (the evidence is in the README's selection paragraph)."""
    if "label_issue" not in columns or config.label_issues == "keep":
        return False
    return config.label_issues == "drop" or (
        config.label_issues == "auto" and config.method == "auto" and AUTO_DROPS_LABEL_ISSUES
    )


# Measured with cli.py compare (bench/bench_compare.py): see the README's selection paragraph. ``auto`` on a run with
# labels and the labels stage's scores: drop the rows flagged label_issue, keep the label mix of the remaining rows
# (proportional quotas), then this method within the quotas (stratified beat facility location on both sets and both
# losses: engine/select/stratified.py). {} = facility as for unlabelled rows.
AUTO_DROPS_LABEL_ISSUES = True
AUTO_LABELLED: dict[str, str] = {"method": "stratified", "balance": "proportional"}


def _replace(config: SelectConfig, **changes) -> SelectConfig:
    import dataclasses

    return dataclasses.replace(config, **changes)


def method_of(config: SelectConfig) -> str:
    if config.method == "auto":
        return "topk" if config.score else "facility"
    return config.method


def check_options(config: SelectConfig, columns: dict | None = None, complete: bool = True) -> tuple[str, Budget]:
    """(method, budget) of ``config``, or a UserError naming the flag: method, budget, balance, caps, the quality
    formula and the target files; when the columns are known (name -> Arrow type, None = numeric or unknown), that
    ``--score`` names a numeric one and ``--cap-by`` exists. Runs before any row is read."""
    method = method_of(config)
    base.get(method)
    budget = Budget.parse(config.budget)
    balance = B.Balance.parse(config.balance)
    if balance.kind != "none" and budget.kind == "tokens":
        raise UserError(f"--balance {config.balance} needs a count or fraction --budget, not {config.budget}")
    B.parse_cap(config.source_cap)
    Q.parse(config.quality)
    import glob

    for f in config.target:
        if not Path(f).exists() and not glob.glob(f):
            raise UserError(f"--target {f}: no such file or folder")
    if columns is not None:
        from engine.config import check_column

        if config.score:
            check_column("--score", config.score, columns, complete)
        if complete and float(config.source_cap or 0) > 0 and config.cap_by not in columns:
            raise UserError(f"--cap-by {config.cap_by}: no such column in the scores")
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


def _read_kept(
    files: list[Path], columns: list[str], with_emb: bool
) -> tuple[pl.DataFrame, np.ndarray | None, int, dict]:
    """(kept rows' columns with ``_part`` and ``_order``, their embeddings (n, d) float16 or None, rows in all,
    verdict counts). Embeddings are taken part by part, kept rows only."""
    frames, embs, total, verdicts = [], [], 0, {}
    order0 = 0
    for i, f in enumerate(files):
        avail = pq.read_schema(f).names
        want = [c for c in columns if c in avail]
        if with_emb and "embedding" not in avail:
            raise UserError(
                f"{f}: no embedding column (the run skipped the embed stage); use --method topk or "
                "random, or score with embeddings"
            )
        t = pq.read_table(f, columns=want + (["embedding"] if with_emb else []))
        total += t.num_rows
        for v, c in zip(*np.unique(t.column("verdict").to_numpy(zero_copy_only=False), return_counts=True)):
            verdicts[str(v)] = verdicts.get(str(v), 0) + int(c)
        mask = pc.equal(t.column("verdict"), "kept")
        t = t.filter(mask)
        if with_emb:
            col = t.column("embedding").combine_chunks()
            d = col.type.list_size
            embs.append(col.flatten().to_numpy(zero_copy_only=False).astype(np.float16).reshape(-1, d))
            t = t.drop_columns(["embedding"])
        df = pl.from_arrow(t)
        if isinstance(df, pl.Series):
            df = df.to_frame()
        df = df.with_columns(pl.lit(i, dtype=pl.Int32).alias("_part"))
        for c in columns:
            if c not in df.columns:
                df = df.with_columns(pl.lit(None).alias(c))
        frames.append(df.with_columns((pl.int_range(pl.len()) + order0).alias("_order")))
        order0 += df.height
    kept = pl.concat(frames, how="diagonal_relaxed") if frames else pl.DataFrame()
    emb = np.concatenate(embs) if with_emb and embs else None
    return kept, emb, total, verdicts


def _counts(values) -> dict[str, int]:
    if values is None:
        return {}
    u, c = np.unique(np.array(["" if v is None else str(v) for v in values], dtype=object), return_counts=True)
    return {str(a): int(b) for a, b in zip(u, c)}


def select(scores_dir: str | Path, out: str | Path, config: SelectConfig, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    files = _parts(Path(scores_dir))
    schemas = [pq.read_schema(f) for f in files]
    all_cols = set().union(*(s.names for s in schemas))
    method, budget = check_options(config, {f.name: f.type for s in schemas for f in s})
    labelled_auto = config.method == "auto" and not config.score and "label_issue" in all_cols
    balance_given = config.balance
    if labelled_auto and AUTO_LABELLED:
        # labelled rows with the labels stage's scores: the default the compare measurements support (README)
        method = AUTO_LABELLED["method"]
        if config.balance == "none":
            config = _replace(config, balance=AUTO_LABELLED["balance"])
    if config.method == "auto" and method == "facility" and "embedding" not in all_cols:
        method = "topk"  # no embeddings (scored with --embedder none): rank by quality instead
    if config.method == "auto" and method == "stratified" and "embedding" not in all_cols:
        method = "random"  # labelled rows without embeddings: a uniform draw within the quotas
    balance = B.Balance.parse(config.balance)
    cap = B.parse_cap(config.source_cap)
    sel = base.get(method)(config, seed)
    tok_cols = ["prompt_tokens", "response_tokens"] if {"prompt_tokens", "response_tokens"} <= all_cols else []
    q_cols = list(Q.DEFAULT_COLUMNS) if not config.quality else Q.columns(config.quality)
    drop_issues = label_issue_policy(config, method, all_cols)
    cols = ["id", "verdict", "row", "label", "prompt_chars", "response_chars", *tok_cols, *q_cols]
    if drop_issues:
        cols.append("label_issue")
    if config.score:
        cols.append(config.score)
    if cap > 0:
        cols.append(config.cap_by)
    cols = list(dict.fromkeys(c for c in cols if c in all_cols or c in ("label",)))
    t_read = time.perf_counter()
    kept, emb, rows_total, verdicts = _read_kept(files, cols, sel.needs_embeddings)
    read_s = time.perf_counter() - t_read
    if labelled_auto and AUTO_LABELLED and balance_given == "none" and kept["label"].null_count():
        # a mixed corpus (instruction rows beside labelled ones): no quotas over the unlabelled rows, and facility
        # location as for unlabelled rows (the stratified evidence is on classification sets)
        config = _replace(config, balance="none")
        balance = B.Balance.parse("none")
        if config.method == "auto" and method in ("stratified", "random"):
            method = "facility" if "embedding" in all_cols else "topk"  # as for unlabelled rows (above)
            sel = base.get(method)(config, seed)
    rows_kept = kept.height
    issues_dropped = None
    if drop_issues:
        ok = ~kept["label_issue"].fill_null(False).to_numpy().astype(bool)
        issues_dropped = int((~ok).sum())
        kept = kept.filter(pl.Series(ok))
        if emb is not None:
            emb = emb[ok]
    if tok_cols:
        kept = kept.with_columns(
            (pl.col("prompt_tokens").fill_null(0) + pl.col("response_tokens").fill_null(0))
            .cast(pl.Float64)
            .alias("_tokens")
        )
        token_source = "prompt_tokens + response_tokens"
    else:
        kept = kept.with_columns(
            ((pl.col("prompt_chars").fill_null(0) + pl.col("response_chars").fill_null(0)) / CHARS_PER_TOKEN)
            .ceil()
            .cast(pl.Float64)
            .alias("_tokens")
        )
        token_source = f"estimate: (prompt_chars + response_chars) / {CHARS_PER_TOKEN:g}"
    quality = Q.compute(kept, config.quality).to_numpy().astype(np.float32)
    n = kept.height
    labels = kept["label"].to_numpy() if "label" in kept.columns and kept["label"].null_count() < n else None
    cap_vals = kept[config.cap_by].cast(pl.String).to_numpy() if cap > 0 else None
    score = kept[config.score].cast(pl.Float64).fill_null(float("nan")).to_numpy() if config.score else None
    cands = base.Candidates(
        kept["id"].to_numpy(), quality, kept["_tokens"].to_numpy().astype(np.float64), emb, labels, cap_vals, score
    )

    # --- task relevance
    relevance = None
    rel_info = None
    if config.target:
        relevance, rel_info = _relevance(config, Path(scores_dir), cands, kept)
        if config.target_mode == "restrict":
            keep_n = max(1, math.ceil(config.target_keep * n)) if n else 0
            top = np.sort(np.argsort(-relevance, kind="stable")[:keep_n])
            rel_info["restricted_to"] = len(top)
        else:
            top = None
            cands.quality = (cands.quality * relevance).astype(np.float32)
            cands.weight = 0.1 + 0.9 * relevance.astype(np.float64)
            rel_info["weighting"] = "quality x relevance; facility coverage weight 0.1 + 0.9 relevance"
    else:
        top = None
    pool_idx = np.arange(n) if top is None else top
    pool = cands if top is None else cands.take(pool_idx)

    # --- budget, quotas, caps
    m = len(pool)
    k = budget.rows(m) if budget.kind != "fraction" else budget.rows(n if issues_dropped is None else rows_kept)
    k = min(k, m)
    lab_codes, lab_names = B.codes(pool.labels) if pool.labels is not None else (None, [])
    quotas = {}
    if balance.kind != "none":
        if pool.labels is None:
            raise UserError(f"--balance {config.balance}: the scores have no labels to balance")
        counts = dict(zip(lab_names, np.bincount(lab_codes, minlength=len(lab_names)).tolist()))
        # With label issues dropped, the quotas follow the mix of the rows that remain: flips move rows off the
        # majority class, and dropping the flagged rows moves the mix back (phrasebank, 20% flips: kept rows
        # 18/51/30% negative/neutral/positive, after the drop 13/61/26%, the undamaged rows 12/59/28%).
        quotas = B.label_quotas(counts, k, balance)
    cap_n = 0
    cap_codes = None
    if cap > 0:
        cap_codes, _ = B.codes(pool.sources)
        cap_n = int(cap) if cap >= 1 else max(1, math.floor(cap * k))
    parts = config.partitions or max(1, math.ceil(m / PARTITION_ROWS))
    if not sel.partitioned:
        parts = 1  # a method that is linear in the rows (stratified): no GreeDi rounds, and the manifest says 1
    t_sel = time.perf_counter()
    repeats = None
    if balance.kind in ("equal", "proportional"):
        caps = np.array([quotas[lab] for lab in lab_names], np.int64)
        lim = B.build_limits(m, pool.tokens, budget, lab_codes, caps, cap_codes, cap_n)
        picked = _run(sel, pool, k, lim, parts)
    elif balance.kind == "min":
        caps = np.array([quotas[lab] for lab in lab_names], np.int64)
        lim = B.build_limits(m, pool.tokens, budget, lab_codes, caps, cap_codes, cap_n)
        first = _run(sel, pool, min(k, int(caps.sum())), lim, parts)
        lim2 = B.build_limits(m, pool.tokens, budget, None, None, cap_codes, cap_n)
        if cap_codes is not None and len(first.order):
            np.subtract.at(lim2.source_left, cap_codes[first.order], 1)
        lim2.cost_left[0] -= float(pool.tokens[first.order].sum())
        rest_k = max(0, k - _with_repeats(first.order, lab_codes, caps))
        rest = (
            sel.select(pool, rest_k, lim2, init=first.order)
            if rest_k
            else base.Picked(np.zeros(0, np.int64), np.zeros(0))
        )
        picked = base.Picked(
            np.concatenate([first.order, rest.order]),
            np.concatenate([first.gains, rest.gains]),
            rest.objective if rest_k else first.objective,
            {**first.info, **rest.info},
        )
    else:
        lim = B.build_limits(m, pool.tokens, budget, None, None, cap_codes, cap_n)
        picked = _run(sel, pool, k, lim, parts)
    sel_s = time.perf_counter() - t_sel
    order = pool_idx[picked.order]
    oversampled = {}
    if balance.kind != "none":
        repeats = np.ones(len(order), np.int64)
        got = np.bincount(lab_codes[picked.order], minlength=len(lab_names))
        for g, lab in enumerate(lab_names):
            want = quotas[lab]
            if 0 < got[g] < want:
                rows_g = np.flatnonzero(lab_codes[picked.order] == g)
                extra = want - got[g]
                repeats[rows_g] += extra // got[g]
                repeats[rows_g[: extra % got[g]]] += 1
                oversampled[lab] = {"rows": int(got[g]), "quota": int(want)}
    chosen = kept[order].with_columns(
        pl.Series("selection_rank", np.arange(len(order), dtype=np.int64)),
        pl.Series("selection_gain", np.asarray(picked.gains, np.float64)),
        pl.Series("quality", quality[order]),
        pl.Series("relevance", relevance[order] if relevance is not None else np.full(len(order), np.nan, np.float32)),
        pl.Series("selection_repeats", repeats if repeats is not None else np.ones(len(order), np.int64)),
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written, rebuilt = _write_selected(files, chosen, out, Path(scores_dir))
    rep = chosen["selection_repeats"].to_numpy()
    manifest = {
        "scores": str(Path(scores_dir)),
        "method": method,
        "parameters": sel.parameters(),
        "objective": picked.objective,
        "method_info": picked.info,
        "quality": config.quality or Q.DEFAULT,
        "score": config.score or None,
        "ascending": config.ascending,
        "budget": config.budget,
        "budget_kind": budget.kind,
        "budget_rows": int(k),
        "balance": config.balance,
        "quotas": quotas or None,
        "oversampled": oversampled or None,
        "source_cap": cap_n or None,
        "cap_by": config.cap_by if cap_n else None,
        "partitions": int(parts),
        "seed": seed,
        "rows_in_scores": rows_total,
        "verdicts": verdicts,
        "rows_kept": rows_kept,
        "label_issues_dropped": issues_dropped,
        "candidates": m,
        "selected": len(order),
        "selected_with_repeats": int(rep.sum()),
        "tokens_selected": float((chosen["_tokens"].to_numpy() * rep).sum()) if len(order) else 0.0,
        "token_count": token_source,
        "labels_before": _counts(labels),
        "labels_after": _counts(labels[order]) if labels is not None else {},
        "sources_before": _counts(kept["source"].to_numpy()) if "source" in kept.columns else {},
        "sources_after": _counts(kept["source"].to_numpy()[order]) if "source" in kept.columns else {},
        "cap_values_after": _counts(cap_vals[order]) if cap_vals is not None else None,
        "relevance": rel_info,
        "score_stats": _stats(chosen, config.score) if config.score else None,
        "quality_stats": _stats(chosen, "quality"),
        "files": written,
        # selected.jsonl copies each JSON-lines row as it was read; these inputs changed since scoring, so their rows
        # were rebuilt from the scored columns instead
        "jsonl_rebuilt_from_scores": rebuilt,
        "seconds": {"read": round(read_s, 3), "select": round(sel_s, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def _with_repeats(order: np.ndarray, lab_codes: np.ndarray, caps: np.ndarray) -> int:
    """Rows the min:N phase yields once labels below N are oversampled to N."""
    got = np.bincount(lab_codes[order], minlength=len(caps))
    return int(np.where(got > 0, np.maximum(got, caps), 0).sum())


def _run(sel, cands, k: int, limits, parts: int):
    from engine.select.greedi import greedi

    if parts > 1 and len(cands) > k and sel.partitioned:
        return greedi(sel, cands, k, limits, parts)
    return sel.select(cands, k, limits)


def _relevance(config: SelectConfig, run: Path, cands, kept: pl.DataFrame) -> tuple[np.ndarray, dict]:
    from engine.select import relevance as R

    run = run.parent if run.name == "scores" else run
    texts = R.read_texts(config.target)
    if not texts:
        raise UserError(f"--target {' '.join(config.target)}: no readable rows")
    info = {"targets": config.target, "target_rows": len(texts), "kind": config.relevance, "mode": config.target_mode}
    ids = R.candidate_ids(run)
    if len(ids) != len(cands) or not np.array_equal(ids.astype(str), cands.ids.astype(str)):
        raise UserError(f"{run}: the scores changed while selecting (candidate ids differ); rerun")
    knn = dsir = None
    if config.relevance in ("knn", "both"):
        emb = cands.emb
        if emb is None:
            emb = _read_kept(_parts(run), ["id", "verdict"], True)[1]
        knn = R.knn_scores(emb, R.embed_target_texts(run, texts))
    if config.relevance in ("dsir", "both"):
        dsir = R.dsir_scores(R.candidate_text_batches(run), texts)
    # each score as its rank percentile among the candidates; both = their mean (engine/select/relevance.py)
    rel = np.mean([R.rank_percentile(x) for x in (knn, dsir) if x is not None], axis=0)
    return rel.astype(np.float32), info


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
                    fields[f.name] = pa.unify_schemas(
                        [pa.schema([old]), pa.schema([f.remove_metadata()])], promote_options="permissive"
                    ).field(0)
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


def _source_lines(path: str, kind: str, rows: np.ndarray, fh, repeats: dict[int, int] | None = None) -> None:
    """Copy the lines (JSONL; items of a JSON array) numbered ``rows`` (sorted) from the input file as they are, each
    ``repeats[row]`` times (default once)."""
    repeats = repeats or {}
    import gzip

    if kind == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"["):
            data = json.loads(Path(path).read_bytes().decode("utf-8-sig"))
            for r in rows:
                fh.write((json.dumps(data[int(r)], ensure_ascii=False).encode() + b"\n") * repeats.get(int(r), 1))
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
            fh.write((line if line.endswith(b"\n") else line + b"\n") * repeats.get(i, 1))
            nxt = next(want, None)


def _write_selected(
    files: list[Path], chosen: pl.DataFrame, out: Path, scores_dir: Path | None = None
) -> tuple[list[str], list[str]]:
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
    extra: dict[int, pl.DataFrame] = {}  # part -> winnow's selection columns by row, sorted by row
    extra_cols = [c for c in SELECTION_COLUMNS if c in chosen.columns]
    if chosen.height:
        for (part,), g in chosen.select(["_part", "row", *extra_cols]).group_by(["_part"]):
            g = g.sort("row")
            wanted[part] = g["row"].to_numpy().astype(np.int64)
            extra[part] = g
    inputs = _run_inputs(scores_dir) if scores_dir is not None else {}
    pfs = {i: pq.ParquetFile(files[i]) for i in sorted(wanted)}
    schema = union_schema([pf.schema_arrow for pf in pfs.values()]) if pfs else None
    if schema is not None:
        schema = _add_selection_fields(schema, chosen, extra_cols)
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
                writer.write_table(_conform(_with_selection(sel, extra.get(i), extra_cols), schema))
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
                exact = (
                    kind in ("jsonl", "jsonl.gz", "json")
                    and os.path.isfile(src)
                    and info.get("hash")
                    and file_hash(src) == info["hash"]
                )
                reps = _repeats_by_row(extra, entry["parts"])
                if exact:
                    _source_lines(src, kind, rows, jl, reps)
                    continue
                if kind in ("jsonl", "jsonl.gz", "json"):
                    rebuilt.append(src)
                for i in entry["parts"]:
                    rows_i = pa.array(wanted[i])
                    for b in pfs[i].iter_batches():
                        sel = b.filter(pc.is_in(b.column("row"), value_set=rows_i))
                        if sel.num_rows:
                            _write_jsonl(sel, entry["in_cols"], jl, reps)
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


SELECTION_COLUMNS = ["selection_rank", "selection_gain", "quality", "relevance", "selection_repeats"]


def _add_selection_fields(schema: pa.Schema, chosen: pl.DataFrame, cols: list[str]) -> pa.Schema:
    """``schema`` with winnow's selection columns appended (their input namesakes were escaped to orig_*)."""
    types = chosen.select(cols).to_arrow().schema
    fields = [f for f in schema if f.name not in cols] + [types.field(c) for c in cols]
    return pa.schema(fields)


def _with_selection(batch: pa.RecordBatch, extra: pl.DataFrame | None, cols: list[str]) -> pa.Table:
    """The part's chosen rows with the selection columns joined on ``row``."""
    t = pa.Table.from_batches([batch])
    if extra is None or not cols:
        return t
    rows = extra["row"].to_numpy()
    pos = np.searchsorted(rows, batch.column("row").to_numpy())
    ex = extra.select(cols).to_arrow().take(pa.array(pos))
    for c in cols:
        if c in t.column_names:
            t = t.drop_columns([c])
        t = t.append_column(c, ex.column(c))
    return t


def _repeats_by_row(extra: dict[int, pl.DataFrame], parts: list[int]) -> dict[int, int]:
    """{row: repeats} for rows chosen more than once (an input's rows live in its parts)."""
    out: dict[int, int] = {}
    for i in parts:
        g = extra.get(i)
        if g is None or "selection_repeats" not in g.columns:
            continue
        many = g.filter(pl.col("selection_repeats") > 1)
        out.update(zip(many["row"].to_list(), many["selection_repeats"].to_list()))
    return out


def _write_jsonl(batch: pa.RecordBatch, in_cols: list[str], fh, repeats: dict[int, int] | None = None) -> None:
    """Rows rebuilt in their input's own format: the input's columns under their input names (engine.io.columns),
    each ``repeats[row]`` times (default once)."""
    cols = [c for c in in_cols if c in batch.schema.names]
    if not cols:  # no input columns known (should not happen): fall back to the canonical prompt/response
        cols = ["prompt", "response"]
    t = pa.Table.from_batches([batch.select(cols)])
    t = t.rename_columns([unescape(c) for c in cols])
    if repeats:
        rows = batch.column("row").to_numpy()
        t = t.take(pa.array(np.repeat(np.arange(len(rows)), [repeats.get(int(r), 1) for r in rows])))
    pl.from_arrow(t).write_ndjson(fh)
