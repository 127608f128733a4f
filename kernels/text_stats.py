"""Per-text quality signals in one pass over the UTF-8 bytes: the Gopher quality and repetition measures and
the character statistics the SFT cleaning rules (``engine/stages/clean.py``) judge.

Definitions (both implementations below follow them exactly; "characters" are Unicode code points):

- **whitespace** is what ``str.isspace()`` calls whitespace (29 code points); **letters** are general category
  ``L*``, **digits** ``Nd``, **punctuation** ``P*`` (``unicodedata``).
- **words** are maximal runs of non-whitespace characters, except that every Han or Kana character (the ranges
  in ``_CJK_WORD_RANGES``) is a word on its own: Chinese and Japanese are written without spaces, so a
  whitespace split would make a whole paragraph one "word" and every n-gram rule meaningless. Words are compared
  byte for byte (no case folding), as in the Gopher paper's whitespace tokenisation.
- **lines** are the pieces of ``text.split("\\n")``, stripped of whitespace; empty ones are not lines.
- Gopher repetition (Rae et al. 2021, "Scaling Language Models", appendix A, table A1):
  ``top_{n}gram_frac`` (n = 2, 3, 4) is the share of word characters covered by the most frequent word n-gram
  (ties: the one seen first), 0 when no n-gram occurs twice: a lone n-gram is not repetition, and without this
  a 3-word answer would score 2/3 and fail the 0.20 threshold. ``dup_{n}gram_frac`` (n = 5..10) is the share of
  word characters covered by n-grams that occur at least twice, "taking care not to count characters that occur
  in overlapping n-grams more than once" (the paper's words): each word counts once however many duplicated
  n-grams cover it, so both fractions lie in [0, 1]. The denominator is the number of characters inside words.
- ``frac_dup_line``: lines equal to an earlier line / lines; ``frac_dup_line_chars``: characters of those lines
  / all characters of the text.
- ``symbol_word_ratio``: max(#hash, #ellipsis) / words, the Gopher rule being "> 0.1 for either the hash symbol
  or the ellipsis"; an ellipsis is "…" or "..." (counted like ``str.count``: "......" is two).
- ``frac_bullet_lines`` / ``frac_ellipsis_lines``: lines starting with one of ``BULLETS`` / ending in "…" or "...".
- ``n_urls``: matches of ``(?:https?://|www\\.)\\S+``; ``n_code_fences``: ``text.count("```")``.
- ``script``: the script with the most letters (ties: the lower id in ``SCRIPTS``; 0 "none" without letters),
  ``frac_script`` its share of the letters; ``script_letters`` the (n, len(SCRIPTS)) letter counts per script.

Sections: the character tables, the plain-Python reference ``text_stats_reference`` (``re`` and
``collections.Counter``), the Numba kernel ``text_stats_numba`` (``@njit(parallel=True)`` over rows), the
dispatcher ``text_stats``; then the same three for ``contains_prompt`` (does a response contain its prompt) and
for ``contains_literals`` (which of a few literals occur in each row: the clean stage's regex pre-filter).
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
from numba import njit, prange

# hash_span's constants and finaliser: _hash_fast computes the same hash
from kernels.strings import _P1, _P2, _P3, _fmix64, utf8_view

# --------------------------------------------------------------------------------------------------------------
# Character tables: one byte of class bits and one byte of script id per code point (2 x 1.1 MB), built once per
# process from ``unicodedata`` (about 0.3 s) so the kernel needs no Unicode database of its own.
# --------------------------------------------------------------------------------------------------------------

C_LETTER, C_DIGIT, C_PUNCT, C_SPACE, C_CJK = 1, 2, 4, 8, 16
C_SYMBOL, C_NUMBER = 32, 64  # general category S* (emoji, math, currency) and N* (Nd, Nl, No)

SCRIPTS = ("none", "latin", "greek", "cyrillic", "hebrew", "arabic", "indic", "sea", "hangul", "kana", "han", "other")
SCRIPT_ID = {s: i for i, s in enumerate(SCRIPTS)}  # the kernel relies on latin = 1
# Scripts written with spaces between words: word-length and word-count rules only make sense for these. Han and
# Kana (one word per character here) and the South-East Asian scripts (Thai, Lao, Khmer, Myanmar, Tibetan: no
# spaces, and no per-character words either) are not in it.
SPACE_DELIMITED = frozenset(
    SCRIPT_ID[s] for s in ("latin", "greek", "cyrillic", "hebrew", "arabic", "indic", "hangul")
)

# Block ranges (inclusive) per script; a letter outside all of them is "other".
_SCRIPT_RANGES = {
    "latin": (
        (0x0041, 0x024F),
        (0x0250, 0x02AF),
        (0x1E00, 0x1EFF),
        (0x2C60, 0x2C7F),
        (0xA720, 0xA7FF),
        (0xAB30, 0xAB6F),
        (0xFF21, 0xFF3A),
        (0xFF41, 0xFF5A),
    ),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "hebrew": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "indic": ((0x0900, 0x0DFF),),
    "sea": ((0x0E00, 0x0FFF), (0x1000, 0x109F), (0x1780, 0x17FF)),
    "hangul": ((0x1100, 0x11FF), (0x3130, 0x318F), (0xA960, 0xA97F), (0xAC00, 0xD7FF), (0xFFA0, 0xFFDC)),
    "kana": ((0x3040, 0x30FF), (0x31F0, 0x31FF), (0xFF66, 0xFF9F)),
    "han": (
        (0x2E80, 0x2FDF),
        (0x3005, 0x3007),
        (0x3400, 0x4DBF),
        (0x4E00, 0x9FFF),
        (0xF900, 0xFAFF),
        (0x20000, 0x323AF),
    ),
}
# Every character in these ranges is a word by itself (whatever its category: "ー" and "々" included).
_CJK_WORD_RANGES = _SCRIPT_RANGES["kana"] + _SCRIPT_RANGES["han"]
BULLETS = "-*•●◦‣⁃▪■–"


def _script_of(cp: int) -> int:
    """Script id of a letter's code point (the reference's lookup; the table below is built from it)."""
    for name, ranges in _SCRIPT_RANGES.items():
        for lo, hi in ranges:
            if lo <= cp <= hi:
                return SCRIPT_ID[name]
    return SCRIPT_ID["other"]


@functools.cache
def char_tables() -> tuple[np.ndarray, np.ndarray]:
    """(class bits, script id) per code point, uint8 arrays of 0x110000 entries."""
    n = 0x110000
    cats = [unicodedata.category(chr(i)) for i in range(n)]
    first = np.frombuffer("".join(c[0] for c in cats).encode("ascii"), dtype=np.uint8)
    cls = np.zeros(n, dtype=np.uint8)
    cls[first == ord("L")] |= C_LETTER
    cls[first == ord("P")] |= C_PUNCT
    cls[np.fromiter((c == "Nd" for c in cats), dtype=bool, count=n)] |= C_DIGIT
    cls[first == ord("S")] |= C_SYMBOL
    cls[first == ord("N")] |= C_NUMBER
    spaces = [i for i in range(n) if chr(i).isspace()]  # 29 code points, checked against str.isspace
    cls[spaces] |= C_SPACE
    for lo, hi in _CJK_WORD_RANGES:
        cls[lo : hi + 1] |= C_CJK
    scr = np.full(n, SCRIPT_ID["other"], dtype=np.uint8)
    for name, ranges in _SCRIPT_RANGES.items():
        for lo, hi in ranges:
            scr[lo : hi + 1] = SCRIPT_ID[name]
    scr[(cls & C_LETTER) == 0] = SCRIPT_ID["none"]
    return cls, scr


# Output signals: integer ones, then float ones (the kernel fills two 2-D arrays in this order).
INT_SIGNALS = ("n_chars", "n_words", "n_lines", "max_line_len", "n_urls", "n_code_fences", "script")
FLOAT_SIGNALS = (
    "mean_word_len", "frac_letters", "frac_digits", "frac_punct", "frac_space", "frac_non_ascii",
    "frac_alpha_words", "frac_dup_line", "frac_dup_line_chars",
    "top_2gram_frac", "top_3gram_frac", "top_4gram_frac",
    "dup_5gram_frac", "dup_6gram_frac", "dup_7gram_frac", "dup_8gram_frac", "dup_9gram_frac", "dup_10gram_frac",
    "symbol_word_ratio", "frac_bullet_lines", "frac_ellipsis_lines", "frac_script",
)  # fmt: skip
SIGNALS = INT_SIGNALS + FLOAT_SIGNALS


# --------------------------------------------------------------------------------------------------------------
# Reference: plain Python with re and collections.Counter, one text at a time.
# --------------------------------------------------------------------------------------------------------------

_CJK_CLASS = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in _CJK_WORD_RANGES)
_WORD_RE = re.compile(f"[{_CJK_CLASS}]|[^\\s{_CJK_CLASS}]+")
_URL_RE = re.compile(r"(?:https?://|www\.)\S+")


def _covered_chars(starts: list[int], n: int, word_len: list[int]) -> int:
    """Characters of the words covered by the n-grams starting at ``starts``, each word counted once."""
    covered = set()
    for s in starts:
        covered.update(range(s, s + n))
    return sum(word_len[i] for i in covered)


def _ngram_signals(words: list[str], word_len: list[int], word_chars: int, out: dict) -> None:
    """Gopher's n-gram repetition signals: top 2/3/4-gram and duplicated 5..10-gram character fractions."""
    nw = len(words)
    for n in (2, 3, 4):
        grams = [tuple(words[i : i + n]) for i in range(nw - n + 1)]
        frac = 0.0
        if grams:
            top, count = Counter(grams).most_common(1)[0]  # ties: first inserted = seen first
            if count >= 2:
                starts = [i for i, g in enumerate(grams) if g == top]
                frac = _covered_chars(starts, n, word_len) / word_chars
        out[f"top_{n}gram_frac"] = frac
    for n in range(5, 11):
        grams = [tuple(words[i : i + n]) for i in range(nw - n + 1)]
        counts = Counter(grams)
        starts = [i for i, g in enumerate(grams) if counts[g] >= 2]
        out[f"dup_{n}gram_frac"] = _covered_chars(starts, n, word_len) / word_chars if starts else 0.0


