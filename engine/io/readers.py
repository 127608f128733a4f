"""Readers: a file, a folder or a glob of shards in Parquet, Arrow IPC (file and stream), JSONL, JSONL.gz (and
JSON arrays), streamed as ``pyarrow.RecordBatch``es of bounded size.

Every batch a reader yields carries the input's own columns plus three internal ones the schema step consumes:
``__row`` (int64, index of the row in its shard; for JSONL the 0-based line number), ``__error`` (why the row
could not be read, else null) and ``__raw`` (the raw line of a row that could not be parsed, else null), so a bad
line becomes a row with verdict ``malformed`` instead of an exception or a silent drop.

JSONL is parsed in blocks of ``jsonl_block_bytes`` by pyarrow's multi-threaded JSON reader (the fast path: no
Python object per row). A block that pyarrow rejects (malformed line, a field whose type changes, invalid UTF-8,
blank lines) is re-parsed line by line in Python to find and keep aside the bad lines; only such blocks pay for it.

What the input cannot do to the process (each ends as rows with ``__error`` naming file and line, or as one
UserError naming the file):

- nest JSON deeper than ``MAX_JSON_DEPTH`` (32) levels: pyarrow's JSON parser recurses and segfaults on a line
  nested 100,000 deep, Python's ``json`` raises RecursionError at ~1,000, and what both accept can still not be
  written and read back (see ``MAX_JSON_DEPTH``). A byte scan (``scan_depth``, Numba) finds too-deep lines before
  either parser sees the block; such a line becomes a malformed row (a JSON array file with one: a UserError).
- hold a lone surrogate (``"\\ud800"``) or invalid UTF-8 in a string: that row is malformed, the block's other rows
  are kept; Parquet and Arrow IPC strings are validated per batch (``_checked``) and a bad value names its column.
- start with a UTF-8 byte order mark: it is skipped.
- be something other than a regular file (a named pipe would block the reader forever, a dangling symlink or a
  symlink loop fails ``os.stat``) or be unreadable: skipped with a warning inside a folder, a UserError when named
  (unreadable: always a UserError); ``discover`` opens nothing but regular files.
- be winnow's own output: inside the run folder (``--out``, also when it is the input folder itself) the entries
  winnow writes are never inputs (``RUN_DIRS``, ``RUN_FILES``), and ``check_out`` refuses an ``--out`` that is a file.
"""

from __future__ import annotations

import errno
import glob as _glob
import gzip
import io
import json
import os
import re
import stat
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq
from numba import njit
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
BOM = b"\xef\xbb\xbf"  # a UTF-8 byte order mark, which some editors and exporters put before the first byte

# Deepest JSON a row may nest; the row's own object is level 1 (a chat row is 3: row > messages > message; with tool
# calls' arguments ~6-8). Measured with pyarrow 26: its JSON parser segfaults on a line nested 100,000 deep; its
# Parquet reader refuses schemas deeper than 100 nodes (a list costs 2 nodes, a struct 1), so a row holding 50
# nested lists (51 levels) reads from JSONL and is written to scores/ but can never be read back (49 lists can); Arrow
# IPC refuses 64 nested types. 32 leaves a margin below both for anything later steps wrap around a column.
MAX_JSON_DEPTH = 32

# What winnow writes in a run folder (``--out``): never an input, also when --out is the input folder itself.
# work/ holds the map parts, completion markers and the run lock (work/lock); *.tmp are files being written.
RUN_DIRS = frozenset({"work", "scores", "selected", "model"})
RUN_FILES = frozenset({"manifest.json", "compare.json", "report.html", "lock"})


@dataclass(frozen=True)
class Shard:
    path: str  # as given or found (absolute)
    kind: str  # parquet | arrow | jsonl | jsonl.gz | json
    size: int  # bytes on disk
    mtime_ns: int
    content_hash: str = ""  # xxh3-128 of the bytes (engine.io.hashing.file_hash), set by the driver
    id_prefix: str = ""  # the prefix of this shard's ids, unique in the run (engine.io.schema.id_prefix)


