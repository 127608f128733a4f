"""Token counts of Arrow string columns, remembered per whitespace chunk, exact for byte-level BPE tokenizers.

Compute only: ``ChunkCounter(tokenizer, max_entries).count(arr)`` -> int64 counts per row. The cut points, why
counts stay exact and the measured rates are in ``engine/stages/tokens.py``'s docstring (the stage that uses it).
A byte-level BPE of printable-ASCII chunks (``bpe_tables`` + ``_ascii_count``) counts new chunks without the
tokenizer library; the tokenizer itself is the reference for every other chunk.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
from numba import njit

from kernels.strings import _fmix64, hash_span, utf8_view  # one 64-bit finaliser for every hash

if TYPE_CHECKING:
    from tokenizers import Tokenizer

STR = pa.large_string()

# Chunks longer than this many bytes (URLs, long code lines, CJK sentences without ASCII spaces) are tokenised every
# time instead of being remembered: they rarely repeat, and would fill the table's byte arena.
MAX_CACHED_CHUNK = 64
# Rows longer than this are tokenised whole (one call), so one huge row never needs a table of its size.
MAX_SPLIT_ROW = 1 << 20
_MIN_SLOTS = 1 << 16  # initial hash-table slots (entries <= slots / 2)
_MIN_OCCURRENCES = 1 << 16  # initial pending-occurrence buffer

# The chunk table is one uint64 array of 2 x slots words, (key, meta) per slot: one cache line per probe. The key of
# a chunk of <= 8 bytes is the bytes themselves (little-endian; with the length, an exact key, no arena read), of a
# longer one its 64-bit ``hash_span``, confirmed on the bytes in the arena. Chunks average 6.1 bytes on English
# (alpaca + t0), so most hits cost one load. The hit path is inlined in the scan and everything else (new, pending,
# long chunks) is an out-of-line call: with the whole miss path inlined the scan ran at 50-70 MB/s, split 140 MB/s.
# meta = arena start << 24 | length << 16 | (count + 1); 0 = empty slot; count + 1 = 0: pending.
_MIX = np.uint64(0x9E3779B97F4A7C15)


@njit(inline="always", cache=True)
def _record(st, occ_row, occ_slot, occ_start, occ_end, r, slot, s, e):
    k = st[2]
    occ_row[k] = r
    occ_slot[k] = slot
    occ_start[k] = s
    occ_end[k] = e
    st[2] = k + 1


# ---- byte-level BPE of printable-ASCII chunks, without the tokenizer library
# A new chunk costs the Rust tokenizer 3-7 us (measured: 5.8-6.9 us per word alone, 3.4 us inside a longer text even
# when its BPE cache holds the word: the cost is its per-pre-token bookkeeping, not the merges), so on a cold cache
# new chunks were most of the time. Chunks of printable ASCII (plus tab, LF, VT, FF, CR) are pre-tokenised here by
# the GPT-2 pattern, whose classes are plain on ASCII (letters A-Za-z, digits 0-9, \s = those 6 bytes), and each
# pre-token is merged in rank order like the tokenizer's BPE model; other chunks still go to the tokenizer.
# Measured: 0.45 us per chunk (71,575 distinct alpaca chunks of 8.9 B on average; the tokenizer: 6.9 us each).
_NO_MERGE = np.zeros(1, np.int64) - 1


@njit(inline="always", cache=True)
def _cls(c):
    """0 whitespace, 1 letter, 2 digit, 3 other (the GPT-2 pattern's classes, on ASCII)."""
    if c == 32 or (c >= 9 and c <= 13):
        return 0
    if (c >= 65 and c <= 90) or (c >= 97 and c <= 122):
        return 1
    if c >= 48 and c <= 57:
        return 2
    return 3


@njit(inline="always", cache=True)
def _next_pretoken(data, p, e):
    """End of the GPT-2 pattern's match at ``p`` in ``data[:e]``, tried in the pattern's order:
    ``'s|'t|'re|'ve|'m|'ll|'d | ?\\p{L}+ | ?\\p{N}+ | ?[^\\s\\p{L}\\p{N}]+ | \\s+(?!\\S) | \\s+``."""
    c = data[p]
    if c == 39 and p + 1 < e:  # contractions, lower case only (as in the pattern)
        d = data[p + 1]
        if d == 115 or d == 116 or d == 109 or d == 100:  # 's 't 'm 'd
            return p + 2
        if p + 2 < e:
            d2 = data[p + 2]
            if (d == 114 and d2 == 101) or (d == 118 and d2 == 101) or (d == 108 and d2 == 108):  # 're 've 'll
                return p + 3
    k = _cls(c)
    q = p
    if k == 0 and c == 32 and p + 1 < e and _cls(data[p + 1]) != 0:  # the optional leading space
        q = p + 1
        k = _cls(data[q])
    if k != 0:  # a run of one class
        q += 1
        while q < e and _cls(data[q]) == k:
            q += 1
        return q
    q = p + 1  # whitespace: the run, less its last byte when something follows (\s+(?!\S)), else itself (\s+)
    while q < e and _cls(data[q]) == 0:
        q += 1
    if q == e or q - p == 1:
        return q
    return q - 1


@njit(inline="always", cache=True)
def _merge(a, b, mkeys, mvals):
    """rank << 20 | merged id of the pair (a, b), or -1 if no merge joins them."""
    key = (a << 20) | b
    mask = np.uint64(mkeys.shape[0] - 1)
    j = np.int64(_fmix64(np.uint64(key)) & mask)
    while True:
        k = mkeys[j]
        if k == key:
            return mvals[j]
        if k < 0:
            return -1
        j = (j + 1) & np.int64(mask)


@njit(inline="always", cache=True)
def _bpe_len(data, s, e, byte_id, mkeys, mvals, buf):
    """Tokens of one pre-token: start from its bytes' ids, merge the lowest-ranked adjacent pair (leftmost on a tie,
    as the tokenizer's priority queue does) until none is left. O(n^2) in the pre-token's bytes; n <= 64 here."""
    n = e - s
    for k in range(n):
        buf[k] = byte_id[data[s + k]]
    while n > 1:
        best = -1
        at = -1
        for k in range(n - 1):
            v = _merge(buf[k], buf[k + 1], mkeys, mvals)
            if v >= 0 and (best < 0 or v < best):
                best = v
                at = k
        if at < 0:
            break
        buf[at] = best & 0xFFFFF
        for k in range(at + 1, n - 1):
            buf[k] = buf[k + 1]
        n -= 1
    return n


@njit(cache=True)
def _ascii_count(data, s, e, byte_id, mkeys, mvals, buf):
    """Token count of chunk ``data[s:e]`` if every byte is eligible (``byte_id >= 0``: printable ASCII or one of the
    6 whitespace bytes, and no added token's first byte), else -1."""
    if mkeys.shape[0] < 2:
        return -1
    for k in range(s, e):
        if byte_id[data[k]] < 0:
            return -1
    total = 0
    p = s
    while p < e:
        q = _next_pretoken(data, p, e)
        total += _bpe_len(data, p, q, byte_id, mkeys, mvals, buf)
        p = q
    return total


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def bpe_tables(tok: Tokenizer) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(byte ids [256], merge keys, merge values) of a byte-level BPE model for ``_ascii_count``; None when the model
    is not plain byte-level BPE (dropout, a subword prefix or suffix, byte fallback, ignore_merges, a printable
    ASCII or whitespace byte missing from the vocabulary, ids >= 2^20)."""
    spec = json.loads(tok.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback") or model.get("ignore_merges"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    vocab = model.get("vocab") or {}
    if not vocab or max(vocab.values()) >= 1 << 20:
        return None
    b2u = _bytes_to_unicode()
    if any(b2u[b] not in vocab for b in [*range(9, 14), *range(32, 127)]):  # the bytes _ascii_count accepts
        return None
    # -1 = a chunk holding this byte goes to the tokenizer: outside printable ASCII + whitespace, or the first byte
    # of an added token (SmolLM2's all start with "<"), which the tokenizer matches before pre-tokenising.
    byte_id = np.full(256, -1, np.int64)
    for b in [*range(9, 14), *range(32, 127)]:
        byte_id[b] = vocab[b2u[b]]
    for t in spec.get("added_tokens") or []:
        content = t.get("content", "").encode("utf-8")
        if content:
            byte_id[content[0]] = -1
    merges = model.get("merges") or []
    size = 1 << max(4, (4 * len(merges)).bit_length())  # load factor <= 1/4
    keys = np.full(size, -1, np.int64)
    vals = np.zeros(size, np.int64)
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    k_list, v_list = [], []
    for rank, (a, b) in enumerate(pairs):
        if a in vocab and b in vocab and a + b in vocab:
            k_list.append((vocab[a] << 20) | vocab[b])
            v_list.append((rank << 20) | vocab[a + b])
    _fill_merges(keys, vals, np.array(k_list, np.int64), np.array(v_list, np.int64))
    return byte_id, keys, vals


@njit(cache=True)
def _fill_merges(keys, vals, k_list, v_list):
    mask = np.uint64(keys.shape[0] - 1)
    for i in range(k_list.shape[0]):
        j = np.int64(_fmix64(np.uint64(k_list[i])) & mask)
        while keys[j] >= 0 and keys[j] != k_list[i]:
            j = (j + 1) & np.int64(mask)
        if keys[j] < 0:  # a pair listed twice keeps its first (lowest) rank, as the tokenizer does
            keys[j] = k_list[i]
            vals[j] = v_list[i]


@njit(cache=True)
def _miss(data, s, e, key, j, r, tbl, mask, arena, st, pend, occ_row, occ_slot, occ_start, occ_end, byte_id, mkeys,
          mvals, buf):  # fmt: skip
    """Out of the hot loop: chunk ``data[s:e]`` is new, pending, or too long to remember (``key`` and the probe
    start ``j`` are meaningless then). Returns its count when it can be had here (a new printable-ASCII chunk:
    counted by ``_ascii_count`` and remembered); else -1, after recording an occurrence to resolve once the
    tokenizer has counted the chunk (remembering it first, count pending, if it is new)."""
    length = e - s
    if length > MAX_CACHED_CHUNK:
        _record(st, occ_row, occ_slot, occ_start, occ_end, r, -1, s, e)
        return -1
    while True:
        meta = tbl[2 * j + 1]
        if meta == 0:  # new chunk: copy its bytes to the arena; count it here or leave it pending
            used = st[1]
            for k in range(length):
                arena[used + k] = data[s + k]
            count = _ascii_count(data, s, e, byte_id, mkeys, mvals, buf)
            tbl[2 * j] = key
            tbl[2 * j + 1] = (np.uint64(used) << np.uint64(24)) | (np.uint64(length) << np.uint64(16))
            st[0] += 1
            st[1] = used + length
            if count >= 0:
                tbl[2 * j + 1] |= np.uint64(count + 1)
                st[4] += 1
                return count
            pend[st[3]] = j
            st[3] += 1
            break
        if tbl[2 * j] == key and np.int64((meta >> np.uint64(16)) & np.uint64(0xFF)) == length:
            same = True
            if length > 8:
                start = np.int64(meta >> np.uint64(24))
                for k in range(length):
                    if arena[start + k] != data[s + k]:
                        same = False
                        break
            if same:  # seen earlier in this call: its count is pending
                break
        j = (j + np.uint64(1)) & mask
    _record(st, occ_row, occ_slot, occ_start, occ_end, r, np.int64(j), s, e)
    return -1


@njit(inline="always", cache=True)
def _known(data, s, e, key, j, tbl, mask, arena):
    """The count of chunk ``data[s:e]`` if the table holds it with a count, else -1 (the hot path: one load)."""
    length = e - s
    if length > MAX_CACHED_CHUNK:
        return -1
    while True:
        meta = tbl[2 * j + 1]
        if meta == 0:
            return -1
        if tbl[2 * j] == key and np.int64((meta >> np.uint64(16)) & np.uint64(0xFF)) == length:
            same = True
            if length > 8:  # a 64-bit hash match is confirmed on the bytes: a collision cannot return a wrong count
                start = np.int64(meta >> np.uint64(24))
                for k in range(length):
                    if arena[start + k] != data[s + k]:
                        same = False
                        break
            if same:
                return np.int64(meta & np.uint64(0xFFFF)) - 1  # -1 while pending
        j = (j + np.uint64(1)) & mask


@njit(nogil=True, cache=True)
def _count_rows(data, offsets, r0, sums, tbl, arena, st, pend, occ_row, occ_slot, occ_start, occ_end, byte_id, mkeys,
                mvals):  # fmt: skip
    """Add the known chunk counts of rows ``r0, r0 + 1, ...`` to ``sums`` and record the rest in ``occ_*`` (slot -1:
    tokenise ``data[start:end]`` directly). ``st`` = [entries, arena bytes used, occurrences, pending]. Stops
    before a row that might not fit the table, arena or buffers and returns its index (``len(sums)`` when done):
    the caller then tokenises what is pending, makes room and calls again from there."""
    n_rows = offsets.shape[0] - 1
    mask = np.uint64(tbl.shape[0] // 2 - 1)
    cap_entries = tbl.shape[0] // 4  # load factor <= 1/2
    cap_occ = occ_row.shape[0]
    buf = np.empty(MAX_CACHED_CHUNK, np.int64)  # _bpe_len's scratch
    r = r0
    while r < n_rows:
        a = offsets[r]
        b = offsets[r + 1]
        if b <= a:
            r += 1
            continue
        # Most chunks a row can hold: two cuts are >= 2 bytes apart (a whitespace byte, then a non-space one).
        need = (b - a) // 2 + 2
        if need > cap_entries or b - a > MAX_SPLIT_ROW:
            if st[2] + 1 > cap_occ:
                break
            _record(st, occ_row, occ_slot, occ_start, occ_end, r, -1, a, b)
            r += 1
            continue
        if st[0] + need > cap_entries or st[1] + (b - a) > arena.shape[0] or st[2] + need > cap_occ:
            break
        total = 0
        s = a
        w = np.uint64(0)  # the chunk's first 8 bytes, packed as they are scanned
        sh = np.uint64(0)
        for i in range(a, b + 1):
            cut = i == b
            if not cut and i > s:
                c = data[i]
                if c == 32 or (c >= 9 and c <= 13):  # a cut: ASCII whitespace after a printable non-space ASCII byte
                    p = data[i - 1]
                    cut = p >= 33 and p <= 126
            if cut:
                length = i - s
                key = w if length <= 8 else hash_span(data, s, i, 0)
                j = _fmix64(key ^ (np.uint64(length) * _MIX)) & mask
                got = _known(data, s, i, key, j, tbl, mask, arena)
                if got >= 0:
                    total += got
                else:
                    got = _miss(data, s, i, key, j, r, tbl, mask, arena, st, pend, occ_row, occ_slot, occ_start,
                                occ_end, byte_id, mkeys, mvals, buf)  # fmt: skip
                    if got >= 0:
                        total += got
                s = i
                w = np.uint64(0)
                sh = np.uint64(0)
            if i < b and sh < np.uint64(64):
                w |= np.uint64(data[i]) << sh
                sh += np.uint64(8)
        sums[r] += total
        r += 1
    return r


@njit(nogil=True, cache=True)
def _apply_occurrences(occ_row, occ_slot, occ_count, tbl, sums, n_occ):
    for k in range(n_occ):
        j = occ_slot[k]
        if j >= 0:
            sums[occ_row[k]] += np.int64(tbl[2 * j + 1] & np.uint64(0xFFFF)) - 1
        else:
            sums[occ_row[k]] += occ_count[k]


@njit(nogil=True, cache=True)
def _rehash(old, new):
    mask = np.uint64(new.shape[0] // 2 - 1)
    for i in range(old.shape[0] // 2):
        if old[2 * i + 1] != 0:
            length = (old[2 * i + 1] >> np.uint64(16)) & np.uint64(0xFF)
            j = _fmix64(old[2 * i] ^ (length * _MIX)) & mask
            while new[2 * j + 1] != 0:
                j = (j + np.uint64(1)) & mask
            new[2 * j] = old[2 * i]
            new[2 * j + 1] = old[2 * i + 1]


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
    """Python strings of the spans (only text the tokenizer must see): one Arrow array, one to_pylist."""
    n = len(offsets) - 1
    arr = pa.LargeStringArray.from_buffers(n, pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(data))
    return arr.to_pylist()


class ChunkCounter:
    """Token counts of Arrow string columns, remembered per whitespace chunk (see the module docstring)."""

    def __init__(self, tokenizer: Tokenizer, max_entries: int, bpe: bool = True):
        self.tokenizer = tokenizer
        self.max_entries = max(1, int(max_entries))
        # bpe: count new printable-ASCII chunks in Numba (exact for plain byte-level BPE; else the tokenizer does)
        tables = bpe_tables(tokenizer) if bpe else None
        self.byte_id, self.mkeys, self.mvals = tables or (np.zeros(256, np.int64), _NO_MERGE, _NO_MERGE)
        self.bpe = tables is not None
        slots = 8
        while slots // 2 < min(self.max_entries, _MIN_SLOTS // 2):
            slots *= 2
        self.tbl = np.zeros(2 * slots, np.uint64)
        self.pend = np.zeros(slots // 2, np.int64)
        self.arena = np.zeros(slots * 8, np.uint8)
        # entries, arena bytes used, occurrences, pending entries, chunks counted by _ascii_count (never reset)
        self.st = np.zeros(5, np.int64)
        self._occ(_MIN_OCCURRENCES)
        self.tokenized = 0  # chunks or texts passed to the tokenizer
        self.resets = 0  # times the table was full at max_entries and started again empty
        self.count(pa.array(["Warm up: compile (or load) the kernels here, not in the first batch."], STR))
        self.tokenized = 0
        self.st[4] = 0

    @property
    def counted_here(self) -> int:
        """New chunks counted by the Numba BPE instead of the tokenizer."""
        return int(self.st[4])

    @property
    def entries(self) -> int:
        return int(self.st[0])

    def _occ(self, size: int) -> None:
        self.occ_row, self.occ_slot = np.empty(size, np.int64), np.empty(size, np.int64)
        self.occ_start, self.occ_end = np.empty(size, np.int64), np.empty(size, np.int64)

    def _lengths(self, texts: list[str]) -> np.ndarray:
        self.tokenized += len(texts)
        if not texts:
            return np.zeros(0, np.int64)
        enc = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return np.fromiter((len(e) for e in enc), np.int64, len(enc))

    def _flush(self, data: np.ndarray, sums: np.ndarray) -> None:
        """Tokenise the pending chunks and the direct spans, then add every recorded occurrence to its row."""
        n_pend, n_occ = int(self.st[3]), int(self.st[2])
        if n_pend:
            slots = self.pend[:n_pend]
            meta = self.tbl[2 * slots + 1]
            starts = (meta >> np.uint64(24)).astype(np.int64)
            ends = starts + ((meta >> np.uint64(16)) & np.uint64(0xFF)).astype(np.int64)
            counts = self._lengths(_strings(*_gather(self.arena, starts, ends)))
            self.tbl[2 * slots + 1] = meta | (counts + 1).astype(np.uint64)
            self.st[3] = 0
        occ_count = np.zeros(n_occ, np.int64)
        direct = np.flatnonzero(self.occ_slot[:n_occ] < 0)
        if len(direct):
            buf, offs = _gather(data, self.occ_start[direct], self.occ_end[direct])
            occ_count[direct] = self._lengths(_strings(buf, offs))
        _apply_occurrences(self.occ_row, self.occ_slot, occ_count, self.tbl, sums, n_occ)
        self.st[2] = 0

    def _make_room(self, row_bytes: int) -> None:
        """After a flush (nothing pending): grow the table towards ``max_entries`` (rounded up to a power of two) or
        clear it when it is full there, and grow the arena and the occurrence buffer, so a row of ``row_bytes``
        fits."""
        need = row_bytes // 2 + 2
        n_ent = int(self.st[0])
        if n_ent + need > len(self.tbl) // 4:
            slots = len(self.tbl) // 2
            while slots // 2 < n_ent + need and slots // 2 < self.max_entries:
                slots *= 2
            if slots > len(self.tbl) // 2:
                new = np.zeros(2 * slots, np.uint64)
                _rehash(self.tbl, new)
                self.tbl, self.pend = new, np.zeros(slots // 2, np.int64)
            if n_ent + need > len(self.tbl) // 4:  # full at max_entries: start again empty (counts so far are exact)
                self.tbl[:] = 0
                self.st[:2] = 0
                self.resets += 1
        used = int(self.st[1])
        if used + row_bytes > len(self.arena):  # bounded: entries x MAX_CACHED_CHUNK bytes at most
            grown = np.zeros(max(2 * len(self.arena), used + row_bytes), np.uint8)
            grown[:used] = self.arena[:used]
            self.arena = grown
        if need > len(self.occ_row):
            self._occ(1 << int(need - 1).bit_length())

    def count(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int64 token count per row of a string column (null = 0)."""
        data, offsets = utf8_view(arr)
        n = len(offsets) - 1
        sums = np.zeros(n, np.int64)
        r = 0
        while r < n:
            r_next = _count_rows(data, offsets, r, sums, self.tbl, self.arena, self.st, self.pend, self.occ_row,
                                 self.occ_slot, self.occ_start, self.occ_end, self.byte_id, self.mkeys, self.mvals)  # fmt: skip
            self._flush(data, sums)
            if r_next < n:
                self._make_room(int(offsets[r_next + 1] - offsets[r_next]))
            r = r_next
        return sums