def _line_signals(text: str, out: dict) -> list[str]:
    """Duplicate-line fractions; returns the stripped non-empty lines."""
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if ln]
    nl = len(lines)
    seen: set = set()
    dup_lines = dup_chars = 0
    for ln in lines:
        if ln in seen:
            dup_lines += 1
            dup_chars += len(ln)
        seen.add(ln)
    out["frac_dup_line"] = dup_lines / nl if nl else 0.0
    out["frac_dup_line_chars"] = dup_chars / (len(text) or 1)
    return lines


REPETITION_SIGNALS = (
    "frac_dup_line", "frac_dup_line_chars", "top_2gram_frac", "top_3gram_frac", "top_4gram_frac",
    "dup_5gram_frac", "dup_6gram_frac", "dup_7gram_frac", "dup_8gram_frac", "dup_9gram_frac", "dup_10gram_frac",
)  # fmt: skip


def gopher_repetition_reference(texts) -> dict[str, np.ndarray]:
    """Only the Gopher repetition signals (``REPETITION_SIGNALS``), in plain Python with ``re`` and
    ``collections.Counter``: the benchmark's narrower anchor (no character classes, no scripts)."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()
    rows = []
    for t in texts:
        t = t or ""
        out: dict = {}
        words = _WORD_RE.findall(t)
        word_len = [len(w) for w in words]
        _ngram_signals(words, word_len, sum(word_len), out)
        _line_signals(t, out)
        rows.append(out)
    return {k: np.array([r[k] for r in rows], dtype=np.float64) for k in REPETITION_SIGNALS}


def _reference_one(text: str) -> dict:
    out: dict = {}
    n_chars = len(text)
    cats = [unicodedata.category(c) for c in text]
    letters = [c for c, cat in zip(text, cats) if cat[0] == "L"]
    out["n_chars"] = n_chars
    div = n_chars or 1
    out["frac_letters"] = len(letters) / div
    out["frac_digits"] = sum(cat == "Nd" for cat in cats) / div
    out["frac_punct"] = sum(cat[0] == "P" for cat in cats) / div
    out["frac_space"] = sum(c.isspace() for c in text) / div
    out["frac_non_ascii"] = sum(ord(c) > 127 for c in text) / div

    words = _WORD_RE.findall(text)
    word_len = [len(w) for w in words]
    word_chars = sum(word_len)
    nw = len(words)
    out["n_words"] = nw
    out["mean_word_len"] = word_chars / nw if nw else 0.0
    out["frac_alpha_words"] = sum(any(unicodedata.category(c)[0] == "L" for c in w) for w in words) / nw if nw else 0.0

    _ngram_signals(words, word_len, word_chars, out)

    lines = _line_signals(text, out)
    nl = len(lines)
    out["n_lines"] = nl
    out["max_line_len"] = max((len(ln) for ln in lines), default=0)
    out["frac_bullet_lines"] = sum(ln[0] in BULLETS for ln in lines) / nl if nl else 0.0
    out["frac_ellipsis_lines"] = sum(ln.endswith(("...", "…")) for ln in lines) / nl if nl else 0.0

    n_ellipsis = text.count("...") + text.count("…")
    out["symbol_word_ratio"] = max(text.count("#"), n_ellipsis) / nw if nw else 0.0
    out["n_urls"] = len(_URL_RE.findall(text))
    out["n_code_fences"] = text.count("```")

    per_script = Counter(_script_of(ord(c)) for c in letters)
    counts = np.zeros(len(SCRIPTS), dtype=np.int32)
    for s, k in per_script.items():
        counts[s] = k
    dominant = int(np.argmax(counts)) if letters else 0  # argmax: ties -> lowest id
    out["script"] = dominant
    out["frac_script"] = counts[dominant] / len(letters) if letters else 0.0
    out["script_letters"] = counts
    return out


def text_stats_reference(texts) -> dict[str, np.ndarray]:
    """The same signals as ``text_stats_numba``, in plain Python (``None`` reads as ""). Slow: for tests and
    the benchmark's anchor."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()
    rows = [_reference_one(t or "") for t in texts]
    out = {k: np.array([r[k] for r in rows], dtype=np.int64) for k in INT_SIGNALS}
    out.update({k: np.array([r[k] for r in rows], dtype=np.float64) for k in FLOAT_SIGNALS})
    out["script"] = out["script"].astype(np.uint8)
    out["script_letters"] = (
        np.stack([r["script_letters"] for r in rows]) if rows else np.zeros((0, len(SCRIPTS)), np.int32)
    )
    return out


# --------------------------------------------------------------------------------------------------------------
# Numba kernel: per row, one pass over the bytes counts characters and lines and finds the words; the n-gram
# measures then work on per-word hashes and lengths only. Words, n-grams and lines are compared by 64-bit hash
# (kernels.strings.hash_span, then _extend per added word): a false match needs a 2^-64 collision.
# Two per-row paths compute the same numbers: ``_row_stats_ascii`` for ASCII-only rows under 64 KiB (most English
# SFT text: a byte is a character, nothing to decode, word boundaries found without a branch per byte) and
# ``_row_stats`` (UTF-8 decoding, CJK words, scripts) for every other row.
# --------------------------------------------------------------------------------------------------------------

# The helpers below but _decode (once per character of the general path) are plain @njit functions, which LLVM
# inlines where it pays: inline="always" (Numba-level inlining, which retypes the callee at every call site) made
# no measurable difference at run time and cost 6 s of first compile (18 s for the kernel against 12 s).
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xFF51AFD7ED558CCD)
_LINE_SEED = np.uint64(0x5EED11AE)
_WORD_SEED = np.uint64(0x5EED3012)
_NI, _NF, _NS = len(INT_SIGNALS), len(FLOAT_SIGNALS), len(SCRIPTS)
_LANE = np.uint64(0xFFFF)
_ASCII_MAX_BYTES = 0xFFFF  # the ASCII path counts in 16-bit lanes: a row of up to 65,535 bytes cannot overflow one


@functools.cache
def ascii_tables() -> tuple[np.ndarray, np.ndarray]:
    """The ASCII path's tables, from ``char_tables``: per byte < 128, the class counts as four 16-bit lanes of one
    uint64 (letter, digit << 16, punct << 32, space << 48: one add counts all four), and a flag for the bytes that
    need their own code ('#', '.', '`', newline, and ':' which ends a URL prefix as '.' does)."""
    cls, _ = char_tables()
    c = cls[:128].astype(np.uint64)
    lanes = (c & 1) | (((c >> 1) & 1) << 16) | (((c >> 2) & 1) << 32) | (((c >> 3) & 1) << 48)
    special = np.zeros(128, dtype=np.uint8)
    special[[ord("#"), ord("."), ord("`"), ord("\n"), ord(":")]] = 1
    return lanes.astype(np.uint64), special


@njit(inline="always", cache=True)
def _decode(data, i, end):
    """(code point, next byte index) of the UTF-8 sequence at ``data[i]``; bad bytes read as U+FFFD, one byte."""
    b0 = np.int64(data[i])
    if b0 < 0x80:
        return b0, i + 1
    if b0 >= 0xF0 and i + 3 < end and b0 < 0xF8:
        return ((b0 & 0x07) << 18) | ((np.int64(data[i + 1]) & 0x3F) << 12) | ((np.int64(data[i + 2]) & 0x3F) << 6) | (
            np.int64(data[i + 3]) & 0x3F
        ), i + 4
    if b0 >= 0xE0 and i + 2 < end and b0 < 0xF0:
        return ((b0 & 0x0F) << 12) | ((np.int64(data[i + 1]) & 0x3F) << 6) | (np.int64(data[i + 2]) & 0x3F), i + 3
    if b0 >= 0xC0 and i + 1 < end and b0 < 0xE0:
        return ((b0 & 0x1F) << 6) | (np.int64(data[i + 1]) & 0x3F), i + 2
    return np.int64(0xFFFD), i + 1


