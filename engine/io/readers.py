"""Readers: a file, a folder or a glob of shards in Parquet, Arrow IPC (file and stream), JSONL, JSONL.gz (and
JSON arrays), streamed as ``pyarrow.RecordBatch``es of bounded size.

Every batch a reader yields carries the input's own columns plus three internal ones the schema step consumes:
``__row`` (int64, index of the row in its shard; for JSONL the 0-based line number), ``__error`` (why the row
could not be read, else null) and ``__raw`` (the raw line of a row that could not be parsed, else null), so a bad
line becomes a row with verdict ``malformed`` instead of an exception or a silent drop.

JSONL is parsed in blocks of ``jsonl_block_bytes`` by pyarrow's multi-threaded JSON reader (the fast path: no
Python object per row). A block that pyarrow rejects (malformed line, a field whose type changes, invalid UTF-8,
blank lines) is re-parsed line by line in Python to find and keep aside the bad lines; only such blocks pay for it.
"""

from __future__ import annotations

import glob as _glob
import gzip
import io
import json
import os
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
from pyarrow import ipc

from engine.errors import UserError
from engine.io.columns import escape_all, unescape

ROW, ERROR, RAW = "__row", "__error", "__raw"
INTERNAL = (ROW, ERROR, RAW)

_EXT_KIND = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".arrow": "arrow",
    ".ipc": "arrow",
    ".feather": "arrow",
    ".arrows": "arrow",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".jsonl.gz": "jsonl.gz",
    ".ndjson.gz": "jsonl.gz",
    ".json.gz": "jsonl.gz",
}
SUPPORTED = ", ".join(sorted(_EXT_KIND))
_MAX_JSON_ARRAY_BYTES = 256 << 20  # a JSON array cannot be streamed; above this, ask for JSONL instead


@dataclass(frozen=True)
class Shard:
    path: str  # as given or found (absolute)
    kind: str  # parquet | arrow | jsonl | jsonl.gz | json
    size: int  # bytes on disk
    mtime_ns: int
    content_hash: str = ""  # xxh3-128 of the bytes (engine.run.shards.file_hash), set by the driver
    id_prefix: str = ""  # the prefix of this shard's ids, unique in the run (engine.io.schema.id_prefix)


def _kind_of(path: str) -> str | None:
    name = path.lower()
    for ext in sorted(_EXT_KIND, key=len, reverse=True):
        if name.endswith(ext):
            return _EXT_KIND[ext]
    return None


