"""Hashed word unigram + bigram counts of texts, straight from Arrow UTF-8 buffers: the feature space of DSIR
(Xie et al. 2023, "Data Selection for Language Models via Importance Resampling", section 3: "hashed n-gram
features", unigrams and bigrams hashed into 10,000 buckets there; ``engine/select/relevance.py`` uses 2^16).

Definitions (the reference and the Numba kernel follow them exactly; "characters" are Unicode code points):

- **words** are maximal runs of word characters: general category ``L*`` (letters), ``N*`` (digits and other
  numbers) or ``M*`` (combining marks, so that Devanagari or Thai vowel signs do not split a word). Everything else
  (spaces, punctuation, symbols, ``_``) separates words. Every Han or Kana character (``_CJK_WORD_RANGES``, the same
  ranges as ``kernels.text_stats``) is a word on its own: Chinese and Japanese have no spaces, and a character is
  the unit a bag-of-words model of Chinese can count on without a segmenter (its bigrams are then the character
  bigrams that carry most of the signal of a word segmentation).
- **lower case** per character: the first character of ``c.lower()`` (only U+0130 "İ" lowers to two characters,
  "i" + a combining dot: it becomes "i", so "İstanbul" and "istanbul" are one word). Per character, so a final sigma
  is not special-cased.
- **hash of a word**: FNV-1a 64 over its lower-cased code points (not bytes: the kernel folds code points as it
  decodes, without writing a lower-cased copy), finished with murmur3's fmix64 (FNV's low bits alone are weak, and
  the bucket comes from its high bits).
- **n-grams** of a text with words ``w_1..w_m``: the m unigrams ``h(w_i)`` and the m - 1 bigrams
  ``pair(h(w_i), h(w_i+1))`` (``_pair``: multiply-xor, then fmix64), in that interleaved order
  (``w_1, w_2, (w_1 w_2), w_3, (w_2 w_3), ...``). Bigrams join consecutive words across punctuation. A text
  with m >= 1 words has ``2m - 1`` n-grams; an empty one has none.
- **bucket** of an n-gram: ``((hash >> 32) * B) >> 32``, Lemire's multiply-shift range reduction of the hash's
  high 32 bits onto [0, B) (any B >= 1; B < 2^31 so bucket ids fit int32): one multiply instead of a 64-bit
  division, as uniform as ``hash mod B`` (bucket sizes differ by at most one part in 2^32 / B). Measured, it makes no
  difference to the throughput here (the per-character loop dominates), but it costs nothing either.

Kernels (one tokenisation pass per call; no Python object per row):

- ``ngram_hash``: the sparse counts as CSR: ``indptr`` int64 (n + 1), ``ids`` int32 (bucket ids, sorted and
  distinct within a row), ``counts`` int32. Memory: O(total n-grams) for the output.
- ``ngram_totals``: the bucket counts summed over all rows, int64 (B,), accumulated into ``out`` if given (the
  "fit" of a bag-of-n-grams model over a stream of batches in O(B) memory).
- ``ngram_score``: per row ``sum_j logratio[bucket_j] / n_ngrams`` over the row's n-grams (with multiplicity),
  float64 (n,); 0 for a row without n-grams. This is ``sum(count * logratio) / sum(count)`` of the row's CSR row
  without building it: DSIR's log importance weight, divided by the n-gram count so that long texts are not favoured
  just for having more n-grams.

No Triton kernel: tokenising variable-length UTF-8 rows is byte-serial branchy work (kernels/minhash.py makes the
same call). The kernels are serial and nogil, like ``kernels.strings.hash_rows_numba``: a batch takes milliseconds
and the callers parallelise across batches, if at all. Measured on 2 shared cores (load ~4), 50,000 generated
ASCII rows of 80 words (24 MB): ``ngram_score`` and ``ngram_totals`` 170 MB/s (360,000 rows/s; ``hash_rows_numba``
ran at 415 MB/s in the same process), ``ngram_hash`` 30 MB/s (a sort per row), the reference ~530 rows/s.

Sections, in STYLE.md order: the character tables, the reference (plain Python), the Numba kernels, the
dispatchers.
"""

from __future__ import annotations

import functools
import unicodedata
from collections import Counter

import numpy as np
import pyarrow as pa
from numba import njit