@njit(cache=True)
def _load64(data, i):
    """``data[i:i + 8]`` as a little-endian uint64 (``i`` unsigned: no wraparound code, so LLVM folds the eight
    byte loads into one)."""
    return (np.uint64(data[i]) | (np.uint64(data[i + np.uint64(1)]) << np.uint64(8))
            | (np.uint64(data[i + np.uint64(2)]) << np.uint64(16)) | (np.uint64(data[i + np.uint64(3)]) << np.uint64(24))
            | (np.uint64(data[i + np.uint64(4)]) << np.uint64(32)) | (np.uint64(data[i + np.uint64(5)]) << np.uint64(40))
            | (np.uint64(data[i + np.uint64(6)]) << np.uint64(48))
            | (np.uint64(data[i + np.uint64(7)]) << np.uint64(56)))  # fmt: skip


@njit(cache=True)
def _hash_fast(data, start, end, seed):
    """``hash_span(data, start, end, seed)``, the same value, with the last partial 8-byte word read in one load
    and masked (when 8 bytes are readable there) instead of byte by byte."""
    h = (np.uint64(seed) + _P1) ^ (np.uint64(end - start) * _P2)
    i = np.uint64(start)
    e = np.uint64(end)
    while i + np.uint64(8) <= e:
        h = (h ^ _fmix64(_load64(data, i) * _P2)) * _P3
        h = (h << np.uint64(27)) | (h >> np.uint64(37))
        i += np.uint64(8)
    k = e - i
    if i + np.uint64(8) <= np.uint64(data.shape[0]):
        w = _load64(data, i) & ((np.uint64(1) << (np.uint64(8) * k)) - np.uint64(1))
    else:
        w = np.uint64(0)
        for t in range(k):
            w |= np.uint64(data[i + t]) << (np.uint64(8) * t)
    h = (h ^ _fmix64(w * _P2 + k)) * _P3
    return _fmix64(h)


@njit(cache=True)
def _hash_word(data, start, end, seed):
    """``hash_span`` again, without a branch on the length for spans under 16 bytes (nearly every word): both the
    0- and the 1-chunk states are computed and one is selected by a mask. hash_span's byte loop, whose exit depends
    on each word's length, mispredicts about once per word: hashing the words was 40% of the kernel's time on 1 KB
    generated documents (0.33 of 0.79 s for 50k rows), now 25% of a 2.5x faster one."""
    n = np.uint64(end - start)
    u = np.uint64(start)
    if n >= np.uint64(16) or u + np.uint64(16) > np.uint64(data.shape[0]):
        return _hash_fast(data, start, end, seed)
    w0 = _load64(data, u)
    w1 = _load64(data, u + np.uint64(8))
    big = np.uint64(0) - (n >> np.uint64(3))  # all ones if n >= 8 (one full chunk), else 0
    h0 = (np.uint64(seed) + _P1) ^ (n * _P2)
    h1 = (h0 ^ _fmix64(w0 * _P2)) * _P3
    h1 = (h1 << np.uint64(27)) | (h1 >> np.uint64(37))
    k = n & np.uint64(7)
    w = ((w1 & big) | (w0 & ~big)) & ((np.uint64(1) << (np.uint64(8) * k)) - np.uint64(1))
    h = (h1 & big) | (h0 & ~big)
    h = (h ^ _fmix64(w * _P2 + k)) * _P3
    return _fmix64(h)


@njit(cache=True)
def _extend(g, h):
    """Order-dependent hash of (n-gram hash ``g``, next word hash ``h``): a murmur-style mix of the pair."""
    x = (g * _M1) ^ (h + np.uint64(0x632BE59BD9B4E019) + (g << np.uint64(6)) + (g >> np.uint64(2)))
    x ^= x >> np.uint64(33)
    x *= _M2
    x ^= x >> np.uint64(33)
    return x


@njit(cache=True)
def _is_bullet(cp):
    return (cp == 0x2D or cp == 0x2A or cp == 0x2022 or cp == 0x25CF or cp == 0x25E6 or cp == 0x2023
            or cp == 0x2043 or cp == 0x25AA or cp == 0x25A0 or cp == 0x2013)  # fmt: skip


@njit(cache=True)
def _url_at(data, i, end, cls):
    """True if ``(?:https?://|www\\.)\\S`` matches at byte ``i``."""
    b = data[i]
    k = -1
    if b == 0x77:  # www.
        if i + 4 <= end and data[i + 1] == 0x77 and data[i + 2] == 0x77 and data[i + 3] == 0x2E:
            k = i + 4
    elif b == 0x68 and i + 7 <= end and data[i + 1] == 0x74 and data[i + 2] == 0x74 and data[i + 3] == 0x70:
        j = i + 4
        if data[j] == 0x73:  # https
            j += 1
        if j + 3 <= end and data[j] == 0x3A and data[j + 1] == 0x2F and data[j + 2] == 0x2F:
            k = j + 3
    if k < 0 or k >= end:
        return False
    cp, _ = _decode(data, k, end)
    return (cls[cp] & 8) == 0


@njit(cache=True)
def _seen(h, keys, stamp, epoch, mask):
    """True if ``h`` is already in this epoch's table (linear probing); inserts it otherwise."""
    sl = np.int64(h & np.uint64(mask))
    while stamp[sl] == epoch and keys[sl] != h:
        sl = (sl + 1) & mask
    if stamp[sl] == epoch:
        return True
    stamp[sl] = epoch
    keys[sl] = h
    return False


# error_model="numpy": every division here is guarded, so skip the per-division zero checks
@njit(cache=True, error_model="numpy")
def _ngram_stats(out_f, r, n_words, word_chars, w_hash, w_len, g, cum, pos, slot_of, keys, cnt, stamp, epoch):
    """Gopher's top 2/3/4-gram and duplicated 5..10-gram fractions of row ``r`` from its word hashes and lengths.

    The n-grams of each n are counted in an open-addressing table (linear probing; a new epoch per (row, n)
    instead of clearing it). An n-gram can only repeat where its first n - 1 words repeat, so each n looks only at
    the positions whose (n-1)-gram occurred twice or more (``pos``, in text order, with their hashes in ``g``):
    every position for n = 2, then usually a few percent; when none is left, no longer n-gram repeats and the loop
    stops (most texts stop at n = 3..5). The counts and covered characters of the n-grams that occur twice are those
    of counting every position, so the fractions are too. The most frequent n-gram (ties: the one seen first) is the
    first position in text order whose count is the highest, found after counting, so the counting loop has no
    data-dependent branch but the probe. Sorting the hashes per n instead ran 5.7x slower on t0_train_50k's
    prompts (7.5 s vs 1.3 s for 54 MB). Returns the last epoch used."""
    one = np.uint64(1)
    cum[0] = 0
    for t in range(np.uint64(n_words)):
        cum[t + one] = cum[t] + w_len[t]
        g[t] = w_hash[t]
        pos[t] = t
    m = np.uint64(n_words)  # candidate positions for this n
    for n in range(2, 11):
        k_n = n_words - n + 1  # n-grams start at 0 .. k_n - 1
        while m > 0 and pos[m - one] >= k_n:
            m -= one
        if m == 0:
            break
        cap = 16
        while cap < 2 * np.int64(m):
            cap *= 2
        mask = np.uint64(cap - 1)
        epoch += 1
        dups = 0
        for j in range(m):
            h = _extend(g[j], w_hash[np.uint64(pos[j] + n - 1)])
            g[j] = h
            sl = h & mask
            while stamp[sl] == epoch and keys[sl] != h:
                sl = (sl + one) & mask
            fresh = stamp[sl] != epoch
            c_new = 1 if fresh else cnt[sl] + 1
            stamp[sl] = epoch
            keys[sl] = h
            cnt[sl] = c_new
            dups += not fresh
            slot_of[j] = sl
        if dups == 0:
            break
        best = -1  # n <= 4: the slot of the most frequent n-gram
        if n <= 4:
            best_c = 1
            for j in range(m):
                c_j = cnt[slot_of[j]]
                if c_j > best_c:
                    best_c = c_j
                    best = np.int64(slot_of[j])
        covered = 0
        cur = 0
        kept = np.uint64(0)  # the next n's candidates: positions whose n-gram occurred twice or more
        for j in range(m):
            s_j = np.int64(slot_of[j])
            t = np.int64(pos[j])
            if (s_j == best) if n <= 4 else (cnt[s_j] >= 2):
                lo = max(cur, t)
                if t + n > lo:
                    covered += cum[np.uint64(t + n)] - cum[np.uint64(lo)]
                    cur = t + n
            if cnt[s_j] >= 2:
                pos[kept] = t
                g[kept] = g[j]
                kept += one
        m = kept
        if n <= 4:
            out_f[r, 9 + n - 2] = covered / word_chars
        else:
            out_f[r, 12 + n - 5] = covered / word_chars
    return epoch