def _kind_of(path: str) -> str | None:
    name = path.lower()
    for ext in sorted(_EXT_KIND, key=len, reverse=True):
        if name.endswith(ext):
            return _EXT_KIND[ext]
    return None


def _is_run_file(name: str) -> bool:
    return name in RUN_FILES or name.endswith((".tmp", ".lock"))


def _run_owned(path: str, out_real: str) -> bool:
    """Whether ``path`` is one of the entries winnow writes in the run folder ``out_real`` (a realpath)."""
    rel = os.path.relpath(os.path.realpath(path), out_real)
    if rel == os.curdir or rel == os.pardir or rel.startswith(os.pardir + os.sep):
        return False
    top, sep, _ = rel.partition(os.sep)
    return top in RUN_DIRS if sep else (top in RUN_DIRS or _is_run_file(top))


def _not_regular(path: str) -> str | None:
    """None for a regular file (or a symlink to one), else what it is, in words. Never opens ``path``."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "a symbolic link whose target does not exist" if os.path.islink(path) else "no such file or folder"
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link loop"
        return f"cannot look at it: {e.strerror}"
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISFIFO(st.st_mode):
        return "a named pipe (FIFO), not a regular file"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket, not a regular file"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device, not a regular file"
    return "not a regular file"


def _check_readable(path: str) -> None:
    """UserError unless ``path`` is a regular file this process may open (the open is non-blocking, so even a path
    that turned into a FIFO since ``discover`` cannot hang here)."""
    if (why := _not_regular(path)) is not None:
        raise UserError(f"{path}: {why}; only regular files are read")
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except PermissionError:
        raise UserError(
            f"{path}: cannot read it (permission denied): make it readable (chmod a+r) or leave it out"
        ) from None
    except OSError as e:
        raise UserError(f"{path}: cannot open it: {e.strerror}") from None
    os.close(fd)


def _walk_error(e: OSError) -> None:
    raise UserError(f"{e.filename}: cannot list this folder: {e.strerror}")


def discover(inputs: list[str], exclude: str | None = None) -> tuple[list[Shard], list[str]]:
    """Resolve files, folders (recursive) and globs to shards, sorted and de-duplicated.

    Returns (shards, warnings). A path that does not exist, a glob that matches nothing, or a file of an
    unsupported type named explicitly is a UserError; unsupported files inside a folder are skipped with a warning.
    Only regular files are inputs: a named pipe, socket, dangling symlink or symlink loop inside a folder (or
    matched by a glob) is skipped with a warning, named explicitly it is a UserError; a file that cannot be opened
    for reading is a UserError wherever it is. ``exclude`` is the run folder (``--out``): when it sits inside an
    input folder it is skipped whole; when it is an input folder itself (or holds one), the entries winnow writes
    there (``RUN_DIRS``, ``RUN_FILES``, ``*.tmp``, ``*.lock``) are skipped and the user's own files beside them are read.
    """
    out_real = os.path.realpath(exclude) if exclude else None
    found: list[str] = []
    warnings: list[str] = []
    for item in inputs:
        if any(c in item for c in "*?["):
            matches = sorted(_glob.glob(item, recursive=True))
            if not matches:
                raise UserError(f"{item}: no file matches this pattern")
            for m in matches:
                if not _kind_of(m) or os.path.isdir(m) or (out_real and _run_owned(m, out_real)):
                    continue
                if (why := _not_regular(m)) is not None:
                    warnings.append(f"{m}: skipped ({why})")
                    continue
                found.append(m)
            continue
        if not os.path.lexists(item):
            raise UserError(f"{item}: no such file or folder")
        if os.path.isdir(item):
            n_before = len(found)
            for root, dirs, files in os.walk(item, onerror=_walk_error):
                in_out = out_real is not None and os.path.realpath(root) == out_real
                keep = []
                for d in sorted(dirs):
                    full = os.path.join(root, d)
                    if d.startswith(".") or (in_out and d in RUN_DIRS):
                        continue
                    if out_real and os.path.realpath(full) == out_real:
                        continue  # the run folder inside an input folder: nothing there is input
                    if os.path.islink(full):  # os.walk does not follow links (a link loop would never end)
                        warnings.append(f"{full}: skipped (a symbolic link to a folder; name it to read it)")
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
                    if f.startswith(".") or f.endswith(".tmp") or (in_out and _is_run_file(f)):
                        continue
                    if (why := _not_regular(p)) is not None:
                        warnings.append(f"{p}: skipped ({why})")
                    elif _kind_of(p):
                        found.append(p)
                    else:
                        warnings.append(f"{p}: skipped (not one of {SUPPORTED})")
            if len(found) == n_before:
                raise UserError(f"{item}: folder holds no readable shard ({SUPPORTED})")
            continue
        if (why := _not_regular(item)) is not None:
            raise UserError(f"{item}: {why}; only regular files are read")
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
        _check_readable(p)
        try:
            st = os.stat(ap)
        except OSError as e:  # removed or replaced since it was listed
            raise UserError(f"{p}: cannot look at it: {e.strerror}") from None
        shards.append(Shard(ap, _kind_of(ap), st.st_size, st.st_mtime_ns))
    return shards, warnings


def check_out(out: str | os.PathLike, shards: list[Shard]) -> None:
    """UserError unless ``out`` can be the run folder for ``shards``: it must be a folder (or not exist yet), and no
    input may be one of the entries winnow writes there (those get rewritten while they are read)."""
    p = os.fspath(out)
    if os.path.lexists(p) and not os.path.isdir(p):
        if os.path.isfile(p) and any(_same_file(p, sh.path) for sh in shards):
            what = "is one of the input files"
        elif os.path.isfile(p):
            what = "is a file, not a folder"
        else:
            what = "is not a folder"
        raise UserError(
            f"--out {p} {what}: --out names the folder winnow writes its run into; give a new folder "
            "(or an earlier run's, to resume it)"
        )
    out_real = os.path.realpath(p)
    for sh in shards:
        if _run_owned(sh.path, out_real):
            raise UserError(f"{sh.path}: is winnow's own output in --out {p}; to score it, give another --out")


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


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


# -- JSON nesting depth: one pass over the bytes, before any parser sees them ------------------------------------
# A byte-at-a-time state machine (in a string or not, escaped or not, depth) that skips 8 bytes at a time with the
# SWAR zero-byte test while a word holds none of the bytes that can change the state: in a string '"', '\\' or
# '\n'; outside one '"', '\n' or a bracket. Brackets are tested as ``byte & 0xD9 == 0x59``, true for "[]{}" and for
# "Y_y" and DEL: a superset, which only costs a byte-wise look at that word. It also counts the lines, which the
# reader did twice per block with ``bytes.count``. Measured on 8 MiB of alpaca-like JSON lines (13,140 lines, 1 in 5
# with a code block; 2 shared cores, so ranges): the scan 4-8 ms CPU, ``bytes.count(b"\n")`` 3-8 ms, pyarrow's
# parse + UTF-8 validation 27-53 ms CPU; a plain byte loop was 13-20 ms. Reading a 32 MiB JSONL shard whole
# (read_shard) took 416 ms wall / 183 ms CPU against 420 / 205 ms before the scan: no measurable cost.
_ONES = np.uint64(0x0101010101010101)
_HIGH = np.uint64(0x8080808080808080)
_QUOTE8 = np.uint64(0x22) * _ONES
_BACKSLASH8 = np.uint64(0x5C) * _ONES
_NEWLINE8 = np.uint64(0x0A) * _ONES
_BRACKET_MASK8 = np.uint64(0xD9) * _ONES
_BRACKET_BITS8 = np.uint64(0x59) * _ONES


@njit(inline="always", cache=True)
def _any_zero_byte(v):
    return (v - _ONES) & ~v & _HIGH


@njit(nogil=True, cache=True)
def _scan_depth(buf, words, limit, reset_at_newline, deep):
    """(number of '\\n' in ``buf``, number of lines nesting deeper than ``limit``); the first ``deep.size`` of those
    lines' 0-based numbers are written to ``deep`` (a fixed buffer: growing one inside the loop made it 3x slower).
    ``words`` is ``buf`` viewed as uint64 (its length rounded down). ``reset_at_newline``: JSON lines (each line
    starts at depth 0); else one JSON document over many lines (a JSON array file), reported at the lines where it is
    too deep."""
    k = 0
    last = -1
    n = buf.size
    n8 = words.size * 8
    depth = 0
    line = 0
    in_str = False
    i = 0
    while i < n:
        if (i & 7) == 0:
            while i < n8:
                w = words[i >> 3]
                hit = _any_zero_byte(w ^ _NEWLINE8) | _any_zero_byte(w ^ _QUOTE8)
                if in_str:
                    hit |= _any_zero_byte(w ^ _BACKSLASH8)
                else:
                    hit |= _any_zero_byte((w & _BRACKET_MASK8) ^ _BRACKET_BITS8)
                if hit:
                    break
                i += 8
            if i >= n:
                break
        c = buf[i]
        i += 1
        if c == 10:  # '\\n': a new line; in a string it is invalid JSON, so the string ends with the line
            line += 1
            if reset_at_newline:
                depth = 0
                in_str = False
        elif in_str:
            if c == 92:  # '\\\\' escapes the next byte, unless that byte ends the line (which always counts)
                if i < n and buf[i] != 10:
                    i += 1
            elif c == 34:
                in_str = False
        elif c == 34:
            in_str = True
        elif c == 123 or c == 91:
            depth += 1
            if depth > limit and line != last:
                if k < deep.size:
                    deep[k] = line
                k += 1
                last = line
        elif c == 125 or c == 93:
            depth -= 1
    return line, k


def scan_depth(data: bytes, limit: int = MAX_JSON_DEPTH, reset_at_newline: bool = True) -> tuple[int, np.ndarray]:
    """(lines in ``data``, i.e. its count of b"\\n"; 0-based numbers of the lines where JSON nests deeper than
    ``limit`` levels). Brackets inside strings do not count; an escaped quote does not end a string. It replaces
    ``data.count(b"\\n")``, which costs 3 ms per 8 MiB here, so a JSON lines block pays ~1 ms for it."""
    buf = np.frombuffer(data, np.uint8)
    words = np.frombuffer(data, np.uint64, count=len(data) // 8)
    deep = np.empty(16, np.int64)
    n_lines, k = _scan_depth(buf, words, limit, reset_at_newline, deep)
    if k > deep.size:  # more too-deep lines than the buffer held: scan again with room for all
        deep = np.empty(k, np.int64)
        n_lines, k = _scan_depth(buf, words, limit, reset_at_newline, deep)
    return n_lines, deep[:k]


def _type_depth(t: pa.DataType) -> int:
    """Levels of nesting in an Arrow type (int64: 0, list<int64>: 1, list<struct<a: string>>: 2)."""
    if pa.types.is_dictionary(t):
        return _type_depth(t.value_type)
    if t.num_fields == 0:
        return 0
    return 1 + max(_type_depth(t.field(i).type) for i in range(t.num_fields))


def _check_depth(path: str, schema: pa.Schema) -> None:
    for f in schema:
        if (d := 1 + _type_depth(f.type)) > MAX_JSON_DEPTH:
            raise UserError(
                f"{path}: column '{f.name}' is nested {d} levels deep; winnow reads at most "
                f"{MAX_JSON_DEPTH} (deeper columns cannot be written to Parquet and read back): drop or "
                "flatten it"
            )


# -- invalid UTF-8 in columnar files -----------------------------------------------------------------------------


def _valid(arr: pa.Array) -> bool:
    try:
        arr.validate(full=True)
        return True
    except pa.ArrowInvalid:
        return False


def _bad_rows(col: pa.Array, lo: int, hi: int, out: list[int]) -> None:
    """Rows in [lo, hi) of ``col`` holding invalid data, by bisection. ``take`` copies only the rows' own values (a
    slice of a list column would still validate the whole child array)."""
    if _valid(col.slice(lo, hi - lo).take(pa.array(np.arange(hi - lo)))):
        return
    if hi - lo == 1:
        out.append(lo)
        return
    mid = (lo + hi) // 2
    _bad_rows(col, lo, mid, out)
    _bad_rows(col, mid, hi, out)


def _null_rows(col: pa.Array, bad: np.ndarray) -> pa.Array:
    return col.take(pa.array(np.arange(len(col)), mask=bad))


def _checked(path: str, batch: pa.RecordBatch, rows: np.ndarray) -> pa.RecordBatch:
    """``batch`` with the internal columns; a row holding an invalid string (Parquet and Arrow IPC readers do not
    check UTF-8) gets that value nulled and an error naming the column. Validation runs at C++ speed; only a batch
    that fails it pays for finding the rows."""
    try:
        batch.validate(full=True)
        return _with_internal(batch, rows)
    except pa.ArrowInvalid:
        pass
    n = batch.num_rows
    bad_cols: list[list[str]] = [[] for _ in range(n)]
    cols = []
    for field, col in zip(batch.schema, batch.columns):
        try:
            col.validate(full=True)
            cols.append(col)
            continue
        except pa.ArrowInvalid as e:
            if "utf8" not in str(e).lower().replace("-", ""):
                raise UserError(f"{path}: corrupt data in column '{field.name}' near row {rows[0]}: {e}") from None
        if pa.types.is_dictionary(col.type):  # the invalid values sit in the dictionary: null them there
            bad_entries: list[int] = []
            _bad_rows(col.dictionary, 0, len(col.dictionary), bad_entries)
            entry_mask = np.zeros(len(col.dictionary), bool)
            entry_mask[bad_entries] = True
            idx = col.indices.to_numpy(zero_copy_only=False)
            bad = (
                np.zeros(n, bool)
                if not bad_entries
                else np.isin(idx, bad_entries) & col.is_valid().to_numpy(zero_copy_only=False)
            )
            col = pa.DictionaryArray.from_arrays(col.indices, _null_rows(col.dictionary, entry_mask))
        else:
            found: list[int] = []
            _bad_rows(col, 0, n, found)
            bad = np.zeros(n, bool)
            bad[found] = True
            col = _null_rows(col, bad)
        for j in np.flatnonzero(bad):
            bad_cols[j].append(field.name)
        cols.append(col)
    fixed = pa.RecordBatch.from_arrays(cols, names=batch.schema.names)
    if not _valid(fixed):
        raise UserError(f"{path}: invalid data near row {rows[0]} that winnow cannot set aside: rewrite the file")
    name = os.path.basename(path)
    errors: list[str | None] = [None] * n
    for j, c in enumerate(bad_cols):
        if c:
            which = f"column '{c[0]}' holds" if len(c) == 1 else "columns " + ", ".join(f"'{x}'" for x in c) + " hold"
            errors[j] = f"{name} row {rows[j]}: {which} invalid UTF-8"
    return _with_internal(fixed, rows, errors=errors)


def read_shard(shard: Shard, batch_rows: int = 8192, jsonl_block_bytes: int = 8 << 20) -> Iterator[pa.RecordBatch]:
    """Stream one shard as record batches of at most ``batch_rows`` rows, with the internal columns added."""
    _check_readable(shard.path)
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
    except PermissionError:
        raise UserError(f"{path}: cannot read it (permission denied)") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise UserError(f"{path}: not a readable Parquet file (truncated or corrupt?): {e}") from None
    _check_depth(path, pf.schema_arrow)
    start = 0
    rg = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows):
            n = batch.num_rows
            yield _checked(path, batch, np.arange(start, start + n, dtype=np.int64))
            start += n
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        rg = next(
            (
                i
                for i in range(pf.num_row_groups)
                if sum(pf.metadata.row_group(j).num_rows for j in range(i + 1)) > start
            ),
            pf.num_row_groups - 1,
        )
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
        _check_depth(path, reader.schema)
        for batch in _rebatch(batches, batch_rows):
            n = batch.num_rows
            yield _checked(path, batch, np.arange(start, start + n, dtype=np.int64))
            start += n
    except PermissionError:
        raise UserError(f"{path}: cannot read it (permission denied)") from None
    except (pa.ArrowInvalid, pa.ArrowIOError, OSError) as e:
        raise UserError(f"{path}: not a readable Arrow IPC file or stream (near row {start}): {e}") from None


def _read_jsonl(path: str, gz: bool, batch_rows: int, block_bytes: int) -> Iterator[pa.RecordBatch]:
    opener = gzip.open if gz else open
    line_no = 0
    schema: pa.Schema | None = None
    carry = b""
    first = True
    try:
        with opener(path, "rb") as f:
            while True:
                try:
                    data = f.read(block_bytes)
                except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                    raise UserError(f"{path}: corrupt or truncated gzip data after line {line_no}: {e}") from None
                if not data:
                    break
                if first:
                    first = False
                    data = data.removeprefix(BOM)
                buf = carry + data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    carry = buf
                    continue
                chunk, carry = buf[: cut + 1], buf[cut + 1 :]
                n_lines, deep = scan_depth(chunk)
                for batch in _parse_block(path, chunk, line_no, n_lines, deep, schema, batch_rows):
                    schema = _parse_schema(batch) if batch.num_rows else schema
                    yield batch
                line_no += n_lines
            if carry:
                chunk = carry + b"\n"
                yield from _parse_block(path, chunk, line_no, *scan_depth(chunk), schema, batch_rows)
    except PermissionError:
        raise UserError(f"{path}: cannot read it (permission denied)") from None


def _parse_schema(batch: pa.RecordBatch) -> pa.Schema:
    """The block's own columns without internal or all-null ones: the explicit schema for the next block."""
    return pa.schema(
        [
            f.with_name(unescape(f.name))
            for f in batch.schema
            if f.name not in INTERNAL and not pa.types.is_null(f.type)
        ]
    )


