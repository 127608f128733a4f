"""The canonical SFT schema: every input format becomes the same columns (see docs/ARCHITECTURE.md).

Formats, detected from a shard's column names (``--format`` overrides, ``--map`` renames):
- ``alpaca``: ``instruction``, optional ``input``, ``output``. prompt = instruction, plus "\\n\\n" + input if any.
- ``chat``: ``messages`` = list of {role, content}; ``sharegpt``: ``conversations`` = list of {from, value}.
  prompt = every turn before the last assistant turn (a single user turn as its text; several turns as
  "role: text" blocks joined by a blank line), response = the last assistant turn. The list is kept as is.
- ``classification``: ``text`` + ``label``; prompt = "", response = text (the content every stage judges),
  label = the label as text (``label_name`` and every other column are kept as input columns).
- ``text``: ``text`` only; prompt = "", response = text.
- ``mapped``: ``--map prompt=COL,response=COL[,label=COL,id=COL]``.

Input columns travel after the canonical block under their stored names (``engine.io.columns``: a name winnow uses
is stored as ``orig_<name>``), so nothing winnow writes can overwrite them.

All of it is Arrow compute over whole columns: no Python object per row.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.errors import UserError
from engine.io.columns import escape, unescape
from engine.io.readers import ERROR, RAW, ROW
from kernels.strings import hash_strings

STR = pa.large_string()
CANONICAL = (
    "id",
    "prompt",
    "response",
    "label",
    "source",
    "row",
    "format",
    "verdict",
    "detail",
    "duplicate_of",
    "raw",
)
CANONICAL_TYPES = {
    "id": STR,
    "prompt": STR,
    "response": STR,
    "label": STR,
    "source": STR,
    "row": pa.int64(),
    "format": STR,
    "verdict": STR,
    "detail": STR,
    "duplicate_of": STR,
    "raw": STR,
}
FORMATS = ("alpaca", "chat", "sharegpt", "classification", "text", "mapped")
# ShareGPT and other chat dialects name roles differently; everything maps onto user / assistant / system.
ROLE_MAP = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


def detect_format(columns: list[str], override: str = "auto", mapping: dict[str, str] | None = None) -> str:
    """The format of a shard from its column names; raises UserError naming the columns when none fits."""
    if mapping:
        return "mapped"
    if override != "auto":
        if override not in FORMATS:
            raise UserError(f"--format {override}: unknown format; choose one of auto, {', '.join(FORMATS)}")
        return override
    cols = {unescape(c) for c in columns}  # stored names (engine.io.columns) back to the input's
    if "messages" in cols:
        return "chat"
    if "conversations" in cols:
        return "sharegpt"
    if "instruction" in cols:
        return "alpaca"  # rows without `output` are flagged one by one as missing it
    if "text" in cols and "label" in cols:
        return "classification"
    if "text" in cols:
        return "text"
    raise UserError(
        f"cannot detect the format from columns {sorted(c for c in cols if not c.startswith('__'))}; "
        "use --format alpaca|chat|sharegpt|classification|text or --map prompt=COL,response=COL"
    )


def required_columns(fmt: str, mapping: dict[str, str] | None = None) -> list[str]:
    return {
        "alpaca": ["instruction", "output"],
        "chat": ["messages"],
        "sharegpt": ["conversations"],
        "classification": ["text", "label"],
        "text": ["text"],
        "mapped": [mapping[k] for k in ("prompt", "response") if mapping and k in mapping],
    }[fmt]


def _as_text(batch: pa.RecordBatch, col: str, problems: list, shown: str | None = None) -> pa.Array:
    """Column ``col`` as large_string; a missing column reads as all-null, a non-text one is cast (numbers)
    or marks every row malformed (nested values)."""
    n = batch.num_rows
    if col not in batch.schema.names:
        return pa.nulls(n, STR)
    arr = batch.column(col)
    if pa.types.is_large_string(arr.type):
        return arr
    if pa.types.is_null(arr.type):
        return pa.nulls(n, STR)
    try:
        return arr.cast(STR)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        problems.append((pc.is_valid(arr), f"field '{shown or col}': expected text, got {arr.type}"))
        return pa.nulls(n, STR)


def _chat(batch: pa.RecordBatch, stored: str, role_key: str, text_key: str, problems: list, col: str):
    """(prompt, response) arrays from a list-of-turns column (stored name ``stored``, input name ``col``),
    vectorised over the flattened turns."""
    n = batch.num_rows
    arr = batch.column(stored)
    if pa.types.is_null(arr.type):
        return pa.nulls(n, STR), pa.nulls(n, STR)
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)) or not pa.types.is_struct(
        arr.type.value_type
    ):
        problems.append((pc.is_valid(arr), f"field '{col}': expected a list of {{{role_key}, {text_key}}}"))
        return pa.nulls(n, STR), pa.nulls(n, STR)
    st = arr.type.value_type
    names = [st.field(i).name for i in range(st.num_fields)]
    if role_key not in names or text_key not in names:
        # Accept either dialect whatever the column is called.
        alt = ("from", "value") if role_key == "role" else ("role", "content")
        if alt[0] in names and alt[1] in names:
            role_key, text_key = alt
        else:
            problems.append((pc.is_valid(arr), f"field '{col}': turns need '{role_key}' and '{text_key}'"))
            return pa.nulls(n, STR), pa.nulls(n, STR)
    flat = pc.list_flatten(arr)
    parent = pc.list_parent_indices(arr).to_numpy()
    roles_raw = pc.utf8_lower(flat.field(role_key).cast(STR))
    keys = pa.array(list(ROLE_MAP), STR)
    vals = pa.array(list(ROLE_MAP.values()), STR)
    idx = pc.index_in(roles_raw, value_set=keys)
    roles = pc.coalesce(pc.take(vals, idx), roles_raw, pa.scalar("user", STR))
    texts = flat.field(text_key)
    try:
        texts = pc.fill_null(texts.cast(STR), "")
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        problems.append((pc.is_valid(arr), f"field '{col}': turn '{text_key}' is not text"))
        return pa.nulls(n, STR), pa.nulls(n, STR)
    m = len(flat)
    pos = np.arange(m, dtype=np.int64)
    is_asst = pc.equal(roles, "assistant").to_numpy(zero_copy_only=False)
    last = np.full(n, -1, dtype=np.int64)
    if m:
        np.maximum.at(last, parent, np.where(is_asst, pos, -1))
    has_asst = last >= 0
    response = pc.if_else(
        pa.array(has_asst), pc.take(texts, pa.array(np.maximum(last, 0))) if m else pa.nulls(n, STR), pa.nulls(n, STR)
    )
    missing = pc.is_valid(arr).to_numpy(zero_copy_only=False) & ~has_asst
    if missing.any():
        problems.append((pa.array(missing), f"field '{col}': no assistant turn"))
    in_prompt = pos < last[parent] if m else np.zeros(0, bool)
    counts = np.bincount(parent[in_prompt], minlength=n).astype(np.int64) if m else np.zeros(n, np.int64)
    single = counts[parent] == 1 if m else np.zeros(0, bool)
    labelled = pc.binary_join_element_wise(roles, texts, pa.scalar(": ", STR))
    turn_text = pc.if_else(pa.array(single), texts, labelled)
    kept = pc.filter(turn_text, pa.array(in_prompt))
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    lists = pa.LargeListArray.from_arrays(pa.array(offsets), kept)
    prompt = pc.binary_join(lists, pa.scalar("\n\n", STR))
    return prompt.cast(STR), response.cast(STR)


def canonicalize(
    batch: pa.RecordBatch, fmt: str, source: str, mapping: dict[str, str] | None = None, id_prefix: str = ""
):
    """Reader batch (input columns under their stored names, engine.io.columns, + internal ones) -> canonical batch
    with the input columns kept after the canonical ones. Rows that cannot be read get verdict ``malformed`` and the
    reason in ``detail``.

    ``id`` is ``<id_prefix>-<row>``: the prefix is derived from the shard's content hash and made unique per run by
    the driver (engine.run.local), so ids are unique across the run by construction and stable across reruns. With
    ``--map id=COL`` the id is that column's value (its uniqueness is checked by the ``identity`` global stage).
    The input's own ``id`` column, if any, is kept (as ``orig_id``)."""
    n = batch.num_rows
    problems: list[tuple[pa.Array, str]] = []
    label = pa.nulls(n, STR)
    E = escape
    if fmt == "alpaca":
        instruction = _as_text(batch, E("instruction"), problems, "instruction")
        inp = pc.fill_null(_as_text(batch, E("input"), problems, "input"), "")
        has_input = pc.greater(pc.utf8_length(pc.utf8_trim_whitespace(inp)), 0)
        prompt = pc.if_else(
            has_input, pc.binary_join_element_wise(instruction, inp, pa.scalar("\n\n", STR)), instruction
        )
        response = _as_text(batch, E("output"), problems, "output")
        needed = [("instruction", instruction), ("output", response)]
    elif fmt in ("chat", "sharegpt"):
        col, rk, tk = ("messages", "role", "content") if fmt == "chat" else ("conversations", "from", "value")
        if E(col) not in batch.schema.names:
            prompt, response = pa.nulls(n, STR), pa.nulls(n, STR)
        else:
            prompt, response = _chat(batch, E(col), rk, tk, problems, col)
        needed = [(col, batch.column(E(col)) if E(col) in batch.schema.names else pa.nulls(n, STR))]
    elif fmt == "classification":
        # The content of a classification row is its text: every stage judges `response`, so the text goes there
        # (prompt empty) and the label only into `label`: rules, cleaning, dedup and embeddings never see the label.
        response = _as_text(batch, E("text"), problems, "text")
        prompt = pa.repeat(pa.scalar("", STR), n)
        label = _as_text(batch, E("label"), problems, "label")
        needed = [("text", response), ("label", label)]
    elif fmt == "text":
        response = _as_text(batch, E("text"), problems, "text")
        prompt = pa.repeat(pa.scalar("", STR), n)
        needed = [("text", response)]
    elif fmt == "unknown":  # a batch of unreadable lines only: every row already carries its error
        prompt, response = pa.nulls(n, STR), pa.nulls(n, STR)
        needed = []
    elif fmt == "mapped":
        mapping = mapping or {}
        for k in ("prompt", "response"):
            if k not in mapping:
                raise UserError(f"--map needs {k}=COLUMN (got {mapping})")
        prompt = _as_text(batch, E(mapping["prompt"]), problems, mapping["prompt"])
        response = _as_text(batch, E(mapping["response"]), problems, mapping["response"])
        if "label" in mapping:
            label = _as_text(batch, E(mapping["label"]), problems, mapping["label"])
        needed = [(mapping["prompt"], prompt), (mapping["response"], response)]
    else:
        raise UserError(f"unknown format {fmt}")

    # Row-level problems, first one wins: unreadable line, wrong type, missing required field.
    detail = batch.column(ERROR) if ERROR in batch.schema.names else pa.nulls(n, STR)
    rows = batch.column(ROW)
    base = os.path.basename(source)
    is_lines = numbered_by_line(source)
    loc = None  # "file line N: " per row, built only when a row needs it

    def located(msg: str) -> pa.Array:
        nonlocal loc
        if loc is None:
            num = pc.cast(pc.add(rows, 1) if is_lines else rows, STR)
            loc = pc.binary_join_element_wise(
                pa.scalar(f"{base} {'line' if is_lines else 'row'} ", STR), num, pa.scalar("", STR)
            )
        return pc.binary_join_element_wise(loc, pa.scalar(msg, STR), pa.scalar(": ", STR))

    id_col = (mapping or {}).get("id")
    user_ids = None
    if id_col:
        user_ids = _as_text(batch, E(id_col), problems, id_col)
        needed.append((id_col, user_ids))
    for mask, msg in problems:
        hit = pc.and_(pc.is_null(detail), pc.fill_null(mask, False))
        if pc.any(hit).as_py():
            detail = pc.if_else(hit, located(msg), detail)
    for name, arr in needed:
        hit = pc.and_(pc.is_null(detail), pc.is_null(arr))
        if pc.any(hit).as_py():
            detail = pc.if_else(hit, located(f"missing field '{name}'"), detail)
    detail = detail.cast(STR)
    malformed = pc.is_valid(detail)
    verdict = pc.if_else(malformed, pa.scalar("malformed", STR), pa.scalar("kept", STR))
    prompt = pc.fill_null(prompt, "").cast(STR)
    response = pc.fill_null(response, "").cast(STR)

    prefix = id_prefix or _fallback_prefix(source)
    ids = pc.binary_join_element_wise(pa.scalar(prefix, STR), pc.cast(rows, STR), pa.scalar("-", STR))
    if user_ids is not None:  # a row without a usable id is malformed and keeps the generated one
        ids = pc.coalesce(user_ids, ids)

    canon = {
        "id": ids.cast(STR),
        "prompt": prompt,
        "response": response,
        "label": label.cast(STR),
        "source": pa.repeat(pa.scalar(source, STR), n),
        "row": rows,
        "format": pa.repeat(pa.scalar(fmt, STR), n),
        "verdict": verdict.cast(STR),
        "detail": detail,
        "duplicate_of": pa.nulls(n, STR),
        "raw": batch.column(RAW).cast(STR) if RAW in batch.schema.names else pa.nulls(n, STR),
    }
    extra = batch.drop_columns([c for c in (ROW, ERROR, RAW) if c in batch.schema.names])
    arrays = list(canon.values()) + list(extra.columns)
    names = list(canon) + list(extra.schema.names)
    return pa.RecordBatch.from_arrays(arrays, names=names)


def numbered_by_line(source: str) -> bool:
    """Whether a shard's rows are reported as lines (JSON inputs, 1-based) or rows (Parquet/Arrow, 0-based)."""
    return source.lower().endswith((".jsonl", ".json", ".ndjson", ".gz"))


def row_location(source: str, row: int) -> str:
    """'<file> line N' / '<file> row N': where a row is, as every detail and error names it."""
    lines = numbered_by_line(source)
    return f"{os.path.basename(source)} {'line' if lines else 'row'} {row + 1 if lines else row}"


def id_prefix(content_hash: str, occurrence: int = 0) -> str:
    """The id prefix of a shard: 16 hex digits of its content hash; the k-th further shard with the same content in
    one run (a copied file) gets a prefix re-hashed with k, so its ids differ from the first copy's."""
    digest = content_hash.split(":", 1)[-1]
    if occurrence == 0:
        return digest[:16]
    return f"{int(hash_strings(pa.array([f'{digest}#{occurrence}'], STR))[0]):016x}"


def _fallback_prefix(source: str) -> str:
    """Prefix when the caller gave none (direct use of canonicalize in tests and tools): a hash of the path."""
    return f"{int(hash_strings(pa.array([os.path.abspath(source)], STR))[0]):016x}"