from kernels.strings import _fmix64, utf8_view
from kernels.text_stats import _CJK_WORD_RANGES, _decode

DEFAULT_BUCKETS = 1 << 16
_MASK64 = (1 << 64) - 1
_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_PAIR_MUL = 0x9E3779B97F4A7C15
# Word classes of the character table.
SEP, WORD, CJK = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------
# Character tables: a class byte and a lower-case code point per code point (1.1 MB + 4.5 MB), built once per
# process from ``unicodedata`` (about 0.5 s), so the kernel needs no Unicode database of its own.
# ----------------------------------------------------------------------------------------------------------------


def _lower_char(ch: str) -> str:
    return ch.lower()[0]


@functools.cache
def char_tables() -> tuple[np.ndarray, np.ndarray]:
    """(class uint8, lower-case code point int32) per code point, 0x110000 entries each."""
    n = 0x110000
    first = np.frombuffer("".join(unicodedata.category(chr(i))[0] for i in range(n)).encode("ascii"), np.uint8)
    cls = np.zeros(n, dtype=np.uint8)
    cls[(first == ord("L")) | (first == ord("N")) | (first == ord("M"))] = WORD
    for lo, hi in _CJK_WORD_RANGES:
        cls[lo : hi + 1] = CJK
    lower = np.arange(n, dtype=np.int32)
    for cp in np.flatnonzero(cls != SEP):  # the only ones the kernel lowers (Nl has case too: "Ⅻ" -> "ⅻ")
        lower[cp] = ord(chr(cp).lower()[0])
    return cls, lower


# ----------------------------------------------------------------------------------------------------------------
# Reference: plain Python over str, one text at a time (unicodedata and str.lower per character, integer hashing).
# ----------------------------------------------------------------------------------------------------------------


def _cjk_word(cp: int) -> bool:
    return any(lo <= cp <= hi for lo, hi in _CJK_WORD_RANGES)


def words_reference(text: str) -> list[str]:
    """The lower-cased words of ``text`` (module docstring)."""
    words: list[str] = []
    cur: list[str] = []
    for ch in text:
        if _cjk_word(ord(ch)):
            if cur:
                words.append("".join(cur))
                cur = []
            words.append(_lower_char(ch))
        elif unicodedata.category(ch)[0] in "LNM":
            cur.append(_lower_char(ch))
        elif cur:
            words.append("".join(cur))
            cur = []
    if cur:
        words.append("".join(cur))
    return words