def _fast_parse(chunk: bytes, n_lines: int, schema) -> pa.Table | None:
    """pyarrow's parse of a block of whole lines, or None where it cannot account for every line."""
    popts = pj.ParseOptions(
        explicit_schema=schema if schema is not None and len(schema) else None,
        unexpected_field_behavior="infer",
    )
    try:
        try:
            # 1 MiB blocks are parsed on pyarrow's thread pool; a line longer than a block cannot be split, so such
            # a chunk is parsed again as one block.
            table = pj.read_json(
                io.BytesIO(chunk), read_options=pj.ReadOptions(block_size=1 << 20), parse_options=popts
            )
        except pa.ArrowInvalid as e:
            if "straddling" not in str(e).lower():
                raise
            table = pj.read_json(
                io.BytesIO(chunk), read_options=pj.ReadOptions(block_size=len(chunk) + 1), parse_options=popts
            )
        # Blank lines are skipped by pyarrow (a row-count mismatch sends the block to the slow path, which keeps the
        # line numbers exact), and it does not check UTF-8 inside strings: full validation does, at C++ speed (a
        # Python bytes.decode of the block cost 54 ms per 8 MiB here).
        if table.num_rows != n_lines:
            return None
        table.validate(full=True)
        return table
    except pa.ArrowInvalid:
        return None