def discover(inputs: list[str], exclude: str | None = None) -> tuple[list[Shard], list[str]]:
    """Resolve files, folders (recursive) and globs to shards, sorted and de-duplicated.

    Returns (shards, warnings). A path that does not exist, a glob that matches nothing, or a file of an
    unsupported type named explicitly is a UserError; unsupported files inside a folder are skipped with a warning.
    Files under ``exclude`` (the run folder itself, when it sits inside an input folder) are never inputs.
    """
    ex = os.path.abspath(exclude) + os.sep if exclude else None
    found: list[str] = []
    warnings: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(_glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no file matches this pattern")
            for m in matches:
                if os.path.isfile(m) and _kind_of(m):
                    found.append(m)
            continue
        if not os.path.exists(item):
            raise UserError(f"{item}: no such file or folder")
        if os.path.isdir(item):
            n_before = len(found)
            for root, dirs, files in os.walk(item):
                keep = []
                for d in sorted(dirs):
                    full = os.path.join(root, d)
                    if d.startswith(".") or (ex and os.path.abspath(full) + os.sep == ex):
                        continue
                    if os.path.exists(os.path.join(full, "manifest.json")) and os.path.isdir(
                        os.path.join(full, "scores")
                    ):
                        warnings.append(f"{full}: skipped (a winnow run folder, not input)")
                        continue
                    keep.append(d)
                dirs[:] = keep
                for f in sorted(files):
                    p = os.path.join(root, f)
                    if f.startswith(".") or f.endswith(".tmp"):
                        continue
                    if _kind_of(p):
                        found.append(p)
                    else:
                        warnings.append(f"{p}: skipped (not one of {SUPPORTED})")
            if len(found) == n_before:
                raise UserError(f"{item}: folder holds no readable shard ({SUPPORTED})")
            continue
        if not _kind_of(item):
            raise UserError(f"{item}: unsupported file type; expected one of {SUPPORTED}")
        found.append(item)
    shards: list[Shard] = []
    seen: set[str] = set()
    for p in found:
        ap = os.path.abspath(p)
        if ap in seen:
            continue
        seen.add(ap)
        st = os.stat(ap)
        shards.append(Shard(ap, _kind_of(ap), st.st_size, st.st_mtime_ns))
    return shards, warnings


def _with_internal(batch: pa.RecordBatch, rows: np.ndarray, errors=None, raws=None) -> pa.RecordBatch:
    n = batch.num_rows
    cols = list(batch.columns)
    names = escape_all(batch.schema.names)  # the input's names stored escaped: never an internal or winnow name
    cols += [
        pa.array(rows, pa.int64()),
        pa.array(errors, pa.large_string()) if errors is not None else pa.nulls(n, pa.large_string()),
        pa.array(raws, pa.large_string()) if raws is not None else pa.nulls(n, pa.large_string()),
    ]
    names += [ROW, ERROR, RAW]
    return pa.RecordBatch.from_arrays(cols, names=names)


def _rebatch(batches: Iterator[pa.RecordBatch], batch_rows: int) -> Iterator[pa.RecordBatch]:
    for b in batches:
        for start in range(0, b.num_rows, batch_rows):
            yield b.slice(start, batch_rows)


def read_shard(shard: Shard, batch_rows: int = 8192, jsonl_block_bytes: int = 8 << 20) -> Iterator[pa.RecordBatch]:
    """Stream one shard as record batches of at most ``batch_rows`` rows, with the internal columns added."""
    if shard.size == 0:
        return
    if shard.kind == "parquet":
        yield from _read_parquet(shard.path, batch_rows)
    elif shard.kind == "arrow":
        yield from _read_arrow(shard.path, batch_rows)
    elif shard.kind in ("jsonl", "jsonl.gz"):
        yield from _read_jsonl(shard.path, shard.kind == "jsonl.gz", batch_rows, jsonl_block_bytes)
    elif shard.kind == "json":
        yield from _read_json(shard.path, batch_rows, jsonl_block_bytes)
    else:  # pragma: no cover - discover() only yields known kinds
        raise UserError(f"{shard.path}: unsupported file type")


def _read_parquet(path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    start = 0
    rg = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            n = batch.num_rows
            yield _with_internal(batch, np.arange(start, start + n, dtype=np.int64))
            start += n
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        rg = next((i for i in range(pf.num_row_groups) if sum(
            pf.metadata.row_group(j).num_rows for j in range(i + 1)) > start), pf.num_row_groups - 1)
        raise UserError(f"{path}: corrupt Parquet data near row {start} (row group {rg}): {e}") from None


def _read_arrow(path: str, batch_rows: int) -> Iterator[pa.RecordBatch]:
    start = 0
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
        if magic == b"ARROW1":
            reader = ipc.open_file(pa.memory_map(path, "r"))
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            reader = ipc.open_stream(pa.memory_map(path, "r"))
            batches = iter(reader)
        for batch in _rebatch(batches, batch_rows):
            n = batch.num_rows
            yield _with_internal(batch, np.arange(start, start + n, dtype=np.int64))
            start += n
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise UserError(f"{path}: not a readable Arrow IPC file or stream (near row {start}): {e}") from None


def _read_jsonl(path: str, gz: bool, batch_rows: int, block_bytes: int) -> Iterator[pa.RecordBatch]:
    opener = gzip.open if gz else open
    line_no = 0
    schema: pa.Schema | None = None
    carry = b""
    try:
        with opener(path, "rb") as f:
            while True:
                try:
                    data = f.read(block_bytes)
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    raise UserError(f"{path}: corrupt or truncated gzip data after line {line_no}: {e}") from None
                if not data:
                    break
                buf = carry + data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    carry = buf
                    continue
                chunk, carry = buf[: cut + 1], buf[cut + 1 :]
                for batch in _parse_block(path, chunk, line_no, schema, batch_rows):
                    schema = _parse_schema(batch) if batch.num_rows else schema
                    yield batch
                line_no += chunk.count(b"\n")
            if carry:
                for batch in _parse_block(path, carry + b"\n", line_no, schema, batch_rows):
                    yield batch
    except PermissionError as e:
        raise UserError(f"{path}: cannot read: {e}") from None


def _parse_schema(batch: pa.RecordBatch) -> pa.Schema:
    """The block's own columns without internal or all-null ones: the explicit schema for the next block."""
    return pa.schema([f.with_name(unescape(f.name)) for f in batch.schema
                      if f.name not in INTERNAL and not pa.types.is_null(f.type)])


def _parse_block(path, chunk: bytes, first_line: int, schema, batch_rows) -> Iterator[pa.RecordBatch]:
    n_lines = chunk.count(b"\n")
    table = None
    popts = pj.ParseOptions(
        explicit_schema=schema if schema is not None and len(schema) else None,
        unexpected_field_behavior="infer",
    )
    try:
        try:
            # 1 MiB blocks are parsed on pyarrow's thread pool; a line longer than a block cannot be split, so such
            # a chunk is parsed again as one block.
            table = pj.read_json(io.BytesIO(chunk), read_options=pj.ReadOptions(block_size=1 << 20),
                                 parse_options=popts)
        except pa.ArrowInvalid as e:
            if "straddling" not in str(e).lower():
                raise
            table = pj.read_json(io.BytesIO(chunk), read_options=pj.ReadOptions(block_size=len(chunk) + 1),
                                 parse_options=popts)
        # Blank lines are skipped by pyarrow (a row-count mismatch sends the block to the slow path, which keeps the
        # line numbers exact), and it does not check UTF-8 inside strings: full validation does, at C++ speed (a
        # Python bytes.decode of the block cost 54 ms per 8 MiB here).
        if table.num_rows != n_lines:
            table = None
        else:
            table.validate(full=True)
    except pa.ArrowInvalid:
        table = None
    if table is not None:
        rows = np.arange(first_line, first_line + n_lines, dtype=np.int64)
        table = table.combine_chunks()
        for start in range(0, table.num_rows, batch_rows):
            part = table.slice(start, batch_rows)
            b = part.to_batches()[0] if part.num_rows else None
            if b is not None:
                yield _with_internal(b, rows[start : start + part.num_rows])
        return
    yield from _rebatch(iter([_parse_lines(path, chunk.split(b"\n")[:n_lines], first_line)]), batch_rows)


def _jtype(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "bool"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "text"
    if isinstance(v, list):
        return "list"
    return "object"


def _parse_lines(path: str, lines: list[bytes], first_line: int) -> pa.RecordBatch:
    """Slow path: parse line by line; bad lines become rows with an error and their raw text kept."""
    records: list[dict | None] = []
    rows: list[int] = []
    errors: list[str | None] = []
    raws: list[str | None] = []
    name = os.path.basename(path)
    for i, line in enumerate(lines):
        ln = first_line + i
        if not line.strip():
            continue  # blank lines are not rows
        rows.append(ln)
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            records.append(None)
            errors.append(f"{name} line {ln + 1}: invalid UTF-8 at byte {e.start}")
            raws.append(line.decode("utf-8", "replace"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            records.append(None)
            errors.append(f"{name} line {ln + 1}: malformed JSON: {e.msg} at column {e.colno}")
            raws.append(text)
            continue
        if not isinstance(obj, dict):
            records.append(None)
            errors.append(f"{name} line {ln + 1}: expected a JSON object, got {_jtype(obj)}")
            raws.append(text)
            continue
        records.append(obj)
        errors.append(None)
        raws.append(None)
    return _records_to_batch(path, records, rows, errors, raws, rows)


def _records_to_batch(path, records, rows, errors, raws, line_nos) -> pa.RecordBatch:
    """Build typed columns from dict rows; a value whose JSON type differs from its column's majority type marks
    its row malformed (the whole line is kept in ``__raw``)."""
    name = os.path.basename(path)
    keys: dict[str, None] = {}
    for r in records:
        if r:
            keys.update(dict.fromkeys(r))
    cols, names = [], []
    for k in keys:
        vals = [r.get(k) if r else None for r in records]
        kinds: dict[str, int] = {}
        for v in vals:
            t = _jtype(v)
            if t != "null":
                kinds[t] = kinds.get(t, 0) + 1
        if len(kinds) > 1:
            major = max(kinds, key=lambda t: (kinds[t], t == "text"))
            for j, v in enumerate(vals):
                t = _jtype(v)
                if t not in ("null", major):
                    if errors[j] is None:
                        errors[j] = f"{name} line {line_nos[j] + 1}: field '{k}': expected {major}, got {t}"
                        raws[j] = json.dumps(records[j], ensure_ascii=False)
                    vals[j] = None
        try:
            arr = pa.array(vals)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            arr = pa.array([None if v is None else json.dumps(v, ensure_ascii=False) for v in vals], pa.large_string())
        if pa.types.is_string(arr.type):
            arr = arr.cast(pa.large_string())
        cols.append(arr)
        names.append(k)
    cols += [pa.array(rows, pa.int64()), pa.array(errors, pa.large_string()), pa.array(raws, pa.large_string())]
    return pa.RecordBatch.from_arrays(cols, names=escape_all(names) + [ROW, ERROR, RAW])


def _read_json(path: str, batch_rows: int, block_bytes: int) -> Iterator[pa.RecordBatch]:
    """A .json file: JSON lines, or one JSON array of objects (read whole, so capped in size)."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip()
    if not head.startswith(b"["):
        yield from _read_jsonl(path, False, batch_rows, block_bytes)
        return
    size = os.path.getsize(path)
    if size > _MAX_JSON_ARRAY_BYTES:
        raise UserError(
            f"{path}: a JSON array of {size >> 20} MiB cannot be streamed; convert it to JSON lines "
            "(e.g. `jq -c '.[]' in.json > in.jsonl`)"
        )
    try:
        data = json.loads(Path(path).read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects or JSON lines")
    for start in range(0, len(data), batch_rows):
        part = data[start : start + batch_rows]
        records, errors, raws = [], [], []
        for i, obj in enumerate(part):
            if isinstance(obj, dict):
                records.append(obj)
                errors.append(None)
                raws.append(None)
            else:
                records.append(None)
                errors.append(f"{os.path.basename(path)} item {start + i}: expected a JSON object, got {_jtype(obj)}")
                raws.append(json.dumps(obj, ensure_ascii=False))
        rows = list(range(start, start + len(part)))
        yield _records_to_batch(path, records, rows, errors, raws, rows)


def estimate_rows(shards: list[Shard]) -> int:
    """Rows in ``shards``: exact for Parquet and Arrow IPC files (metadata), estimated for JSON lines from the mean
    line length of the first MiB. Cheap; used to pick defaults that depend on corpus size."""
    total = 0
    for sh in shards:
        try:
            if sh.kind == "parquet":
                total += pq.ParquetFile(sh.path).metadata.num_rows
                continue
            if sh.kind == "arrow":
                with open(sh.path, "rb") as f:
                    if f.read(6) == b"ARROW1":
                        r = ipc.open_file(pa.memory_map(sh.path, "r"))
                        total += sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
                        continue
            opener = gzip.open if sh.kind == "jsonl.gz" else open
            with opener(sh.path, "rb") as f:
                head = f.read(1 << 20)
            lines = max(1, head.count(b"\n"))
            size = sh.size * (4 if sh.kind == "jsonl.gz" else 1)  # gzip'd JSON is typically ~4x smaller
            total += int(size / max(1, len(head) / lines)) if len(head) == (1 << 20) else lines
        except (OSError, pa.ArrowInvalid, EOFError, gzip.BadGzipFile, zlib.error):
            total += sh.size // 500
    return total
