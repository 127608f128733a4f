"""Text normalisation kernel: one pass over the UTF-8 bytes of a string column, no Python string per row.

Per text: drop C0/C1 control characters except tab and newline, zero-width spaces (U+200B), BOMs (U+FEFF) and soft
hyphens (U+00AD); CRLF and lone CR -> LF; no-break and fixed-width spaces (U+00A0, U+2000-U+200A, U+202F, U+205F)
-> " " (U+3000, the ideographic space, is CJK punctuation and kept); spaces/tabs before a newline removed; runs of
3+ newlines -> 2; leading/trailing spaces, tabs and newlines trimmed. Indentation inside lines is kept (code).
Then the Unicode normal form (NFC by default), applied by pyarrow's ``utf8_normalize`` only to the rows that hold
a non-ASCII byte: ASCII text is already in every normal form.

Why a kernel: the same steps as pyarrow compute calls (normalize + 4 regex rewrites + trim) cost 0.31 s per
52k Alpaca rows here; this pass plus NFC on the non-ASCII rows costs about 0.03 s (bench/bench_io.py).

Sections: ``normalize_reference`` (plain Python, the definition), ``normalize_numba`` (the kernel),
``normalize`` (the dispatcher over an Arrow column).
"""

from __future__ import annotations

import functools
import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

from kernels.strings import utf8_view

STR = pa.large_string()

_DELETE_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\ufeff\u00ad]")
_SPACE_RE = re.compile("[\u00a0\u2000-\u200a\u202f\u205f]")