@njit(cache=True, error_model="numpy")
def _row_stats(
    data, start, end, cls, scr, out_i, out_f, out_s, r, w_hash, w_len, g, cum, pos, slot_of, keys, cnt, stamp, epoch
):  # fmt: skip
    """Signals of row ``r`` into the output arrays, any UTF-8. The other arrays are scratch reused across a chunk of
    rows (sized for its longest row: every word holds at least one byte, the table 2x that); ``stamp``/``epoch`` mark
    which table slots belong to the current (row, n), so the table is never cleared. Returns the next epoch."""
    n_chars = 0
    n_letters = n_digits = n_punct = n_space = n_nonascii = 0
    n_hash = n_ellipsis = n_fences = n_urls = 0
    n_words = n_alpha_words = word_chars = 0
    n_lines = max_line = bullets = ell_lines = 0
    dup_lines = dup_line_chars = 0
    n_ascii_letters = 0
    nb = end - start
    cap = 16
    while cap < 2 * ((nb + 1) // 2 + 1):
        cap *= 2
    table_mask = cap - 1  # this row's table: the first ``cap`` slots of the chunk's
    in_word = False
    w_start = 0
    w_chars = 0
    w_alpha = False
    in_url = False
    dot_run = 0
    tick_run = 0
    # current line: byte span and character span of its stripped content
    l_first = -1
    l_first_ci = 0
    l_last_end = 0
    l_last_ci = 0
    l_first_cp = 0
    l_last_cp = 0
    l_last_dots = 0
    i = start
    while i <= end:
        if i < end:
            cp, nxt = _decode(data, i, end)
            c = cls[cp]
        else:
            cp, nxt, c = np.int64(10), end + 1, np.uint8(8)  # a virtual newline closes the last word and line
        is_space = (c & 8) != 0
        # runs of '.' and '`' (ellipsis and code-fence counts, like str.count)
        if cp == 0x2E:
            dot_run += 1
        else:
            n_ellipsis += dot_run // 3
            dot_run = 0
        if cp == 0x60:
            tick_run += 1
        else:
            n_fences += tick_run // 3
            tick_run = 0
        if i < end:
            n_chars += 1
            if c & 1:
                n_letters += 1
                if cp < 128:  # ASCII letters are Latin: a register count, not a store per letter
                    n_ascii_letters += 1
                else:
                    out_s[r, scr[cp]] += 1
            if c & 2:
                n_digits += 1
            if c & 4:
                n_punct += 1
            if is_space:
                n_space += 1
            if cp > 127:
                n_nonascii += 1
            if cp == 0x23:
                n_hash += 1
            elif cp == 0x2026:
                n_ellipsis += 1
            if is_space:
                in_url = False
            elif not in_url and (cp == 0x68 or cp == 0x77) and _url_at(data, i, end, cls):
                n_urls += 1
                in_url = True
        # words
        if is_space or (c & 16):
            if in_word:
                w_hash[n_words] = _hash_fast(data, w_start, i, _WORD_SEED)
                w_len[n_words] = w_chars
                n_words += 1
                word_chars += w_chars
                if w_alpha:
                    n_alpha_words += 1
                in_word = False
            if c & 16:
                w_hash[n_words] = _hash_fast(data, i, nxt, _WORD_SEED)
                w_len[n_words] = 1
                n_words += 1
                word_chars += 1
                if c & 1:
                    n_alpha_words += 1
        else:
            if not in_word:
                in_word = True
                w_start = i
                w_chars = 0
                w_alpha = False
            w_chars += 1
            w_alpha = w_alpha or (c & 1) != 0
        # lines
        if cp == 10:
            if l_first >= 0:
                ln = l_last_ci - l_first_ci
                # a line equal to an earlier one (same hash) is a duplicate: counted in the table under this epoch
                if _seen(_hash_fast(data, l_first, l_last_end, _LINE_SEED), keys, stamp, epoch, table_mask):
                    dup_lines += 1
                    dup_line_chars += ln
                n_lines += 1
                max_line = max(max_line, ln)
                if _is_bullet(l_first_cp):
                    bullets += 1
                if l_last_cp == 0x2026 or (l_last_cp == 0x2E and l_last_dots >= 3):
                    ell_lines += 1
            l_first = -1
        elif not is_space:
            if l_first < 0:
                l_first = i
                l_first_ci = n_chars - 1
                l_first_cp = cp
            l_last_end = nxt
            l_last_ci = n_chars
            l_last_cp = cp
            l_last_dots = dot_run
        i = nxt

    out_i[r, 0] = n_chars
    out_i[r, 1] = n_words
    out_i[r, 2] = n_lines
    out_i[r, 3] = max_line
    out_i[r, 4] = n_urls
    out_i[r, 5] = n_fences
    div = n_chars if n_chars > 0 else 1
    out_f[r, 0] = word_chars / n_words if n_words > 0 else 0.0
    out_f[r, 1] = n_letters / div
    out_f[r, 2] = n_digits / div
    out_f[r, 3] = n_punct / div
    out_f[r, 4] = n_space / div
    out_f[r, 5] = n_nonascii / div
    out_f[r, 6] = n_alpha_words / n_words if n_words > 0 else 0.0
    out_f[r, 7] = dup_lines / n_lines if n_lines > 0 else 0.0
    out_f[r, 8] = dup_line_chars / div
    epoch = _ngram_stats(out_f, r, n_words, word_chars, w_hash, w_len, g, cum, pos, slot_of, keys, cnt, stamp, epoch)
    n_sym = max(n_ellipsis, n_hash)
    out_f[r, 18] = n_sym / n_words if n_words > 0 else 0.0
    out_f[r, 19] = bullets / n_lines if n_lines > 0 else 0.0
    out_f[r, 20] = ell_lines / n_lines if n_lines > 0 else 0.0
    out_s[r, 1] += n_ascii_letters
    dom = 0
    best = 0
    for s in range(out_s.shape[1]):
        if out_s[r, s] > best:
            best = out_s[r, s]
            dom = s
    out_i[r, 6] = dom
    out_f[r, 21] = best / n_letters if n_letters > 0 else 0.0
    return epoch + 1


@njit(cache=True)
def _ascii_scan(data, start, end, lanes, special, bnd, ev):
    """The byte loop of ``_row_stats_ascii``, kept apart so that its 12 live values fit in registers (inside the row
    function they spilled to the stack: 30 instructions a byte, now 14). No branch on the text: ``lanes`` adds the
    four class counts of a byte in one uint64 add; each space/non-space change stores (offset | letters so far << 32)
    in ``bnd`` at a slot that only advances on a change, so word j spans ``bnd[2j] .. bnd[2j + 1]``; the offsets of
    the bytes in ``special`` go to ``ev`` the same way. Returns (changes, class counts, events, whether the text
    ends in whitespace)."""
    us = np.uint64(start)
    acc = np.uint64(0)  # letters | digits << 16 | punct << 32 | spaces << 48
    prev = np.uint64(1)  # the previous byte was whitespace (the text starts as if after one)
    k = np.uint64(0)
    ne = np.uint64(0)
    for u in range(us, np.uint64(end)):
        b = data[u]
        x = lanes[b]
        sp = x >> np.uint64(48)
        off = u - us
        bnd[k] = off | ((acc & _LANE) << np.uint64(32))
        k += sp ^ prev
        prev = sp
        acc += x
        ev[ne] = np.uint32(off)
        ne += np.uint64(special[b])
    return k, acc, ne, prev


@njit(cache=True)
def _ascii_line(data, lo, hi, lanes, keys, stamp, epoch, table_mask):
    """One line ``data[lo:hi]`` of an ASCII row: (stripped length or -1 if empty, a duplicate of an earlier line,
    a bullet line, an ellipsis line); inserts the line's hash into this epoch's table."""
    while lo < hi and (lanes[data[lo]] >> np.uint64(48)) != 0:
        lo += 1
    if lo == hi:
        return -1, False, False, False
    while (lanes[data[hi - 1]] >> np.uint64(48)) != 0:
        hi -= 1
    ln = hi - lo
    dup = _seen(_hash_fast(data, lo, hi, _LINE_SEED), keys, stamp, epoch, table_mask)
    bullet = data[lo] == 0x2D or data[lo] == 0x2A  # the ASCII ones among BULLETS
    ell = ln >= 3 and data[hi - 1] == 0x2E and data[hi - 2] == 0x2E and data[hi - 3] == 0x2E
    return ln, dup, bullet, ell


@njit(cache=True, error_model="numpy")
def _row_stats_ascii(
    data, start, end, cls, lanes, special, out_i, out_f, out_s, r, bnd, ev, w_hash, w_len, g, cum, pos, slot_of,
    keys, cnt, stamp, epoch,
):  # fmt: skip
    """``_row_stats`` for a row of ASCII bytes only (at most ``_ASCII_MAX_BYTES``), the same numbers: every byte is a
    character and every letter Latin, and no byte is a CJK word. ``_ascii_scan`` finds the words and counts the
    classes without a branch per byte; the few bytes it lists (newlines, '.', '`', '#', URL prefixes) are handled
    here in text order. 4x faster than ``_row_stats`` on ~1 KB English texts, where a mispredicted branch at every
    word boundary dominated."""
    nb = end - start
    cap = 16
    while cap < 2 * ((nb + 1) // 2 + 1):
        cap *= 2
    table_mask = cap - 1
    k, acc, ne, prev = _ascii_scan(data, start, end, lanes, special, bnd, ev)
    n_hash = n_ellipsis = n_fences = n_urls = 0
    url_until = start  # a URL runs to the next whitespace (\S+): no other starts before it
    dot_end = tick_end = -1
    dot_run = tick_run = 0
    n_lines = max_line = bullets = ell_lines = dup_lines = dup_line_chars = 0
    l_start = start
    for q in range(ne + np.uint64(1)):
        if q < ne:
            i = start + np.int64(ev[q])
            b = data[i]
            # a URL prefix ends in ':' ("http:", "https:") or '.' ("www."): look back from those for its start
            p = i - 3 if b == 0x2E else (i - 5 if i - 5 >= start and data[i - 1] == 0x73 else i - 4)
            if (b == 0x2E or b == 0x3A) and p >= url_until and _url_at(data, p, end, cls):
                n_urls += 1
                url_until = p + 1
                while url_until < end and (lanes[data[url_until]] >> np.uint64(48)) == 0:
                    url_until += 1
            if b == 0x3A:
                continue
        else:
            i = end
            b = np.uint8(10)  # a virtual newline closes the last line
        if b == 10:
            ln, dup, bullet, ell = _ascii_line(data, l_start, i, lanes, keys, stamp, epoch, table_mask)
            if ln >= 0:
                n_lines += 1
                max_line = max(max_line, ln)
                if dup:
                    dup_lines += 1
                    dup_line_chars += ln
                bullets += bullet
                ell_lines += ell
            l_start = i + 1
        elif b == 0x2E:  # runs of '.' and '`': ellipsis and code-fence counts, like str.count
            if i != dot_end:
                n_ellipsis += dot_run // 3
                dot_run = 0
            dot_run += 1
            dot_end = i + 1
        elif b == 0x60:
            if i != tick_end:
                n_fences += tick_run // 3
                tick_run = 0
            tick_run += 1
            tick_end = i + 1
        else:
            n_hash += 1
    n_ellipsis += dot_run // 3
    n_fences += tick_run // 3
    if prev == 0:  # close the last word
        bnd[k] = np.uint64(nb) | ((acc & _LANE) << np.uint64(32))
        k += np.uint64(1)
    n_words = np.int64(k >> np.uint64(1))
    word_chars = n_alpha_words = 0
    low = np.uint64(0xFFFFFFFF)
    for j in range(np.uint64(n_words)):
        a = bnd[j + j]
        z = bnd[j + j + np.uint64(1)]
        ws = np.int64(a & low)
        we = np.int64(z & low)
        w_hash[j] = _hash_word(data, start + ws, start + we, _WORD_SEED)
        w_len[j] = we - ws
        word_chars += we - ws
        n_alpha_words += (z >> np.uint64(32)) > (a >> np.uint64(32))  # letters (the high half) inside the word
    n_letters = np.int64(acc & _LANE)
    n_chars = nb
    out_i[r, 0] = n_chars
    out_i[r, 1] = n_words
    out_i[r, 2] = n_lines
    out_i[r, 3] = max_line
    out_i[r, 4] = n_urls
    out_i[r, 5] = n_fences
    div = n_chars if n_chars > 0 else 1
    out_f[r, 0] = word_chars / n_words if n_words > 0 else 0.0
    out_f[r, 1] = n_letters / div
    out_f[r, 2] = np.int64((acc >> np.uint64(16)) & _LANE) / div
    out_f[r, 3] = np.int64((acc >> np.uint64(32)) & _LANE) / div
    out_f[r, 4] = np.int64(acc >> np.uint64(48)) / div
    out_f[r, 5] = 0.0
    out_f[r, 6] = n_alpha_words / n_words if n_words > 0 else 0.0
    out_f[r, 7] = dup_lines / n_lines if n_lines > 0 else 0.0
    out_f[r, 8] = dup_line_chars / div
    epoch = _ngram_stats(out_f, r, n_words, word_chars, w_hash, w_len, g, cum, pos, slot_of, keys, cnt, stamp, epoch)
    n_sym = max(n_ellipsis, n_hash)
    out_f[r, 18] = n_sym / n_words if n_words > 0 else 0.0
    out_f[r, 19] = bullets / n_lines if n_lines > 0 else 0.0
    out_f[r, 20] = ell_lines / n_lines if n_lines > 0 else 0.0
    out_s[r, 1] = n_letters  # all Latin
    out_i[r, 6] = 1 if n_letters > 0 else 0
    out_f[r, 21] = 1.0 if n_letters > 0 else 0.0
    return epoch + 1


@njit(cache=True)
def _is_ascii(data, start, end):
    acc = np.uint8(0)
    for u in range(np.uint64(start), np.uint64(end)):  # unsigned: no wraparound code, so LLVM vectorises it
        acc |= data[u]
    return acc < 0x80


_CHUNK = 256  # rows per scratch allocation: per-row allocations cost more than the work on a short text


@njit(parallel=True, cache=True)
def text_stats_numba(data, offsets, cls, scr, lanes, special, ascii_path=True):
    """Signals of every row of a (bytes, offsets) string column: (ints (n, 7), floats (n, 22), scripts (n, 12)).
    ``ascii_path=False`` sends every row through the general ``_row_stats`` (the tests compare the two paths)."""
    n = offsets.shape[0] - 1
    out_i = np.zeros((n, _NI), dtype=np.int64)
    out_f = np.zeros((n, _NF), dtype=np.float64)
    out_s = np.zeros((n, _NS), dtype=np.int32)
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for c in prange(n_chunks):
        lo = c * _CHUNK
        hi = min(n, lo + _CHUNK)
        longest = 0
        for r in range(lo, hi):
            longest = max(longest, offsets[r + 1] - offsets[r])
        # A text of b bytes has at most (b + 1) // 2 words and as many lines: every word but the last is followed
        # by whitespace or is (or precedes) a 3-byte CJK word, and every line but the last ends in "\n"; it has at
        # most b changes between space and non-space. So scratch is about 68 bytes per word (36 per word, 16 per
        # table slot) and 12 per byte for the ASCII path: 46 bytes per byte of the chunk's longest text (460 MB for
        # a 10 MB text).
        m = (longest + 1) // 2 + 2
        cap = 16
        while cap < 2 * m:
            cap *= 2
        bnd = np.empty(longest + 2, dtype=np.uint64)
        ev = np.empty(longest + 1, dtype=np.uint32)
        w_hash = np.empty(m, dtype=np.uint64)
        w_len = np.empty(m, dtype=np.int32)
        g = np.empty(m, dtype=np.uint64)
        cum = np.empty(m, dtype=np.int64)
        pos = np.empty(m, dtype=np.int32)
        slot_of = np.empty(m, dtype=np.int32)
        keys = np.empty(cap, dtype=np.uint64)
        cnt = np.empty(cap, dtype=np.int32)
        stamp = np.zeros(cap, dtype=np.int32)
        epoch = 1
        for r in range(lo, hi):
            s, e = offsets[r], offsets[r + 1]
            if ascii_path and e - s <= _ASCII_MAX_BYTES and _is_ascii(data, s, e):
                epoch = _row_stats_ascii(data, s, e, cls, lanes, special, out_i, out_f, out_s, r, bnd, ev, w_hash,
                                         w_len, g, cum, pos, slot_of, keys, cnt, stamp, epoch)  # fmt: skip
            else:
                epoch = _row_stats(data, s, e, cls, scr, out_i, out_f, out_s, r, w_hash, w_len, g, cum, pos, slot_of,
                                   keys, cnt, stamp, epoch)  # fmt: skip
    return out_i, out_f, out_s


def text_stats(arr, device: str = "auto", *, ascii_path: bool = True) -> dict[str, np.ndarray]:
    """Per-row text signals (see the module docstring) of an Arrow string column, list of str also accepted.

    Returns {signal: 1-D numpy array} for ``SIGNALS`` plus ``script_letters`` (n, len(SCRIPTS)) int32.
    ``device`` is "auto" or "cpu": this is branchy byte-level work with per-text sorts, which Numba on CPU threads
    does well and a GPU would not, so there is no GPU path. ``ascii_path=False`` sends ASCII rows through the
    general per-code-point path too (the same numbers, slower: for the tests).
    """
    if device not in ("auto", "cpu"):
        raise ValueError(
            f"text_stats(device={device!r}): the text-statistics kernel runs on the CPU only; "
            "use device='cpu' or 'auto'"
        )
    if not isinstance(arr, (pa.Array, pa.ChunkedArray)):
        arr = pa.array(arr, pa.large_string())
    data, offsets = utf8_view(arr)
    cls, scr = char_tables()
    lanes, special = ascii_tables()
    out_i, out_f, out_s = text_stats_numba(data, offsets, cls, scr, lanes, special, ascii_path)
    out = {k: np.ascontiguousarray(out_i[:, j]) for j, k in enumerate(INT_SIGNALS)}
    out.update({k: np.ascontiguousarray(out_f[:, j]) for j, k in enumerate(FLOAT_SIGNALS)})
    out["script"] = out["script"].astype(np.uint8)
    out["script_letters"] = out_s
    return out


# --------------------------------------------------------------------------------------------------------------
# contains_prompt: is the prompt a substring of the response, after ASCII case folding and collapsing runs of
# ASCII whitespace to one space (the "response repeats the prompt" rule). Rabin-Karp over the normalised bytes:
# O(len(response) + len(prompt)) per row, with a byte comparison on every hash hit.
# --------------------------------------------------------------------------------------------------------------

_WS_RE = re.compile(rb"[ \t\n\r\x0b\x0c]+")


def _norm_ascii(s: str) -> bytes:
    return _WS_RE.sub(b" ", s.encode("utf-8").lower()).strip(b" ")  # bytes.lower() folds ASCII only


def contains_prompt_reference(responses, prompts) -> np.ndarray:
    """int8 per row: 2 if the normalised response equals the normalised prompt, 1 if it contains it, else 0;
    0 when the prompt is empty after normalisation."""
    if isinstance(responses, (pa.Array, pa.ChunkedArray)):
        responses = responses.to_pylist()
    if isinstance(prompts, (pa.Array, pa.ChunkedArray)):
        prompts = prompts.to_pylist()
    out = np.zeros(len(responses), dtype=np.int8)
    for i, (r, p) in enumerate(zip(responses, prompts)):
        nr, np_ = _norm_ascii(r or ""), _norm_ascii(p or "")
        if np_:
            out[i] = 2 if nr == np_ else (1 if np_ in nr else 0)
    return out


@njit(inline="always", cache=True)
def _is_ascii_ws(b):
    return b == 32 or (9 <= b <= 13)


@njit(cache=True)
def _normalise(data, start, end):
    """Normalised copy of ``data[start:end]``: ASCII lower case, whitespace runs -> one space, stripped."""
    out = np.empty(end - start, dtype=np.uint8)
    m = 0
    pending = False
    for i in range(start, end):
        b = data[i]
        if _is_ascii_ws(b):
            pending = m > 0
            continue
        if pending:
            out[m] = 32
            m += 1
            pending = False
        if 65 <= b <= 90:
            b = np.uint8(b + 32)
        out[m] = b
        m += 1
    return out[:m]


@njit(parallel=True, cache=True)
def contains_prompt_numba(r_data, r_off, p_data, p_off, todo):
    """int8 per row (see ``contains_prompt_reference``); rows where ``todo`` is false are skipped (0)."""
    n = r_off.shape[0] - 1
    out = np.zeros(n, dtype=np.int8)
    base = np.uint64(1099511628211)
    for i in prange(n):
        if not todo[i]:
            continue
        p = _normalise(p_data, p_off[i], p_off[i + 1])
        m = p.shape[0]
        if m == 0:
            continue
        s = _normalise(r_data, r_off[i], r_off[i + 1])
        L = s.shape[0]
        if L < m:
            continue
        if L == m:
            same = True
            for t in range(m):
                if s[t] != p[t]:
                    same = False
                    break
            out[i] = 2 if same else 0
            continue
        hp = np.uint64(0)
        hs = np.uint64(0)
        top = np.uint64(1)  # base^(m-1), wrapping mod 2^64
        for t in range(m):
            hp = hp * base + np.uint64(p[t])
            hs = hs * base + np.uint64(s[t])
            if t > 0:
                top *= base
        for j in range(L - m + 1):
            if hs == hp:
                same = True
                for t in range(m):
                    if s[j + t] != p[t]:
                        same = False
                        break
                if same:
                    out[i] = 1
                    break
            if j + m < L:
                hs = (hs - np.uint64(s[j]) * top) * base + np.uint64(s[j + m])
    return out


def contains_prompt(responses, prompts, todo: np.ndarray | None = None) -> np.ndarray:
    """int8 per row (2 equal, 1 contains, 0 neither) of two aligned Arrow string columns; see the reference.
    ``todo`` (bool per row) limits the work to the rows a caller will look at; the others read 0."""
    rd, ro = utf8_view(responses)
    pd_, po = utf8_view(prompts)
    if todo is None:
        todo = np.ones(len(ro) - 1, dtype=np.bool_)
    return contains_prompt_numba(rd, ro, pd_, po, np.ascontiguousarray(todo, dtype=np.bool_))


# --------------------------------------------------------------------------------------------------------------
# contains_literals: which of a few byte strings occur in each row, ASCII A-Z folded to a-z: a pre-filter, so that a
# regex whose unanchored alternatives each need one of the literals runs only on the rows that hold one (RE2 scans
# a whole 1 KB text for an unanchored alternative, about 570 MB/s here). One pass over the bytes: a literal is
# compared only where the (folded) byte pair at a position is its first two bytes (two 256-entry bit tables).
# --------------------------------------------------------------------------------------------------------------


def contains_literals_reference(texts, literals) -> np.ndarray:
    """uint64 per row: bit j set if ``literals[j]`` (bytes, lower-case ASCII) occurs in the row's UTF-8 bytes with
    ASCII upper case folded (``None`` reads as "")."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()
    out = np.zeros(len(texts), dtype=np.uint64)
    for i, t in enumerate(texts):
        b = (t or "").encode("utf-8").lower()  # bytes.lower() folds ASCII only
        for j, lit in enumerate(literals):
            if lit in b:
                out[i] |= np.uint64(1 << j)
    return out


@njit(cache=True)
def _literal_hits(data, i, e, m, lits, lit_len, fold):
    """The bits of ``m`` whose literal occurs at ``data[i]`` (its first two bytes already match)."""
    hits = np.uint64(0)
    while m:
        j = 0
        while not (m >> np.uint64(j)) & np.uint64(1):
            j += 1
        bit = np.uint64(1) << np.uint64(j)
        m &= ~bit
        ln = np.uint64(lit_len[j])
        if i + ln > e:
            continue
        same = True
        for t in range(np.uint64(2), ln):
            if fold[data[i + t]] != lits[j, t]:
                same = False
                break
        if same:
            hits |= bit
    return hits


@njit(parallel=True, cache=True)
def contains_literals_numba(data, offsets, lits, lit_len, first, second, fold, todo):
    """uint64 bit mask per row (see ``contains_literals_reference``); rows where ``todo`` is false read 0.
    ``lits`` (k, max length) holds the folded literals, ``first[b]`` / ``second[b]`` the bits of those whose first /
    second byte is b after folding (every 1-byte literal is in all of ``second``)."""
    n = offsets.shape[0] - 1
    out = np.zeros(n, dtype=np.uint64)
    one_byte = second[0]
    for c in range(1, 256):
        one_byte &= second[c]
    for r in prange(n):
        if not todo[r] or offsets[r + 1] == offsets[r]:
            continue
        s = np.uint64(offsets[r])
        e = np.uint64(offsets[r + 1])
        found = np.uint64(0)
        for i in range(s, e - np.uint64(1)):
            m = first[data[i]] & second[data[i + np.uint64(1)]] & ~found
            if m:
                found |= _literal_hits(data, i, e, m, lits, lit_len, fold)
        m = first[data[e - np.uint64(1)]] & one_byte & ~found
        if m:
            found |= m
        out[r] = found
    return out


@functools.cache
def _literal_tables(literals: tuple[bytes, ...]) -> tuple[np.ndarray, ...]:
    k = len(literals)
    if not 0 < k <= 64 or any(not lit for lit in literals):
        raise ValueError(f"contains_literals needs 1..64 non-empty literals, got {k}")
    lits = np.zeros((k, max(map(len, literals))), dtype=np.uint8)
    lit_len = np.zeros(k, dtype=np.int64)
    first = np.zeros(256, dtype=np.uint64)
    second = np.zeros(256, dtype=np.uint64)
    for j, lit in enumerate(literals):
        if lit != lit.lower():
            raise ValueError(f"contains_literals: literal {lit!r} must be lower case (ASCII is folded)")
        lits[j, : len(lit)] = np.frombuffer(lit, dtype=np.uint8)
        lit_len[j] = len(lit)
        first[lit[0]] |= np.uint64(1 << j)
        if len(lit) == 1:
            second |= np.uint64(1 << j)
        else:
            second[lit[1]] |= np.uint64(1 << j)
    fold = np.arange(256, dtype=np.uint8)
    fold[65:91] += 32
    return lits, lit_len, first[fold], second[fold], fold  # indexed by the raw byte: no fold in the scan


def contains_literals(arr, literals: tuple[bytes, ...], todo: np.ndarray | None = None) -> np.ndarray:
    """uint64 bit mask per row of an Arrow string column: bit j set if ``literals[j]`` (lower-case bytes, at most 64)
    occurs, ASCII case ignored. ``todo`` (bool per row) limits the work to those rows; the others read 0."""
    data, offsets = utf8_view(arr)
    if todo is None:
        todo = np.ones(len(offsets) - 1, dtype=np.bool_)
    if len(data) == 0:
        data = np.zeros(1, dtype=np.uint8)
    return contains_literals_numba(data, offsets, *_literal_tables(tuple(literals)),
                                   np.ascontiguousarray(todo, dtype=np.bool_))  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# junk_stats: the signals of the clean stage's short-text junk rules (no_content, random_letters, repeated_words),
# which judge texts of any length. Definitions (the reference and the kernel follow them exactly):
#
# - ``n_content``: characters that are letters, numbers or symbols (categories L*, N*, S*: emoji and math count);
#   ``n_nonspace``: characters that are not whitespace. A text with n_chars > 0 and n_content = 0 holds only
#   punctuation, whitespace, controls or invisible format characters.
# - Latin words, for random_letters: take each whitespace-separated token; skip it if it starts with "#" or "@"
#   (hashtags and mentions are not dictionary words); strip leading and trailing characters that are neither
#   letters nor numbers (L*, N*); split what is left at "'", "’" and "-"; a part made of ASCII letters only is a
#   Latin word, except an all-capital one of 2..5 letters (an acronym: "NASA", "HTML"). Parts with a digit, an
#   underscore, other punctuation or any non-ASCII character are not judged ("x_val", "fn(x", "3rd", "Dónde"),
#   so code, math, URLs and accented words are left alone. ``latin_letters`` counts their letters.
# - Their bigrams: adjacent letters of a Latin word, case folded, skipping a letter equal to the one before it
#   (elongations: "soooo", "hmmm"). ``latin_bigrams`` counts them, ``bigram_score`` sums ``bigram_scores()[a, b]``
#   over them and ``rare_bigrams`` counts those scoring ``RARE_BIGRAM_SCORE`` or less.
# - Words, for repeated_words: the words of text_stats (whitespace runs; every Han or Kana character a word),
#   stripped of leading and trailing punctuation (P*), empty ones dropped, compared with ASCII case folded.
#   ``rep_unit`` is the smallest p in 1..max_unit such that word i equals word i - p for every i >= p and there
#   are at least 2p words, 0 if there is none or if the first p words hold no letter ("0 0 0", "😂 😂 😂" are not
#   text repeated); ``rep_words`` is the number of words where rep_unit > 0, else 0 (the kernel stops looking at
#   words once no period is left: after a few words of any ordinary text). "Checking, checking. CHECKING" is unit
#   1, 3 words.
# --------------------------------------------------------------------------------------------------------------

JUNK_SIGNALS = ("n_content", "n_nonspace", "latin_letters", "latin_bigrams", "rare_bigrams", "bigram_score",
                "rep_unit", "rep_words")  # fmt: skip
RARE_BIGRAM_SCORE = -7  # at most 2^-7 times the uniform rate 1/650

# Letter-bigram scores: round(log2(650 * p(a, b))) clipped to -8..4, where p is the share of bigram (a, b) among
# the 650 bigrams of two different letters in the Latin words of alpaca_52k and t0_train_50k (instruction, input
# and output; the mean of the two sets' shares), so 0 is "as often as in uniformly random letters". Then the
# digraphs of other Latin orthographies that English rarely uses are raised to 0 (``_FOREIGN_DIGRAPHS``): without
# that, Polish "Wszystkie dzieci lubią czekoladę" scores -2.2 per bigram with 3 rare ones (random letters score
# -3.1 on average), with it -0.8 with 1. Reproduce: ``python bench/bench_rules_fp.py --derive-table``. Row = first letter, column = second;
# character "a" is -8, "i" is 0, "m" is +4.
_BIGRAM_TABLE = (  # columns a..z
    "ajkjehjfjfiljmdidllliigfjf"  # a
    "iabbkaabifaibbjbaigdibbaia"  # b
    "kaabkaakjaiicbkacjgjiaaaga"  # c
    "idcakdfdkdageficchicifeaga"  # d
    "kgklaiificfkjlhigmlkgjijie"  # e
    "iaaajabajaahaakaajdhhaaafa"  # f
    "ibadkcaiiaahdhiaaigfhabaha"  # g
    "kddcmbaakaaffgkaahfihadaga"  # h
    "jhkjjijbachkjmkhfjllfjcfbh"  # i
    "gaaagaaaeaaaaahaaaaagaaaaa"  # j
    "gcbbjcdciaafcgfcadhcdabafa"  # k
    "kffjlgfbkafagdkgaeiiigeaja"  # l
    "khdakdaajaadadjjadhbhabaga"  # m
    "jdklkhlejfgggajfdeklhhechd"  # n
    "hhiigkifhehjklajaljjkjjfgd"  # o
    "jbcckcahiaajeajaakhhiaaaea"  # p
    "baaaaaaacaaaaaaaaaaaiaaaaa"  # q
    "kgiimgiekaihiikgaajjiheaja"  # r
    "jdielfcjkahghfjiddaljbhaga"  # s
    "kegclecmlaahfeleajjajbiajc"  # t
    "ihiiieibhadjijdiakkjacaced"  # u
    "iaaalaaajaaaaahaaabacaaada"  # v
    "jcbdjcajjacfahjaahgdbaaaca"  # w
    "gafafbacgaaaaabhaaahdaaada"  # x
    "feeehbdagaafffigaehfcadaae"  # y
    "gaaahaacfaabaaeaaaaacaaaca"  # z
)
# Polish, Czech, Croatian, Hungarian, Albanian, Basque, Catalan, Nordic, Dutch, German, Welsh, pinyin, Bantu,
# Yoruba, Zulu digraphs (and the clusters they sit in: Polish "wsz", "wk", Czech "vl", "zm")
_FOREIGN_DIGRAPHS = (
    "sz cz rz dz zs gy ny ly ty cs lj nj vr hv dj xh dh gj zh tx tz ix ig kj sj tj bj fj ij pf zw dt dd wy yw cw mh "
    "nh rh wh ng mb nd mw kw nz gb kp hl dl kh bh ph qi xi xu ao ui ua wk wp wr ws wz wn wd zn zm zl mr vl vn vz"
)


@functools.cache
def bigram_scores() -> np.ndarray:
    """(26, 26) int8 letter-bigram scores (see ``_BIGRAM_TABLE``), the foreign digraphs raised to at least 0."""
    if len(_BIGRAM_TABLE) != 26 * 26 or not set(_BIGRAM_TABLE) <= set("abcdefghijklm"):
        raise ValueError("kernels.text_stats._BIGRAM_TABLE must be 26 rows of 26 letters a..m")
    codes = np.frombuffer(_BIGRAM_TABLE.encode("ascii"), dtype=np.uint8).astype(np.int16) - (ord("a") + 8)
    table = codes.reshape(26, 26).astype(np.int8)
    for d in _FOREIGN_DIGRAPHS.split():
        a, b = ord(d[0]) - 97, ord(d[1]) - 97
        table[a, b] = max(table[a, b], 0)
    return table


def _is_alnum_ref(ch: str) -> bool:
    return unicodedata.category(ch)[0] in "LN"


_SPLIT_RE = re.compile("['’-]")


def latin_words_reference(text: str) -> list[str]:
    """The Latin words of ``text`` (see the section comment), as written."""
    out = []
    for tok in text.split():  # str.split(): the whitespace of str.isspace, as the kernel's table
        if tok[0] in "#@":
            continue
        i, j = 0, len(tok)
        while i < j and not _is_alnum_ref(tok[i]):
            i += 1
        while j > i and not _is_alnum_ref(tok[j - 1]):
            j -= 1
        for part in _SPLIT_RE.split(tok[i:j]):
            if not part or not part.isascii() or not part.isalpha():
                continue
            if 2 <= len(part) <= 5 and part.isupper():
                continue
            out.append(part)
    return out


def _rep_words_reference(text: str) -> list[tuple[str, bool]]:
    """(folded word, has a letter) for the repetition rule's words."""
    out = []
    for w in _WORD_RE.findall(text):
        i, j = 0, len(w)
        while i < j and unicodedata.category(w[i])[0] == "P":
            i += 1
        while j > i and unicodedata.category(w[j - 1])[0] == "P":
            j -= 1
        if i < j:
            core = w[i:j]
            folded = core.encode("utf-8").lower()  # bytes.lower(): ASCII only, like the kernel
            out.append((folded, any(unicodedata.category(c)[0] == "L" for c in core)))
    return out


def junk_stats_reference(texts, max_unit: int = 3) -> dict[str, np.ndarray]:
    """``JUNK_SIGNALS`` per text in plain Python (``None`` reads as ""): for the tests."""
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()
    scores = bigram_scores()
    rows = []
    for t in texts:
        t = t or ""
        n_content = sum(unicodedata.category(c)[0] in "LNS" for c in t)
        n_nonspace = sum(not c.isspace() for c in t)
        letters = bigrams = rare = score = 0
        for w in latin_words_reference(t):
            letters += len(w)
            low = w.lower()
            for a, b in itertools.pairwise(low):
                if a != b:
                    s = int(scores[ord(a) - 97, ord(b) - 97])
                    bigrams += 1
                    score += s
                    rare += s <= RARE_BIGRAM_SCORE
        words = _rep_words_reference(t)
        unit = 0
        for p in range(1, max_unit + 1):
            if len(words) >= 2 * p and all(words[i][0] == words[i - p][0] for i in range(p, len(words))):
                unit = p if any(h for _, h in words[:p]) else 0
                break
        rows.append((n_content, n_nonspace, letters, bigrams, rare, score, unit, len(words) if unit else 0))
    out = np.array(rows, dtype=np.int64).reshape(len(rows), len(JUNK_SIGNALS))
    return {k: np.ascontiguousarray(out[:, j]) for j, k in enumerate(JUNK_SIGNALS)}


@njit(cache=True)
def _prev_cp_start(data, lo, j):
    """Start of the code point that ends just before byte ``j`` (not before ``lo``)."""
    j -= 1
    while j > lo and (data[j] & 0xC0) == 0x80:
        j -= 1
    return j


@njit(cache=True)
def _commit_part(acc, n, upper, bigrams, score, rare):
    """Adds one Latin word's counts to ``acc`` (letters, bigrams, rare, score), unless it is an acronym."""
    if n > 0 and not (2 <= n <= 5 and upper == n):
        acc[0] += n
        acc[1] += bigrams
        acc[2] += rare
        acc[3] += score


@njit(cache=True)
def _fold_hash(data, a, b):
    """64-bit hash of ``data[a:b]`` with ASCII A-Z folded to a-z (FNV-1a, then the murmur finaliser)."""
    h = np.uint64(0xCBF29CE484222325)
    for k in range(a, b):
        x = data[k]
        if 65 <= x <= 90:
            x += 32
        h = (h ^ np.uint64(x)) * np.uint64(0x100000001B3)
    return _fmix64(h ^ np.uint64(b - a))


@njit(cache=True)
def _junk_row(data, s, e, cls, scores, max_unit, ring, ok, alpha, acc, out, r):
    """``JUNK_SIGNALS`` of row ``r`` into ``out``, in one pass over its code points; ``ring`` / ``ok`` / ``alpha``
    (max_unit + 1) and ``acc`` (4) are scratch reused across rows.

    The Latin words are found on the fly, without going back over a token: the reference strips a token's ends
    and then splits it, so here a non-alphanumeric character after a word's letters sets ``tail`` (trailing, unless
    a letter or number follows in the token, which makes the part ``bad``), and a part closed by a separator waits
    as the pending one until the token shows whether an alphanumeric character follows (then it counts only
    without a tail) or not (then its tail was the token's stripped end). A first version that re-read every token
    ran at 70 MB/s on alpaca_52k's responses (the re-reading 9x the rest of the pass); this one at 120-130 MB/s, about
    text_stats' speed (1 thread)."""
    n_content = n_nonspace = 0
    acc[:] = 0
    in_tok = skip_tok = started = False  # in a token; it starts with '#' / '@'; an alphanumeric seen in it
    pn = pu = pb = ps = pr = pa = 0  # current part: letters, upper-case letters, bigrams, score, rare, alnums
    prev = -1  # the current part's last letter (0..25), -1 for none
    bad = tail = False
    has_q = False  # the pending part (closed by a separator), and its counts and flags
    qn = qu = qb = qs = qr = 0
    q_bad = q_tail = False
    w0 = -1  # start of the current (CJK-split) word
    n_words = 0
    periodic = True  # some period 1..max_unit is still possible: once none is, words are not looked at again
    for p in range(max_unit + 1):
        ok[p] = True
        alpha[p] = False
    ascii = _is_ascii(data, s, e)
    i = s
    while i <= e:
        if i < e:
            if ascii:
                cp, nxt = np.int64(data[i]), i + 1
            else:
                cp, nxt = _decode(data, i, e)
            c = cls[cp]
        else:
            cp, nxt, c = np.int64(10), e + 1, np.uint8(C_SPACE)  # a virtual space closes the last token and word
        space = (c & C_SPACE) != 0
        if i < e:
            if c & (C_LETTER | C_NUMBER | C_SYMBOL):
                n_content += 1
            if not space:
                n_nonspace += 1
        # Latin words (random_letters)
        if space:
            if in_tok and not skip_tok and started:
                if has_q and not q_bad:  # nothing alphanumeric after it: its tail was the token's end
                    _commit_part(acc, qn, qu, qb, qs, qr)
                if not bad:
                    _commit_part(acc, pn, pu, pb, ps, pr)
            in_tok = skip_tok = started = has_q = bad = tail = False
            pn = pu = pb = ps = pr = pa = 0
            prev = -1
        else:
            if not in_tok:
                in_tok = True
                skip_tok = cp == 0x23 or cp == 0x40
            if not skip_tok:
                if c & (C_LETTER | C_NUMBER):
                    started = True
                    if has_q:  # an alphanumeric follows the pending part: it counts if nothing trailed it
                        if not q_bad and not q_tail:
                            _commit_part(acc, qn, qu, qb, qs, qr)
                        has_q = False
                    pa += 1
                    if tail:
                        bad = True
                    if cp < 128 and (c & C_LETTER):
                        x = (cp | 0x20) - 97
                        pn += 1
                        if cp < 97:
                            pu += 1
                        if prev >= 0 and x != prev:
                            sc = scores[prev, x]
                            pb += 1
                            ps += sc
                            if sc <= RARE_BIGRAM_SCORE:
                                pr += 1
                        prev = x
                    else:
                        bad = True
                elif started:
                    if cp == 0x27 or cp == 0x2D or cp == 0x2019:  # a separator closes the part
                        if pa > 0:
                            has_q = True
                            qn, qu, qb, qs, qr, q_bad, q_tail = pn, pu, pb, ps, pr, bad, tail
                        pn = pu = pb = ps = pr = pa = 0
                        prev = -1
                        bad = tail = False
                    else:
                        tail = True
        # words (repeated_words): a space or a CJK character ends the current word; a CJK character is one
        if not periodic:
            i = nxt
            continue
        ends = space or (c & C_CJK) != 0
        spans = 0
        a0 = b0 = a1 = b1 = 0
        if ends:
            if w0 >= 0:
                a0, b0 = w0, i
                spans = 1
                w0 = -1
            if c & C_CJK:
                if spans == 0:
                    a0, b0 = i, nxt
                else:
                    a1, b1 = i, nxt
                spans += 1
        elif w0 < 0:
            w0 = i
        for q in range(spans):
            a = a0 if q == 0 else a1
            b = b0 if q == 0 else b1
            while a < b:  # strip punctuation at both ends
                cp2, nx2 = _decode(data, a, b)
                if (cls[cp2] & C_PUNCT) == 0:
                    break
                a = nx2
            while b > a:
                j = _prev_cp_start(data, a, b)
                cp2, _ = _decode(data, j, b)
                if (cls[cp2] & C_PUNCT) == 0:
                    break
                b = j
            if a == b:
                continue
            h = _fold_hash(data, a, b)
            if n_words < max_unit:  # does the unit made of the first n_words + 1 words hold a letter
                has = False
                k = a
                while k < b:
                    cp2, k = _decode(data, k, b)
                    if cls[cp2] & C_LETTER:
                        has = True
                        break
                alpha[n_words + 1] = alpha[n_words] or has
            left = False
            for p in range(1, max_unit + 1):
                if n_words >= p and ring[(n_words - p) % (max_unit + 1)] != h:
                    ok[p] = False
                left |= ok[p]
            ring[n_words % (max_unit + 1)] = h
            n_words += 1
            periodic = left
        i = nxt
    unit = 0
    for p in range(1, max_unit + 1):
        if ok[p] and n_words >= 2 * p:
            unit = p if alpha[p] else 0
            break
    out[r, 0] = n_content
    out[r, 1] = n_nonspace
    out[r, 2] = acc[0]
    out[r, 3] = acc[1]
    out[r, 4] = acc[2]
    out[r, 5] = acc[3]
    out[r, 6] = unit
    out[r, 7] = n_words if unit > 0 else 0


@njit(parallel=True, cache=True)
def junk_stats_numba(data, offsets, cls, scores, todo, max_unit):
    """(n, len(JUNK_SIGNALS)) int64 per row of a (bytes, offsets) string column; rows where ``todo`` is false read 0.
    One pass over each row's code points, no allocation but a few max_unit-sized scratch arrays per chunk."""
    n = offsets.shape[0] - 1
    out = np.zeros((n, len(JUNK_SIGNALS)), dtype=np.int64)
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    for ch in prange(n_chunks):
        ring = np.zeros(max_unit + 1, dtype=np.uint64)
        ok = np.zeros(max_unit + 1, dtype=np.bool_)
        alpha = np.zeros(max_unit + 1, dtype=np.bool_)
        acc = np.zeros(4, dtype=np.int64)
        for r in range(ch * _CHUNK, min(n, (ch + 1) * _CHUNK)):
            if todo[r]:
                _junk_row(data, offsets[r], offsets[r + 1], cls, scores, max_unit, ring, ok, alpha, acc, out, r)
    return out


def junk_stats(arr, todo: np.ndarray | None = None, max_unit: int = 3) -> dict[str, np.ndarray]:
    """``JUNK_SIGNALS`` (see the section comment) of an Arrow string column (list of str also accepted), as
    {signal: int64 array}. ``todo`` (bool per row) limits the work to those rows; the others read 0. ``max_unit``:
    the longest repeated unit looked for, in words (1..64)."""
    if not isinstance(arr, (pa.Array, pa.ChunkedArray)):
        arr = pa.array(arr, pa.large_string())
    if not 1 <= max_unit <= 64:
        raise ValueError(f"junk_stats(max_unit={max_unit}): use 1..64 words")
    data, offsets = utf8_view(arr)
    if todo is None:
        todo = np.ones(len(offsets) - 1, dtype=np.bool_)
    if len(data) == 0:
        data = np.zeros(1, dtype=np.uint8)
    cls, _ = char_tables()
    out = junk_stats_numba(data, offsets, cls, bigram_scores(), np.ascontiguousarray(todo, dtype=np.bool_),
                           int(max_unit))  # fmt: skip
    return {k: np.ascontiguousarray(out[:, j]) for j, k in enumerate(JUNK_SIGNALS)}