def _fmix64_py(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    return h ^ (h >> 33)


def word_hash_reference(word: str) -> int:
    """FNV-1a 64 over the code points, fmix64-finished (the kernel's ``_row_words``)."""
    h = _FNV_OFFSET
    for ch in word:
        h = ((h ^ ord(ch)) * _FNV_PRIME) & _MASK64
    return _fmix64_py(h)


def _pair_py(a: int, b: int) -> int:
    return _fmix64_py(((a * _PAIR_MUL) & _MASK64) ^ b)


def ngrams_reference(text: str, buckets: int = DEFAULT_BUCKETS) -> list[int]:
    """Bucket ids of the text's n-grams, with multiplicity, in the kernel's order (unigram, then the bigram ending
    at that word)."""
    hs = [word_hash_reference(w) for w in words_reference(text or "")]
    out = []
    for i, h in enumerate(hs):
        out.append(((h >> 32) * buckets) >> 32)
        if i:
            out.append(((_pair_py(hs[i - 1], h) >> 32) * buckets) >> 32)
    return out


def ngram_hash_reference(texts, buckets: int = DEFAULT_BUCKETS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(indptr, ids, counts) CSR of the hashed n-gram counts, ids sorted within a row (``None`` reads as "")."""
    indptr, ids, counts = [0], [], []
    for t in _as_list(texts):
        c = Counter(ngrams_reference(t, buckets))
        for b in sorted(c):
            ids.append(b)
            counts.append(c[b])
        indptr.append(len(ids))
    return np.array(indptr, np.int64), np.array(ids, np.int32), np.array(counts, np.int32)


def ngram_totals_reference(texts, buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """int64 (B,) n-gram counts summed over the texts."""
    out = np.zeros(buckets, np.int64)
    for t in _as_list(texts):
        for b in ngrams_reference(t, buckets):
            out[b] += 1
    return out


def ngram_score_reference(texts, logratio: np.ndarray) -> np.ndarray:
    """float64 (n,): mean of ``logratio`` over each text's n-grams (0 for a text without any)."""
    lr = np.asarray(logratio, np.float64)
    rows = _as_list(texts)
    out = np.zeros(len(rows), np.float64)
    for i, t in enumerate(rows):
        grams = ngrams_reference(t, len(lr))
        acc = 0.0
        for b in grams:
            acc += lr[b]
        out[i] = acc / len(grams) if grams else 0.0
    return out


def _as_list(texts) -> list[str]:
    if isinstance(texts, tuple):  # (data, offsets)
        data, offsets = texts
        raw = np.asarray(data, np.uint8).tobytes()
        return [raw[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]
    if isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = texts.to_pylist()
    return ["" if t is None else t for t in texts]


# ----------------------------------------------------------------------------------------------------------------
# Numba kernels
# ----------------------------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _row_words(data, start, end, cls, lower, wh):
    """Writes the word hashes of ``data[start:end]`` into ``wh`` (room for ``end - start``); returns their count."""
    nw = 0
    in_word = False
    h = np.uint64(0)
    i = start
    while i < end:
        b = data[i]
        if b < 0x80:
            cp = np.int64(b)
            i += 1
        else:
            cp, i = _decode(data, i, end)
        c = cls[cp]
        if c == WORD:
            if not in_word:
                h = np.uint64(_FNV_OFFSET)
                in_word = True
            h = (h ^ np.uint64(lower[cp])) * np.uint64(_FNV_PRIME)
            continue
        if in_word:
            wh[nw] = _fmix64(h)
            nw += 1
            in_word = False
        if c == CJK:
            wh[nw] = _fmix64((np.uint64(_FNV_OFFSET) ^ np.uint64(lower[cp])) * np.uint64(_FNV_PRIME))
            nw += 1
    if in_word:
        wh[nw] = _fmix64(h)
        nw += 1
    return nw


@njit(inline="always", cache=True)
def _pair(a, b):
    return _fmix64((a * np.uint64(_PAIR_MUL)) ^ b)


@njit(inline="always", cache=True)
def _bucket(h, B):
    return ((h >> np.uint64(32)) * B) >> np.uint64(32)


@njit(nogil=True, cache=True)
def _max_row_bytes(offsets):
    m = 0
    for r in range(offsets.shape[0] - 1):
        m = max(m, offsets[r + 1] - offsets[r])
    return m


@njit(nogil=True, cache=True)
def ngram_hash_numba(data, offsets, buckets, cls, lower):
    """(indptr int64, ids int32, counts int32): each row's distinct buckets, sorted, and their counts."""
    n = offsets.shape[0] - 1
    B = np.uint64(buckets)
    wh = np.empty(_max_row_bytes(offsets), np.uint64)
    nw = np.zeros(n, np.int64)
    total = 0
    for r in range(n):  # pass 1: words per row bound the output (2 m - 1 n-grams)
        nw[r] = _row_words(data, offsets[r], offsets[r + 1], cls, lower, wh)
        total += max(2 * nw[r] - 1, 0)
    ids = np.empty(total, np.int32)
    counts = np.empty(total, np.int32)
    indptr = np.zeros(n + 1, np.int64)
    grams = np.empty(max(2 * wh.shape[0] - 1, 0), np.int64)
    pos = 0
    for r in range(n):  # pass 2: n-grams of the row, sorted, run-length counted
        m = _row_words(data, offsets[r], offsets[r + 1], cls, lower, wh)
        k = 0
        for j in range(m):
            grams[k] = np.int64(_bucket(wh[j], B))
            k += 1
            if j:
                grams[k] = np.int64(_bucket(_pair(wh[j - 1], wh[j]), B))
                k += 1
        g = np.sort(grams[:k])
        j = 0
        while j < k:
            t = j + 1
            while t < k and g[t] == g[j]:
                t += 1
            ids[pos] = g[j]
            counts[pos] = t - j
            pos += 1
            j = t
        indptr[r + 1] = pos
    return indptr, ids[:pos].copy(), counts[:pos].copy()


@njit(nogil=True, cache=True)
def ngram_totals_numba(data, offsets, cls, lower, out):
    """Adds every row's n-gram bucket counts into ``out`` (int64, (B,))."""
    B = np.uint64(out.shape[0])
    wh = np.empty(_max_row_bytes(offsets), np.uint64)
    for r in range(offsets.shape[0] - 1):
        m = _row_words(data, offsets[r], offsets[r + 1], cls, lower, wh)
        for j in range(m):
            out[_bucket(wh[j], B)] += 1
            if j:
                out[_bucket(_pair(wh[j - 1], wh[j]), B)] += 1
    return out


@njit(nogil=True, cache=True)
def ngram_score_numba(data, offsets, logratio, cls, lower):
    """float64 (n,): mean of ``logratio`` over each row's n-grams, in the reference's order (0 without any)."""
    n = offsets.shape[0] - 1
    B = np.uint64(logratio.shape[0])
    out = np.zeros(n, np.float64)
    wh = np.empty(_max_row_bytes(offsets), np.uint64)
    for r in range(n):
        m = _row_words(data, offsets[r], offsets[r + 1], cls, lower, wh)
        if m == 0:
            continue
        acc = 0.0
        for j in range(m):
            acc += logratio[_bucket(wh[j], B)]
            if j:
                acc += logratio[_bucket(_pair(wh[j - 1], wh[j]), B)]
        out[r] = acc / (2 * m - 1)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Dispatchers
# ----------------------------------------------------------------------------------------------------------------


def texts_view(texts) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 bytes, int64 offsets) of an Arrow string array, a list of str (``None`` reads as "") or an already
    made (bytes, offsets) pair (returned as is)."""
    if isinstance(texts, tuple):
        data, offsets = texts
        return np.asarray(data, np.uint8), np.asarray(offsets, np.int64)
    if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = pa.array(list(texts), pa.large_string())
    return utf8_view(texts)


def _check(device: str, buckets: int) -> None:
    if device not in ("auto", "cpu"):
        raise ValueError(
            f"ngram_hash(device={device!r}): hashing n-grams is byte-serial parsing and runs on the CPU only; "
            "use device='cpu' or 'auto'"
        )
    if not 1 <= int(buckets) < (1 << 31):
        raise ValueError(f"ngram_hash: buckets must be in [1, 2^31), got {buckets}")


def ngram_hash(
    data: np.ndarray, offsets: np.ndarray, buckets: int = DEFAULT_BUCKETS, device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (indptr int64 (n + 1), ids int32, counts int32) of the rows' hashed unigram + bigram counts; row i's
    distinct buckets are ``ids[indptr[i]:indptr[i + 1]]``, sorted. Texts as (uint8 bytes, int64 offsets)
    (``texts_view``)."""
    _check(device, buckets)
    cls, lower = char_tables()
    return ngram_hash_numba(np.asarray(data, np.uint8), np.asarray(offsets, np.int64), int(buckets), cls, lower)


def ngram_totals(
    data: np.ndarray, offsets: np.ndarray, buckets: int = DEFAULT_BUCKETS, out: np.ndarray | None = None,
    device: str = "auto",
) -> np.ndarray:  # fmt: skip
    """int64 (B,) n-gram counts summed over the rows, added into ``out`` when given (then ``buckets`` is
    ``len(out)``)."""
    if out is None:
        out = np.zeros(int(buckets), np.int64)
    elif out.dtype != np.int64 or out.ndim != 1:
        raise ValueError(f"ngram_totals: out must be a 1-D int64 array, got {out.dtype} {out.shape}")
    _check(device, len(out))
    cls, lower = char_tables()
    return ngram_totals_numba(np.asarray(data, np.uint8), np.asarray(offsets, np.int64), cls, lower, out)


def ngram_score(data: np.ndarray, offsets: np.ndarray, logratio: np.ndarray, device: str = "auto") -> np.ndarray:
    """float64 (n,): per row, ``sum(count_b * logratio[b]) / sum(count_b)`` over its hashed n-gram buckets b (B =
    ``len(logratio)``); 0 for a row without a word."""
    lr = np.ascontiguousarray(logratio, np.float64)
    if lr.ndim != 1:
        raise ValueError(f"ngram_score: logratio must be 1-D (B,), got shape {lr.shape}")
    _check(device, len(lr))
    cls, lower = char_tables()
    return ngram_score_numba(np.asarray(data, np.uint8), np.asarray(offsets, np.int64), lr, cls, lower)