def _parse_block(
    path, chunk: bytes, first_line: int, n_lines: int, deep: np.ndarray, schema, batch_rows
) -> Iterator[pa.RecordBatch]:
    """``chunk``: whole lines; ``n_lines``, ``deep``: its ``scan_depth``. A line nested too deep must never reach
    pyarrow's parser (it recurses: 100,000 levels is a segfault), so such a block goes to the slow path, which sets
    that line aside."""
    table = None if deep.size else _fast_parse(chunk, n_lines, schema)
    if table is not None:
        rows = np.arange(first_line, first_line + n_lines, dtype=np.int64)
        table = table.combine_chunks()
        for start in range(0, table.num_rows, batch_rows):
            part = table.slice(start, batch_rows)
            b = part.to_batches()[0] if part.num_rows else None
            if b is not None:
                yield _with_internal(b, rows[start : start + part.num_rows])
        return
    yield from _rebatch(
        iter([_parse_lines(path, chunk.split(b"\n")[:n_lines], first_line, set(deep.tolist()))]), batch_rows
    )


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


# A JSON escape of a UTF-16 surrogate (\\ud800-\\udfff): Python's json decodes an unpaired one to a str that cannot be
# encoded as UTF-8 (pyarrow refuses the block). Only lines holding one pay for the exact check (``_lone_surrogate``).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def _lone_surrogate(obj) -> str | None:
    """The first unpaired surrogate in ``obj``'s keys and strings, as a ``\\uXXXX`` escape; None if there is none."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        return f"\\u{ord(e.object[e.start]):04x}"
    return None


def _parse_lines(path: str, lines: list[bytes], first_line: int, deep: set[int] = frozenset()) -> pa.RecordBatch:
    """Slow path: parse line by line; bad lines become rows with an error and their raw text kept. ``deep``: the
    lines (0-based, in ``lines``) nested deeper than ``MAX_JSON_DEPTH`` (``scan_depth``), never handed to ``json``."""
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
        if i in deep:
            records.append(None)
            errors.append(f"{name} line {ln + 1}: nested deeper than {MAX_JSON_DEPTH} levels")
            raws.append(text)
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            records.append(None)
            errors.append(f"{name} line {ln + 1}: malformed JSON: {e.msg} at column {e.colno}")
            raws.append(text)
            continue
        except RecursionError:  # not reached after the depth scan; kept so that no line can stop the run
            records.append(None)
            errors.append(f"{name} line {ln + 1}: nested deeper than {MAX_JSON_DEPTH} levels")
            raws.append(text)
            continue
        if not isinstance(obj, dict):
            records.append(None)
            errors.append(f"{name} line {ln + 1}: expected a JSON object, got {_jtype(obj)}")
            raws.append(text)
            continue
        if b"\\u" in line and _SURROGATE_ESCAPE.search(line) and (sur := _lone_surrogate(obj)) is not None:
            records.append(None)
            errors.append(f"{name} line {ln + 1}: lone surrogate {sur} in a string (not valid Unicode)")
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
    try:
        with open(path, "rb") as f:
            head = f.read(4096).removeprefix(BOM).lstrip()
        if not head.startswith(b"["):
            yield from _read_jsonl(path, False, batch_rows, block_bytes)
            return
        size = os.path.getsize(path)
        if size > _MAX_JSON_ARRAY_BYTES:
            raise UserError(
                f"{path}: a JSON array of {size >> 20} MiB cannot be streamed; convert it to JSON lines "
                "(e.g. `jq -c '.[]' in.json > in.jsonl`)"
            )
        raw = Path(path).read_bytes().removeprefix(BOM)
    except PermissionError:
        raise UserError(f"{path}: cannot read it (permission denied)") from None
    tip = "convert it to JSON lines (e.g. `jq -c '.[]' in.json > in.jsonl`) to keep the other rows"
    # The array is level 1, so its items may nest one level more than a JSON line.
    if (deep := scan_depth(raw, MAX_JSON_DEPTH + 1, reset_at_newline=False)[1]).size:
        raise UserError(f"{path}: line {deep[0] + 1}: an item nested deeper than {MAX_JSON_DEPTH} levels; {tip}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise UserError(f"{path}: an item nested deeper than {MAX_JSON_DEPTH} levels; {tip}") from None
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON array of objects or JSON lines")
    surrogates = b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None
    name = os.path.basename(path)
    for start in range(0, len(data), batch_rows):
        part = data[start : start + batch_rows]
        records, errors, raws = [], [], []
        for i, obj in enumerate(part):
            sur = _lone_surrogate(obj) if surrogates else None
            if not isinstance(obj, dict):
                records.append(None)
                errors.append(f"{name} item {start + i}: expected a JSON object, got {_jtype(obj)}")
            elif sur is not None:
                records.append(None)
                errors.append(f"{name} item {start + i}: lone surrogate {sur} in a string (not valid Unicode)")
            else:
                records.append(obj)
                errors.append(None)
                raws.append(None)
                continue
            raws.append(json.dumps(obj, ensure_ascii=sur is not None))  # escaped, a lone surrogate stays text
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