def normalize_reference(text: str, form: str = "NFC") -> str:
    """The definition, in plain Python (tests compare the kernel against it)."""
    s = text.replace("\r\n", "\n").replace("\r", "\n")
    s = _DELETE_RE.sub("", s)
    s = _SPACE_RE.sub(" ", s)
    s = re.sub(r"[ \t]+\n", "\n", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    s = s.strip(" \t\n")
    return unicodedata.normalize(form, s)


@njit(cache=True, inline="always")
def _is_ws(b):
    return b == 32 or b == 9 or b == 10


@njit(nogil=True, cache=True)
def _normalize_row(data, start, end, out, out_start):
    """Normalise data[start:end] into out[out_start:...]; returns (end of output, has a non-ASCII byte)."""
    o = out_start
    ws_start = -1  # output position where the current run of spaces/tabs began (-1: not in a run)
    nl = 0  # consecutive newlines just written
    started = False  # leading whitespace is skipped until the first other character
    non_ascii = False
    i = start
    while i < end:
        b = data[i]
        if b > 32 and b < 127:  # fast path: a printable ASCII character (most bytes)
            started = True
            ws_start = -1
            nl = 0
            out[o] = b
            o += 1
            i += 1
            continue
        c = np.int64(-1)  # byte to emit (ASCII), -1 = copy a multi-byte sequence, -2 = drop
        width = 1
        if b < 0x80:
            if b == 13:  # CR: CRLF -> LF, lone CR -> LF
                if i + 1 < end and data[i + 1] == 10:
                    i += 1
                    continue
                c = 10
            elif (b < 32 and b != 9 and b != 10) or b == 0x7F:
                c = -2
            else:
                c = b
        elif b == 0xC2 and i + 1 < end:
            b1 = data[i + 1]
            width = 2
            if b1 <= 0x9F or b1 == 0xAD:
                c = -2
            elif b1 == 0xA0:
                c = 32
        elif b == 0xE2 and i + 2 < end:
            b1 = data[i + 1]
            b2 = data[i + 2]
            width = 3
            if b1 == 0x80 and b2 == 0x8B:
                c = -2
            elif (b1 == 0x80 and (b2 <= 0x8A or b2 == 0xAF)) or (b1 == 0x81 and b2 == 0x9F):
                c = 32
        elif b == 0xEF and i + 2 < end and data[i + 1] == 0xBB and data[i + 2] == 0xBF:
            width = 3
            c = -2
        if c == -2:
            i += width
            continue
        if c == 10:
            if ws_start >= 0:  # spaces/tabs before a newline
                o = ws_start
                ws_start = -1
            if started and nl < 2:
                out[o] = 10
                o += 1
            nl += 1
            i += width
            continue
        if c == 32 or c == 9:
            if started:
                if ws_start < 0:
                    ws_start = o
                out[o] = c
                o += 1
            i += width
            continue
        # any other character
        started = True
        ws_start = -1
        nl = 0
        if c >= 0:
            out[o] = c
            o += 1
            i += width
        else:
            # copy one UTF-8 sequence (lead byte + continuation bytes)
            non_ascii = True
            out[o] = b
            o += 1
            i += 1
            while i < end and (data[i] & 0xC0) == 0x80:
                out[o] = data[i]
                o += 1
                i += 1
    while o > out_start and _is_ws(out[o - 1]):
        o -= 1
    return o, non_ascii


@functools.lru_cache(maxsize=1)
def nfc_unstable_table() -> np.ndarray:
    """bool[0x10000]: BMP code points that can change under NFC (canonical combining class != 0, NFC_QC=No, or the
    second element of a canonical composition, Hangul jamo included). A text whose code points are all False here
    is already NFC, so ``utf8_normalize`` (utf8proc, ~50 MB/s here) runs only on the rows that need it. Astral code
    points (emoji) are treated as unstable. Built once per process from ``unicodedata`` (~0.05 s)."""
    tab = np.zeros(0x10000, dtype=np.bool_)
    for cp in range(0x10000):
        ch = chr(cp)
        if unicodedata.combining(ch):
            tab[cp] = True
        d = unicodedata.decomposition(ch)
        if d and not d.startswith("<"):
            parts = d.split()
            if len(parts) == 2 and int(parts[1], 16) < 0x10000:
                tab[int(parts[1], 16)] = True
            if not unicodedata.is_normalized("NFC", ch):
                tab[cp] = True
    tab[0x1161:0x1176] = True  # Hangul medial vowels and final consonants compose algorithmically
    tab[0x11A8:0x11C3] = True
    return tab


@njit(nogil=True, cache=True, inline="always")
def _decode(data, i, e):
    """(code point, width) of the UTF-8 sequence at data[i] (lead byte >= 0x80)."""
    b = np.int64(data[i])
    if b >= 0xF0 and i + 3 < e:
        return ((b & 7) << 18) | ((np.int64(data[i + 1]) & 63) << 12) | ((np.int64(data[i + 2]) & 63) << 6) | (
            np.int64(data[i + 3]) & 63
        ), 4
    if b >= 0xE0 and i + 2 < e:
        return ((b & 15) << 12) | ((np.int64(data[i + 1]) & 63) << 6) | (np.int64(data[i + 2]) & 63), 3
    if b >= 0xC0 and i + 1 < e:
        return ((b & 31) << 6) | (np.int64(data[i + 1]) & 63), 2
    return np.int64(0xFFFD), 1


@njit(nogil=True, cache=True)
def needs_normalize_numba(data, offsets, nfc_table):
    """Read-only pre-pass: (row needs a byte-level rewrite, row may change under NFC). Clean rows (most of them)
    then skip the rewrite and keep their bytes, zero copy."""
    n = offsets.shape[0] - 1
    need = np.zeros(n, dtype=np.bool_)
    non_ascii = np.zeros(n, dtype=np.bool_)
    for r in range(n):
        s = offsets[r]
        e = offsets[r + 1]
        if e == s:
            continue
        if _is_ws(data[s]) or _is_ws(data[e - 1]) or data[s] == 13 or data[e - 1] == 13:
            need[r] = True
        i = s
        prev = np.uint8(0)
        nl = 0
        while i < e and not need[r]:
            b = data[i]
            if b > 32 and b < 127:
                nl = 0
            elif b == 10:
                if prev == 32 or prev == 9 or nl >= 2:
                    need[r] = True
                nl += 1
            elif b == 32 or b == 9:
                nl = 0
            elif b < 32 or b == 127:
                need[r] = True
            else:
                nl = 0
                if not non_ascii[r] and b >= 0xC0:
                    cp, _w = _decode(data, i, e)
                    if cp >= 0x10000 or nfc_table[cp]:
                        non_ascii[r] = True
                if b == 0xC2 and i + 1 < e:
                    b1 = data[i + 1]
                    if b1 <= 0x9F or b1 == 0xA0 or b1 == 0xAD:
                        need[r] = True
                elif b == 0xE2 and i + 2 < e:
                    b1 = data[i + 1]
                    b2 = data[i + 2]
                    if (b1 == 0x80 and (b2 <= 0x8B or b2 == 0xAF)) or (b1 == 0x81 and b2 == 0x9F):
                        need[r] = True
                elif b == 0xEF and i + 2 < e and data[i + 1] == 0xBB and data[i + 2] == 0xBF:
                    need[r] = True
            prev = b
            i += 1
        if need[r] and not non_ascii[r]:
            k = i
            while k < e:  # finish the NFC flag for the rest of the row
                if data[k] >= 0xC0:
                    cp, w = _decode(data, k, e)
                    if cp >= 0x10000 or nfc_table[cp]:
                        non_ascii[r] = True
                        break
                    k += w
                else:
                    k += 1
    return need, non_ascii


# Serial and nogil: one batch takes milliseconds, and a parallel region measured 2.5x slower than one thread when
# the cores are shared (0.06 s vs 0.024 s per 8k Alpaca responses); the runner parallelises across shards. Serial
# also means one pass straight into the output buffer (a running write position), no scratch and no compaction.
@njit(nogil=True, cache=True)
def normalize_numba(data, offsets, need):
    """(bytes, offsets, rows to rewrite) -> (bytes, offsets) of the normalised column (NFC not applied here).

    Rows with ``need`` false are copied as they are."""
    n = offsets.shape[0] - 1
    out = np.empty(max(data.shape[0], 1), dtype=np.uint8)
    new_off = np.zeros(n + 1, dtype=np.int64)
    o = 0
    for i in range(n):
        s = offsets[i]
        e = offsets[i + 1]
        if need[i]:
            o, _na = _normalize_row(data, s, e, out, o)
        else:
            out[o : o + (e - s)] = data[s:e]
            o += e - s
        new_off[i + 1] = o
    return out[:o], new_off


@njit(nogil=True, cache=True)
def splice_numba(data, offsets, mask, sub_data, sub_offsets):
    """Rows where ``mask`` is set taken in order from (sub_data, sub_offsets), the others from (data, offsets): one
    copy pass. (pyarrow's replace_with_mask on strings took 0.5 s per 50 MB here; this is a memcpy.)"""
    n = offsets.shape[0] - 1
    new_off = np.zeros(n + 1, dtype=np.int64)
    j = 0
    for i in range(n):
        if mask[i]:
            new_off[i + 1] = new_off[i] + (sub_offsets[j + 1] - sub_offsets[j])
            j += 1
        else:
            new_off[i + 1] = new_off[i] + (offsets[i + 1] - offsets[i])
    out = np.empty(max(new_off[n], 1), dtype=np.uint8)
    j = 0
    for i in range(n):
        o = new_off[i]
        if mask[i]:
            s = sub_offsets[j]
            ln = sub_offsets[j + 1] - s
            out[o : o + ln] = sub_data[s : s + ln]
            j += 1
        else:
            s = offsets[i]
            ln = offsets[i + 1] - s
            out[o : o + ln] = data[s : s + ln]
    return out[: new_off[n]], new_off


def normalize(arr: pa.Array | pa.ChunkedArray, form: str = "NFC") -> pa.Array:
    """Normalise a string column (see the module docstring); nulls stay null; returns large_string."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)
    if n == 0:
        return arr.cast(STR)
    data, offsets = utf8_view(arr)
    # The NFC table is exact for NFC only; for the other forms every non-ASCII row goes through utf8_normalize.
    table = nfc_unstable_table() if form == "NFC" else np.ones(0x10000, dtype=np.bool_)
    need, non_ascii = needs_normalize_numba(data, offsets, table)
    result = arr.cast(STR)
    if need.any():
        out, new_off = normalize_numba(data, offsets, need)
        validity = arr.buffers()[0] if arr.null_count else None
        if validity is not None and arr.offset:
            validity = pc.is_valid(arr).buffers()[1]
        result = pa.LargeStringArray.from_buffers(
            n, pa.py_buffer(new_off), pa.py_buffer(out), validity, arr.null_count
        )
    if form and non_ascii.mean() > 0.5:  # mostly non-Latin text: one pass beats filter + scatter back
        result = pc.utf8_normalize(result, form=form).cast(STR)
    elif form and non_ascii.any():
        sub = pc.utf8_normalize(pc.filter(result, pa.array(non_ascii)), form=form).cast(STR)
        rd, ro = utf8_view(result)
        sd, so = utf8_view(sub)
        out, new_off = splice_numba(rd, ro, non_ascii, sd, so)
        validity = None
        if result.null_count:
            validity = pc.is_valid(result).buffers()[1]
        result = pa.LargeStringArray.from_buffers(
            n, pa.py_buffer(new_off), pa.py_buffer(out), validity, result.null_count
        )
    return result
