"""MinHash signatures straight from Arrow UTF-8 buffers: normalise, shingle, hash, permute, take minima.

Pipeline per row (one pass, no Python string):
1. **Normalise** the UTF-8 bytes: ASCII letters lower-cased; ASCII punctuation/whitespace/control, Latin-1
   punctuation (U+0080-U+00BF), General Punctuation (U+2000-U+206F), CJK punctuation (U+3000-U+303F) and the
   fullwidth ASCII punctuation of U+FF00-U+FF65 are separators; each run of separators becomes one space, leading
   and trailing ones are dropped. Other non-ASCII characters are kept byte for byte (no case folding: the
   reference does the same, so the two agree on any valid UTF-8).
2. **Shingle**: word ``ngram``-grams (default 5, as in Gopher/datatrove) over the normalised words, except that a
   row falls back to character ``char_ngram``-grams (codepoints, spaces included) when it is CJK (at least
   ``cjk_fraction`` of its non-separator characters are Han/kana/Hangul: there are no spaces to split words on)
   or short (fewer than ``ngram`` words: "Name a fruit." would otherwise have no shingle at all). A row with
   fewer than ``char_ngram`` characters is one shingle; an empty row has none (its signature stays at the
   all-maximum sentinel, like an empty ``datasketch.MinHash``).
   **Short rows** (optional, ``short_words > 0``): a non-CJK row with ``short_min_words <= words < short_words``
   is shingled by word ``short_ngram``-grams instead (default 1: its set of distinct words). Why: one substituted
   word removes up to 5 word 5-grams, so word 5-gram Jaccard after one substitution is ``(n - 9) / (n + 1)``,
   below 0.8 for every row under 49 words, and after two it is ``(n - 14) / (n + 6)`` (0.23 at 20 words); the
   word set of a 10-word row keeps ``8 / 12 = 0.67`` after two substitutions. The kernel reports the path each
   row took (``KIND_*``), since shingles of different paths are never comparable; short rows under ``tiny_words``
   words are reported as ``KIND_TINY`` (same shingles), so that the caller can judge them by a stricter rule.
3. **Hash** each shingle's normalised bytes with ``kernels.strings.hash_span`` (64 bits, seeded). A shingle is a
   contiguous byte span of the normalised text, so its hash is a pure function of its bytes:
   ``shingle_hashfunc()`` gives the same function as a Python callable for datasketch.
4. **Permute** with ``num_perm`` hash functions and keep the minimum per function (see the families below).

Permutation families:
- ``"fast"`` (default): ``h_k(x) = (a_k * x + b_k) mod 2^32`` with ``a_k`` odd (a bijection of 32-bit values, so
  the permutation adds no collisions) over ``x = (h ^ h >> 32) mod 2^32``, the 64-bit shingle hash folded to 32
  bits. Why this one: measured here (Sapphire Rapids, AVX-512), a 32-bit multiply-add-min runs at 0.22 cycles per
  (shingle, permutation) because LLVM packs 16 lanes per instruction, while Dietzfelbinger's 64-bit
  multiply-add-shift ``(a*x + b) mod 2^64 >> 32`` costs 0.64 (64-bit ``vpmullq`` is 3 uops) and the mod 2^61-1
  family ~1; shingling, not permuting, is then the bottleneck. It is the construction datasketch >= 2.0 ships as
  its default ("affine32", chosen there after bias benchmarks, ekzhu/datasketch#212) minus its fmix32 pre-mix:
  ``hash_span`` already ends in an fmix64 avalanche, so a second mix buys nothing. Parameters come from
  ``np.random.default_rng(seed)``. The estimator's accuracy is checked against brute-force Jaccard in
  bench/bench_dedup.py. Signatures are uint32 (512 bytes per row at 128 permutations); a chance collision of two
  shingles on one 32-bit value (2^-32) is negligible next to the estimator's own error (sqrt(J(1-J)/128) = 0.035
  at J = 0.8).
- ``"datasketch"``: datasketch's own schemes, bit for bit, with the permutation parameters drawn exactly as
  ``datasketch.MinHash._init_permutations`` draws them from ``np.random.RandomState(seed)``:
  ``"affine32"`` (datasketch >= 2.0's default: fmix32 pre-mix, ``a*h + b mod 2^32``, uint32),
  ``"affine64"`` (fmix64 pre-mix, ``a*h + b mod 2^64``, uint64) and ``"legacy"`` (datasketch < 2.0: ``(a*h + b)``
  computed in wrapping uint64 as numpy does, then ``mod 2^61-1``, then the low 32 bits, stored as uint64).
  The 32-bit schemes take the low 32 bits of the shingle hash (datasketch requires a 32-bit ``hashfunc``).
  ``minhash(..., family="datasketch", scheme=S)`` equals
  ``datasketch.MinHash(num_perm, seed, hashfunc=shingle_hashfunc(hash_seed, S), scheme=S)`` updated with
  ``shingles_reference(text)``, checked with ``np.array_equal`` in tests/kernels/test_minhash.py.

No Triton kernel: the work is byte-serial parsing of variable-length UTF-8 rows followed by integer minima, a
poor fit for a GPU block layout and already ~100x datasketch on 2 CPU threads (bench/bench_dedup.py).
Sections, in STYLE.md order: the reference (pure Python/numpy), the Numba kernels, the dispatcher ``minhash``;
then shingle hashes for n-gram lookups (contamination, exact verification), band keys and LSH parameters.
"""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
from numba import get_num_threads, njit, prange

from kernels.strings import _fmix64, hash_span, utf8_view

FAMILIES = ("fast", "datasketch")
SCHEMES = ("affine32", "affine64", "legacy")
_MASK64 = (1 << 64) - 1
_MASK32 = (1 << 32) - 1
_MERSENNE = (1 << 61) - 1
# Seed of the shingle hash (kernels.strings.hash_span). Part of the signature's definition: signatures made
# with different hash seeds cannot be compared.
DEFAULT_HASH_SEED = 0x5EED

# Shingle modes (also the per-row mode the kernel picks in "auto").
MODE_AUTO = 0
MODE_WORD = 1  # word n-grams only (rows with fewer words get no shingle): 13-gram contamination lookups
MODE_CHAR = 2  # character n-grams only

# The shingling path a row took in MODE_AUTO (``minhash(..., return_kind=True)``): rows of different kinds share no
# shingle, so the global step bands and verifies each kind apart (engine/stages/dedup.py).
KIND_WORD = 0  # word ``ngram``-grams
KIND_SHORT = 1  # word ``short_ngram``-grams of a short row (tiny_words <= words < short_words)
KIND_CHAR = 2  # character ``char_ngram``-grams (CJK rows, rows with fewer than ``ngram`` words)
KIND_EMPTY = 3  # no shingle at all (empty after normalisation)
KIND_TINY = 4  # shingled as KIND_SHORT, but short_min_words <= words < tiny_words (a stricter pair rule applies)


# ----------------------------------------------------------------------------------------------------------------
# Permutation parameters
# ----------------------------------------------------------------------------------------------------------------


def permutations(num_perm: int = 128, seed: int = 1, family: str = "fast", scheme: str = "affine32"):
    """(a, b) parameter arrays of the permutation family, and the signature dtype.

    ``datasketch``: drawn exactly as ``datasketch.MinHash._init_permutations`` (RandomState(seed); legacy:
    ``randint(1, p)`` then ``randint(0, p)`` per permutation; affine: ``randint(0, 2^(w-1), n) * 2 + 1`` then
    ``randint(0, 2^w, n)``). ``fast``: a odd, b any, both uint32 from ``np.random.default_rng(seed)``.
    """
    if num_perm < 1:
        raise ValueError(f"num_perm must be >= 1, got {num_perm}")
    if family == "fast":
        rng = np.random.default_rng(seed)
        a = rng.integers(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
        b = rng.integers(0, 1 << 32, num_perm, dtype=np.uint32)
        return a, b, np.uint32
    if family != "datasketch":
        raise ValueError(f"minhash family must be one of {FAMILIES}, got {family!r}")
    gen = np.random.RandomState(seed)
    if scheme == "legacy":
        p = np.uint64(_MERSENNE)
        ab = np.array(
            [(gen.randint(1, p, dtype=np.uint64), gen.randint(0, p, dtype=np.uint64)) for _ in range(num_perm)],
            dtype=np.uint64,
        ).T
        return np.ascontiguousarray(ab[0]), np.ascontiguousarray(ab[1]), np.uint64
    if scheme == "affine32":
        dt = np.uint32
        a = gen.randint(0, 1 << 31, num_perm, dtype=dt) * dt(2) + dt(1)
        b = gen.randint(0, 1 << 32, num_perm, dtype=dt)
        return a, b, np.uint32
    if scheme == "affine64":
        dt = np.uint64
        a = gen.randint(0, 1 << 63, num_perm, dtype=dt) * dt(2) + dt(1)
        b = gen.randint(0, 1 << 64, num_perm, dtype=dt)
        return a, b, np.uint64
    raise ValueError(f"datasketch scheme must be one of {SCHEMES}, got {scheme!r}")


def _family_code(family: str, scheme: str) -> int:
    if family == "fast":
        return 0
    return {"affine32": 1, "affine64": 2, "legacy": 3}[scheme]


def empty_value(family: str = "fast", scheme: str = "affine32") -> int:
    """The signature value of an empty shingle set (datasketch's initial ``hashvalues``)."""
    if family == "fast" or scheme in ("affine32", "legacy"):
        return _MASK32
    return _MASK64


# ----------------------------------------------------------------------------------------------------------------
# Reference (pure Python over str; an independent formulation of the kernel's byte-level rules)
# ----------------------------------------------------------------------------------------------------------------

_SEP_RE = re.compile(
    "[\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\xbf\u2000-\u206f\u3000-\u303f\uff00-\uff0f\uff1a-\uff20\uff3b-\uff40\uff5b-\uff65]+"
)
_CJK_RE = re.compile("[\u2e80-\u2fff\u3040-\u9fff\uac00-\ud7af\uf900-\ufaff\U00020000-\U0002ffff]")
_LOWER = str.maketrans({chr(c): chr(c + 32) for c in range(65, 91)})


def normalize_reference(text: str) -> str:
    """ASCII lower-case, separator runs -> one space, stripped (see the module docstring)."""
    return _SEP_RE.sub(" ", text.translate(_LOWER)).strip(" ")


def shingle_kind_reference(
    text: str,
    ngram: int = 5,
    cjk_fraction: float = 0.3,
    short_words: int = 0,
    short_min_words: int = 10,
    tiny_words: int = 0,
) -> int:
    """The ``KIND_*`` path MODE_AUTO takes for one text (see the module docstring)."""
    norm = normalize_reference(text)
    if not norm:
        return KIND_EMPTY
    nw = len(norm.split(" "))
    n_chars = len(norm) - norm.count(" ")
    n_cjk = len(_CJK_RE.findall(norm))
    if n_cjk > 0 and n_cjk >= cjk_fraction * n_chars:
        return KIND_CHAR
    if short_words > 0 and short_min_words <= nw < short_words:
        return KIND_TINY if nw < tiny_words else KIND_SHORT
    return KIND_CHAR if nw < ngram else KIND_WORD


def shingles_reference(
    text: str,
    ngram: int = 5,
    char_ngram: int = 5,
    cjk_fraction: float = 0.3,
    mode: int = MODE_AUTO,
    short_words: int = 0,
    short_min_words: int = 10,
    short_ngram: int = 1,
    tiny_words: int = 0,
) -> list[bytes]:
    """The shingles of one text as normalised UTF-8 byte strings (duplicates kept, in text order)."""
    norm = normalize_reference(text)
    if not norm:
        return []
    words = norm.split(" ")
    if mode == MODE_AUTO:
        kind = shingle_kind_reference(text, ngram, cjk_fraction, short_words, short_min_words, tiny_words)
    else:
        kind = KIND_CHAR if mode == MODE_CHAR else KIND_WORD
    if kind == KIND_CHAR:
        if len(norm) <= char_ngram:
            return [norm.encode()]
        return [norm[i : i + char_ngram].encode() for i in range(len(norm) - char_ngram + 1)]
    g = short_ngram if kind in (KIND_SHORT, KIND_TINY) else ngram
    return [" ".join(words[i : i + g]).encode() for i in range(len(words) - g + 1)]


_P1 = 0x9E3779B97F4A7C15
_P2 = 0xBF58476D1CE4E5B9
_P3 = 0x94D049BB133111EB


def _fmix64_py(h: int) -> int:
    h ^= h >> 33
    h = (h * 0xFF51AFD7ED558CCD) & _MASK64
    h ^= h >> 33
    h = (h * 0xC4CEB9FE1A85EC53) & _MASK64
    return h ^ (h >> 33)


def hash_bytes_reference(b: bytes, seed: int = DEFAULT_HASH_SEED) -> int:
    """Python port of ``kernels.strings.hash_span`` (bit-exact; tested)."""
    n = len(b)
    h = ((seed + _P1) & _MASK64) ^ ((n * _P2) & _MASK64)
    i = 0
    while i + 8 <= n:
        w = int.from_bytes(b[i : i + 8], "little")
        h = ((h ^ _fmix64_py((w * _P2) & _MASK64)) * _P3) & _MASK64
        h = ((h << 27) | (h >> 37)) & _MASK64
        i += 8
    w = int.from_bytes(b[i:], "little")
    h = ((h ^ _fmix64_py((w * _P2 + (n - i)) & _MASK64)) * _P3) & _MASK64
    return _fmix64_py(h)


def _rotl_py(h: int, r: int) -> int:
    return ((h << r) | (h >> (64 - r))) & _MASK64


def hash_shingle_reference(b: bytes, seed: int = DEFAULT_HASH_SEED) -> int:
    """The 64-bit hash of one shingle: its space-separated tokens hashed with ``hash_bytes_reference`` and chained
    (``h = (rotl(h, 23) ^ t) * P3``, then fmix64 of ``h ^ n_tokens``). Chaining per-token hashes lets the kernel hash
    each word once and build a 5-word shingle from 5 word hashes instead of re-reading ~30 bytes per shingle."""
    h = _P1
    toks = b.split(b" ")
    for t in toks:
        h = ((_rotl_py(h, 23) ^ hash_bytes_reference(t, seed)) * _P3) & _MASK64
    return _fmix64_py(h ^ len(toks))


def shingle_hashfunc(hash_seed: int = DEFAULT_HASH_SEED, scheme: str = "affine64"):
    """The shingle hash as a datasketch ``hashfunc`` (bytes -> int): 64 bits for "affine64", the low 32 bits for
    the 32-bit schemes ("affine32", "legacy") and for ``family="fast"`` the full 64 bits are used."""
    if scheme in ("affine32", "legacy"):
        return lambda b: hash_shingle_reference(b, hash_seed) & _MASK32
    return lambda b: hash_shingle_reference(b, hash_seed)


def _fmix32_py(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def minhash_reference(
    texts: list[str],
    num_perm: int = 128,
    seed: int = 1,
    family: str = "fast",
    scheme: str = "affine32",
    ngram: int = 5,
    char_ngram: int = 5,
    cjk_fraction: float = 0.3,
    hash_seed: int = DEFAULT_HASH_SEED,
    short_words: int = 0,
    short_min_words: int = 10,
    short_ngram: int = 1,
    tiny_words: int = 0,
) -> np.ndarray:
    """(n, num_perm) signatures with Python integers (slow; the oracle for the Numba kernel)."""
    a, b, dtype = permutations(num_perm, seed, family, scheme)
    a = [int(x) for x in a]
    b = [int(x) for x in b]
    out = np.full((len(texts), num_perm), empty_value(family, scheme), dtype=dtype)
    for i, t in enumerate(texts):
        for sh in shingles_reference(
            t, ngram, char_ngram, cjk_fraction, MODE_AUTO, short_words, short_min_words, short_ngram, tiny_words
        ):
            h = hash_shingle_reference(sh, hash_seed)
            if family == "fast":
                x = (h ^ (h >> 32)) & _MASK32
                vals = [(ak * x + bk) & _MASK32 for ak, bk in zip(a, b)]
            elif scheme == "affine32":
                x = _fmix32_py(h & _MASK32)
                vals = [(ak * x + bk) & _MASK32 for ak, bk in zip(a, b)]
            elif scheme == "affine64":
                x = _fmix64_py(h)
                vals = [(ak * x + bk) & _MASK64 for ak, bk in zip(a, b)]
            else:  # legacy: numpy's wrapping uint64 product, then mod the Mersenne prime, then 32 bits
                x = h & _MASK32
                vals = [(((ak * x + bk) & _MASK64) % _MERSENNE) & _MASK32 for ak, bk in zip(a, b)]
            out[i] = np.minimum(out[i], np.array(vals, dtype=dtype))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Numba kernels
# ----------------------------------------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _is_sep(cp):
    if cp < 128:
        return not ((48 <= cp <= 57) or (65 <= cp <= 90) or (97 <= cp <= 122))
    return (
        cp <= 0xBF
        or (0x2000 <= cp <= 0x206F)
        or (0x3000 <= cp <= 0x303F)
        or (0xFF00 <= cp <= 0xFF0F)
        or (0xFF1A <= cp <= 0xFF20)
        or (0xFF3B <= cp <= 0xFF40)
        or (0xFF5B <= cp <= 0xFF65)
    )


@njit(inline="always", cache=True)
def _is_cjk(cp):
    return (
        (0x2E80 <= cp <= 0x2FFF)
        or (0x3040 <= cp <= 0x9FFF)
        or (0xAC00 <= cp <= 0xD7AF)
        or (0xF900 <= cp <= 0xFAFF)
        or (0x20000 <= cp <= 0x2FFFF)
    )


# ASCII byte -> its normalised byte (lower-cased letters, digits), or 0 for a separator. A module-level array is
# frozen into the compiled kernel as a constant; one table load replaces five range tests per byte.
_ASCII_MAP = np.zeros(128, np.uint8)
for _c in range(128):
    if 48 <= _c <= 57 or 97 <= _c <= 122:
        _ASCII_MAP[_c] = _c
    elif 65 <= _c <= 90:
        _ASCII_MAP[_c] = _c + 32
del _c


@njit(cache=True)
def _normalize_row(data, start, end, norm, ws, we):
    """Normalise data[start:end] into ``norm``; fill word spans ``ws``/``we`` (positions in ``norm``).

    Returns (n_bytes, n_words, n_non_separator_chars, n_cjk). Words are maximal runs of non-separator characters;
    one space goes before every word but the first. Invalid UTF-8 bytes count as one character each (a stray
    continuation byte 0x80-0xBF is then a separator), so the kernel never reads past the row and ``norm`` is
    always valid enough for ``_codepoint_starts``. Measured ~5 cycles per ASCII byte (was 14.5 with per-byte range
    tests and a codepoint array).
    """
    nb = 0
    nw = 0
    nch = 0
    ncjk = 0
    in_word = False
    i = start
    while i < end:
        c = data[i]
        if c < 128:
            t = _ASCII_MAP[c]
            if t == 0:
                if in_word:
                    we[nw - 1] = nb
                    in_word = False
            else:
                if not in_word:
                    if nw > 0:
                        norm[nb] = 32
                        nb += 1
                    ws[nw] = nb
                    nw += 1
                    in_word = True
                norm[nb] = t
                nb += 1
                nch += 1
            i += 1
            continue
        ci = np.int64(c)
        ln = 1
        cp = ci
        if ci >= 0xF0:
            ln = 4
            cp = ci & 0x07
        elif ci >= 0xE0:
            ln = 3
            cp = ci & 0x0F
        elif ci >= 0xC0:
            ln = 2
            cp = ci & 0x1F
        if ln > 1:
            if i + ln > end:
                ln = 1
                cp = ci
            else:
                for k in range(1, ln):
                    cc = np.int64(data[i + k])
                    if (cc & 0xC0) != 0x80:
                        ln = 1
                        cp = ci
                        break
                    cp = (cp << 6) | (cc & 0x3F)
        if _is_sep(cp):
            if in_word:
                we[nw - 1] = nb
                in_word = False
        else:
            if not in_word:
                if nw > 0:
                    norm[nb] = 32
                    nb += 1
                ws[nw] = nb
                nw += 1
                in_word = True
            nch += 1
            if _is_cjk(cp):
                ncjk += 1
            for k in range(ln):
                norm[nb] = data[i + k]
                nb += 1
        i += ln
    if in_word:
        we[nw - 1] = nb
    return nb, nw, nch, ncjk


@njit(cache=True)
def _codepoint_starts(norm, nb, cps):
    """Positions in ``norm[:nb]`` where a character starts (any byte that is not a UTF-8 continuation byte)."""
    n = 0
    for p in range(nb):
        if (norm[p] & 0xC0) != 0x80:
            cps[n] = p
            n += 1
    return n


@njit(inline="always", cache=True)
def _chain(h, t):
    h = (h << np.uint64(23)) | (h >> np.uint64(41))
    return (h ^ t) * np.uint64(0x94D049BB133111EB)


@njit(cache=True)
def _span_shingle_hash(norm, s, e, hseed):
    """hash_shingle_reference of norm[s:e]: split on spaces, hash each token, chain."""
    h = np.uint64(0x9E3779B97F4A7C15)
    nt = 0
    t0 = s
    for p in range(s, e):
        if norm[p] == 32:
            h = _chain(h, hash_span(norm, t0, p, hseed))
            nt += 1
            t0 = p + 1
    h = _chain(h, hash_span(norm, t0, e, hseed))
    nt += 1
    return _fmix64(h ^ np.uint64(nt))


# The shingle rule as one int64 array (keeps the kernels' argument lists short): word n, char n, short rows.
R_NGRAM, R_CHAR_NGRAM, R_SHORT_WORDS, R_SHORT_MIN_WORDS, R_SHORT_NGRAM, R_TINY_WORDS = 0, 1, 2, 3, 4, 5


def shingle_rule(
    ngram: int = 5,
    char_ngram: int = 5,
    short_words: int = 0,
    short_min_words: int = 10,
    short_ngram: int = 1,
    tiny_words: int = 0,
) -> np.ndarray:
    if ngram < 1 or char_ngram < 1 or short_ngram < 1:
        raise ValueError(f"ngram, char_ngram and short_ngram must be >= 1, got {ngram}, {char_ngram}, {short_ngram}")
    if short_words < 0 or short_min_words < short_ngram:
        raise ValueError(
            f"short_words must be >= 0 and short_min_words >= short_ngram, got {short_words}, "
            f"{short_min_words}, {short_ngram}"
        )
    return np.array([ngram, char_ngram, short_words, short_min_words, short_ngram, tiny_words], np.int64)


@njit(cache=True)
def _row_shingle_hashes(data, start, end, norm, cps, ws, we, hs, rule, cjk_fraction, mode, hseed):
    """Shingle hashes of one row into ``hs``; returns (how many, KIND_* path taken)."""
    nb, nw, n_chars, ncjk = _normalize_row(data, start, end, norm, ws, we)
    if nb == 0:
        return 0, KIND_EMPTY
    ngram = rule[R_NGRAM]
    char_ngram = rule[R_CHAR_NGRAM]
    kind = KIND_CHAR if mode == MODE_CHAR else KIND_WORD
    if mode == MODE_AUTO:
        if ncjk > 0 and ncjk >= cjk_fraction * n_chars:
            kind = KIND_CHAR
        elif rule[R_SHORT_WORDS] > 0 and rule[R_SHORT_MIN_WORDS] <= nw < rule[R_SHORT_WORDS]:
            kind = KIND_TINY if nw < rule[R_TINY_WORDS] else KIND_SHORT
            ngram = rule[R_SHORT_NGRAM]
        elif nw < ngram:
            kind = KIND_CHAR
    nh = 0
    if kind == KIND_CHAR:
        ncp = _codepoint_starts(norm, nb, cps)
        if ncp <= char_ngram:
            hs[0] = _span_shingle_hash(norm, 0, nb, hseed)
            return 1, kind
        for i in range(ncp - char_ngram + 1):
            j = i + char_ngram
            e = cps[j] if j < ncp else nb
            hs[nh] = _span_shingle_hash(norm, cps[i], e, hseed)
            nh += 1
        return nh, kind
    if nw < ngram:
        return 0, kind
    # Word hashes once into the tail of hs (nw <= nb/2 + 1 words, hs has nb + 2 slots, shingles fill the front
    # and shingle i only overwrites slot i < nw - ngram + 1 after word i is consumed).
    base = hs.shape[0] - nw
    for w in range(nw):
        hs[base + w] = hash_span(norm, ws[w], we[w], hseed)
    seed_h = np.uint64(0x9E3779B97F4A7C15)
    fin = np.uint64(ngram)
    for i in range(nw - ngram + 1):
        h = seed_h
        for k in range(ngram):
            h = _chain(h, hs[base + i + k])
        hs[nh] = _fmix64(h ^ fin)
        nh += 1
    return nh, kind


@njit(cache=True)
def _apply_fast(hs, nh, a, b, acc):
    # Written as 64-bit arithmetic masked to 32 bits (Numba widens uint32 products); LLVM narrows it back to
    # 16-lane 32-bit multiplies, and min() instead of a branch keeps the loop vectorised: 0.22 cycles per value.
    m32 = np.uint64(0xFFFFFFFF)
    P = acc.shape[0]
    for j in range(nh):
        x = (hs[j] ^ (hs[j] >> np.uint64(32))) & m32
        for k in range(P):
            acc[k] = min(acc[k], (np.uint64(a[k]) * x + np.uint64(b[k])) & m32)


@njit(cache=True)
def _apply_affine32(hs, nh, a, b, acc):
    m32 = np.uint64(0xFFFFFFFF)
    P = acc.shape[0]
    for j in range(nh):
        x = hs[j] & m32
        x ^= x >> np.uint64(16)
        x = (x * np.uint64(0x85EBCA6B)) & m32
        x ^= x >> np.uint64(13)
        x = (x * np.uint64(0xC2B2AE35)) & m32
        x ^= x >> np.uint64(16)
        for k in range(P):
            acc[k] = min(acc[k], (np.uint64(a[k]) * x + np.uint64(b[k])) & m32)


@njit(cache=True)
def _apply_affine64(hs, nh, a, b, acc):
    P = acc.shape[0]
    for j in range(nh):
        x = _fmix64(hs[j])
        for k in range(P):
            acc[k] = min(acc[k], a[k] * x + b[k])


@njit(cache=True)
def _apply_legacy(hs, nh, a, b, acc):
    # x mod (2^61 - 1) for any 64-bit x: (x & p) + (x >> 61) <= p + 7, so one conditional subtraction finishes it
    # (Mersenne reduction; a hardware 64-bit divide per value would cost ~25 cycles).
    p = np.uint64(0x1FFFFFFFFFFFFFFF)
    P = acc.shape[0]
    for j in range(nh):
        x = hs[j] & np.uint64(0xFFFFFFFF)
        for k in range(P):
            y = a[k] * x + b[k]
            r = (y & p) + (y >> np.uint64(61))
            if r >= p:
                r -= p
            acc[k] = min(acc[k], r & np.uint64(0xFFFFFFFF))


@njit(cache=True)
def _max_row_bytes(offsets, lo, hi):
    m = 0
    for i in range(lo, hi):
        d = offsets[i + 1] - offsets[i]
        m = max(m, d)
    return m


@njit(cache=True)
def _shingle_scratch(m):
    """One thread's buffers for _row_shingle_hashes on rows of at most m - 2 bytes: normalised bytes, code points,
    word starts and ends, shingle hashes."""
    return (
        np.empty(m, np.uint8),
        np.empty(m, np.int64),
        np.empty(m, np.int64),
        np.empty(m, np.int64),
        np.empty(m, np.uint64),
    )


@njit(parallel=True, cache=True)
def minhash_numba(data, offsets, a, b, out, kinds, code, rule, cjk_fraction, hseed, empty, sets, set_cnt):
    """Fill ``out`` (n, num_perm) with signatures and ``kinds`` (n,) with each row's KIND_* shingling path; rows in
    chunks over threads, scratch buffers per chunk.

    When ``sets`` is non-empty (uint32, one slot per input byte), also write each row's sorted distinct 32-bit
    shingle hashes at ``sets[offsets[i]:]`` and their number in ``set_cnt[i]``: a row never has more shingles than
    bytes (the normalised text is never longer than the raw one), so the byte offsets bound every slot and the
    sets come out of the same pass as the signature."""
    n = offsets.shape[0] - 1
    P = out.shape[1]
    n_chunks = min(n, 256)
    for c in prange(n_chunks):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        norm, cps, ws, we, hs = _shingle_scratch(_max_row_bytes(offsets, lo, hi) + 2)
        acc = np.empty(P, out.dtype)
        for i in range(lo, hi):
            nh, kind = _row_shingle_hashes(
                data, offsets[i], offsets[i + 1], norm, cps, ws, we, hs, rule, cjk_fraction, MODE_AUTO, hseed
            )
            kinds[i] = kind
            acc[:] = empty
            if code == 0:
                _apply_fast(hs, nh, a, b, acc)
            elif code == 1:
                _apply_affine32(hs, nh, a, b, acc)
            elif code == 2:
                _apply_affine64(hs, nh, a, b, acc)
            else:
                _apply_legacy(hs, nh, a, b, acc)
            for k in range(P):
                out[i, k] = acc[k]
            if sets.shape[0] > 0:
                srt = np.sort(hs[:nh] & np.uint64(0xFFFFFFFF))
                base = offsets[i]
                u = 0
                for j in range(nh):
                    if j == 0 or srt[j] != srt[j - 1]:
                        sets[base + u] = np.uint32(srt[j])
                        u += 1
                set_cnt[i] = u


@njit(cache=True)
def _gather_sets(sets, offsets, cnt, new_off):
    out = np.empty(new_off[-1], np.uint32)
    for i in range(cnt.shape[0]):
        s = offsets[i]
        d = new_off[i]
        for k in range(cnt[i]):
            out[d + k] = sets[s + k]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Dispatcher
# ----------------------------------------------------------------------------------------------------------------


def _check_device(device: str) -> None:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda":
        raise RuntimeError(
            "minhash has no GPU path (it is byte-serial parsing; the Numba CPU kernel is used): "
            "pass device='cpu' or 'auto'"
        )


def minhash(
    texts: pa.Array | pa.ChunkedArray,
    num_perm: int = 128,
    seed: int = 1,
    family: str = "fast",
    scheme: str = "affine32",
    ngram: int = 5,
    char_ngram: int = 5,
    cjk_fraction: float = 0.3,
    hash_seed: int = DEFAULT_HASH_SEED,
    device: str = "auto",
    perms: tuple | None = None,
    return_sets: bool = False,
    short_words: int = 0,
    short_min_words: int = 10,
    short_ngram: int = 1,
    tiny_words: int = 0,
    return_kind: bool = False,
):
    """(n, num_perm) MinHash signatures of an Arrow string column (uint32 for fast/affine32, else uint64).

    ``perms`` lets a caller pass ``permutations(...)`` computed once (the legacy draw loops in Python).
    ``return_sets=True`` returns ``(sig, (sets, set_offsets))`` with each row's sorted distinct 32-bit shingle
    hashes from the same pass (equal to ``shingle_hashes(..., unique=True, bits=32)``), for exact Jaccard.
    ``short_words`` > 0 turns on the short-row path (module docstring); ``return_kind=True`` appends the (n,) uint8
    ``KIND_*`` array of the path each row took to what is returned.
    """
    _check_device(device)
    rule = shingle_rule(ngram, char_ngram, short_words, short_min_words, short_ngram, tiny_words)
    data, offsets = utf8_view(texts)
    a, b, dtype = perms if perms is not None else permutations(num_perm, seed, family, scheme)
    n = len(offsets) - 1
    out = np.empty((n, len(a)), dtype=dtype)
    sets = np.empty(int(offsets[-1]) if return_sets else 0, np.uint32)
    cnt = np.zeros(n if return_sets else 0, np.int64)
    kinds = np.full(n, KIND_EMPTY, np.uint8)
    if n:
        minhash_numba(
            data,
            offsets,
            a,
            b,
            out,
            kinds,
            _family_code(family, scheme),
            rule,
            float(cjk_fraction),
            np.uint64(hash_seed),
            dtype(empty_value(family, scheme)),
            sets,
            cnt,
        )
    res = (out,)
    if return_sets:
        new_off = np.zeros(n + 1, np.int64)
        np.cumsum(cnt, out=new_off[1:])
        res += ((_gather_sets(sets, offsets, cnt, new_off), new_off),)
    if return_kind:
        res += (kinds,)
    return res[0] if len(res) == 1 else res


def shingle_sets(texts: pa.Array | pa.ChunkedArray, **shingle_kw) -> tuple[np.ndarray, np.ndarray]:
    """Each row's sorted distinct 32-bit shingle hashes (uint32 values, int64 offsets), equal to
    ``shingle_hashes(texts, unique=True, bits=32, **shingle_kw)`` but from one pass over the text (the signature
    kernel with a single permutation): 1.6x faster, since ``shingle_hashes`` normalises every row twice (count,
    then fill) and sorts the 32-bit values in a third pass."""
    _sig, sets = minhash(texts, num_perm=1, return_sets=True, **shingle_kw)
    return sets


# ----------------------------------------------------------------------------------------------------------------
# Shingle hashes as a ragged array (13-gram contamination lookups, exact Jaccard verification)
# ----------------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _count_shingles_numba(data, offsets, rule, cjk_fraction, mode, hseed, counts):
    n = offsets.shape[0] - 1
    n_chunks = min(n, 256)
    for c in prange(n_chunks):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        norm, cps, ws, we, hs = _shingle_scratch(_max_row_bytes(offsets, lo, hi) + 2)
        for i in range(lo, hi):
            counts[i] = _row_shingle_hashes(
                data, offsets[i], offsets[i + 1], norm, cps, ws, we, hs, rule, cjk_fraction, mode, hseed
            )[0]


@njit(parallel=True, cache=True)
def _fill_shingles_numba(data, offsets, rule, cjk_fraction, mode, hseed, out_off, out, dedup):
    n = offsets.shape[0] - 1
    n_chunks = min(n, 256)
    for c in prange(n_chunks):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        norm, cps, ws, we, hs = _shingle_scratch(_max_row_bytes(offsets, lo, hi) + 2)
        for i in range(lo, hi):
            nh = _row_shingle_hashes(
                data, offsets[i], offsets[i + 1], norm, cps, ws, we, hs, rule, cjk_fraction, mode, hseed
            )[0]
            s = out_off[i]
            if dedup:
                srt = np.sort(hs[:nh])
                k = 0
                for j in range(nh):
                    if j == 0 or srt[j] != srt[j - 1]:
                        out[s + k] = srt[j]
                        k += 1
                # Pad the unused tail of the row's slot (trimmed by the caller) with the row's largest value. No
                # "x if nh else 0" here: Numba unifies uint64 with an int literal to float64, and the rounded value
                # counted as one more distinct shingle (a row with a repeated shingle had one too many).
                for j in range(k, nh):
                    out[s + j] = srt[nh - 1]
            else:
                for j in range(nh):
                    out[s + j] = hs[j]


@njit(parallel=True, cache=True)
def _sort_rows(vals, off):
    for i in prange(off.shape[0] - 1):
        vals[off[i] : off[i + 1]] = np.sort(vals[off[i] : off[i + 1]])


@njit(cache=True)
def _unique_counts(vals, off):
    n = off.shape[0] - 1
    cnt = np.zeros(n, np.int64)
    for i in range(n):
        k = 0
        for j in range(off[i], off[i + 1]):
            if j == off[i] or vals[j] != vals[j - 1]:
                k += 1
        cnt[i] = k
    return cnt


@njit(cache=True)
def _compact(vals, off, new_off):
    out = np.empty(new_off[-1], vals.dtype)
    n = off.shape[0] - 1
    for i in range(n):
        k = new_off[i]
        for j in range(off[i], off[i + 1]):
            if j == off[i] or vals[j] != vals[j - 1]:
                out[k] = vals[j]
                k += 1
    return out


def shingle_hashes(
    texts: pa.Array | pa.ChunkedArray,
    ngram: int = 5,
    char_ngram: int = 5,
    cjk_fraction: float = 0.3,
    mode: str = "auto",
    hash_seed: int = DEFAULT_HASH_SEED,
    unique: bool = False,
    bits: int = 64,
    short_words: int = 0,
    short_min_words: int = 10,
    short_ngram: int = 1,
    tiny_words: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged (uint64 hashes, int64 offsets): row i's shingle hashes are ``hashes[offsets[i]:offsets[i+1]]``.

    ``mode``: "auto" (as the signatures, short-row path included when ``short_words`` > 0), "word" (word n-grams
    only; a row with fewer than ``ngram`` words has none) or "char". ``unique=True`` sorts each row's hashes and drops repeats (a set, for exact Jaccard). ``bits=32``
    returns the low 32 bits as uint32 (with ``unique``: the set of those), half the bytes; two rows of ~165
    shingles then share a value by chance with probability ~165^2 / 2^32 = 6e-6, negligible for Jaccard.
    """
    if bits == 32:
        v, off = shingle_hashes(
            texts,
            ngram,
            char_ngram,
            cjk_fraction,
            mode,
            hash_seed,
            False,
            64,
            short_words,
            short_min_words,
            short_ngram,
            tiny_words,
        )
        v32 = (v & np.uint64(_MASK32)).astype(np.uint32)
        if not unique:
            return v32, off
        _sort_rows(v32, off)
        ucnt = _unique_counts(v32, off)
        new_off = np.zeros(len(off), np.int64)
        np.cumsum(ucnt, out=new_off[1:])
        return _compact(v32, off, new_off), new_off
    if bits != 64:
        raise ValueError(f"bits must be 32 or 64, got {bits}")
    code = {"auto": MODE_AUTO, "word": MODE_WORD, "char": MODE_CHAR}[mode]
    data, offsets = utf8_view(texts)
    n = len(offsets) - 1
    counts = np.zeros(n, np.int64)
    if n == 0:
        return np.zeros(0, np.uint64), np.zeros(1, np.int64)
    rule = shingle_rule(ngram, char_ngram, short_words, short_min_words, short_ngram, tiny_words)
    args = (data, offsets, rule, float(cjk_fraction), code, np.uint64(hash_seed))
    _count_shingles_numba(*args, counts)
    off = np.zeros(n + 1, np.int64)
    np.cumsum(counts, out=off[1:])
    out = np.empty(off[-1], np.uint64)
    _fill_shingles_numba(*args, off, out, unique)
    if unique:
        ucnt = _unique_counts(out, off)
        new_off = np.zeros(n + 1, np.int64)
        np.cumsum(ucnt, out=new_off[1:])
        out = _compact(out, off, new_off)
        off = new_off
    return out, off


# ----------------------------------------------------------------------------------------------------------------
# LSH banding
# ----------------------------------------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def band_keys_numba(sig, rows, num_bands, rows_per_band):
    """(len(rows), num_bands) uint64: for signature rows ``sig[rows]``, a 64-bit hash of each band's
    ``rows_per_band`` signature values and its band index (so equal values in different bands never share a key).
    Two rows share a key in band j iff their values agree on the whole band, up to 64-bit collisions (n^2 / 2^65 per
    band: 3e-8 at 1M rows)."""
    # One multiply-rotate per value and one fmix64 per band (was an fmix64 per value: 1.5 s -> ~0.3 s at 1M rows).
    n = rows.shape[0]
    out = np.empty((n, num_bands), np.uint64)
    for t in prange(n):
        i = rows[t]
        for j in range(num_bands):
            h = np.uint64(j) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(rows_per_band)
            for k in range(j * rows_per_band, (j + 1) * rows_per_band):
                h = _chain(h, np.uint64(sig[i, k]) * np.uint64(0xBF58476D1CE4E5B9))
            out[t, j] = _fmix64(h)
    return out


def band_keys(sig: np.ndarray, num_bands: int, rows_per_band: int, rows: np.ndarray | None = None) -> np.ndarray:
    """Band keys of every row of ``sig``, or of ``sig[rows]`` without copying the signatures."""
    if num_bands * rows_per_band > sig.shape[1]:
        raise ValueError(f"num_bands * rows_per_band = {num_bands * rows_per_band} > num_perm = {sig.shape[1]}")
    rows = np.arange(sig.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
    return band_keys_numba(np.ascontiguousarray(sig), rows, num_bands, rows_per_band)


def candidate_probability(s: float | np.ndarray, num_bands: int, rows_per_band: int):
    """P(two rows with Jaccard s share at least one band) = 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** rows_per_band) ** num_bands


def lsh_params(
    threshold: float, num_perm: int, false_positive_weight: float = 0.05, false_negative_weight: float = 0.95
) -> tuple[int, int]:
    """(num_bands, rows_per_band) minimising ``w_fp * integral_0^t P(s) ds + w_fn * integral_t^1 (1 - P(s)) ds``
    over b * r <= num_perm (datasketch's ``_optimal_param``, integrated on a 2001-point grid instead of quad).

    The default weights differ from datasketch's 0.5/0.5 on purpose: here a band match is only a *candidate*,
    verified afterwards on the signatures, so a false positive costs one 128-value comparison while a false negative
    loses a duplicate for good. At t = 0.8, num_perm = 128: 0.5/0.5 gives (9, 13) with P(0.8) = 0.40 (datasketch's
    MinHashLSH default, hence its 0.6-0.7 recall at J >= 0.8); 0.05/0.95 gives (16, 8) with P(0.8) = 0.947,
    P(0.85) = 0.994, P(0.9) = 0.9999, at the price of P(0.5) = 0.061 candidates that the verification rejects.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    s = np.linspace(0.0, 1.0, 2001)
    lo = s < threshold
    best = (np.inf, 0, 0)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = candidate_probability(s, b, r)
            fp = np.trapezoid(np.where(lo, p, 0.0), s)
            fn = np.trapezoid(np.where(lo, 0.0, 1.0 - p), s)
            err = false_positive_weight * fp + false_negative_weight * fn
            if err < best[0] - 1e-12:
                best = (err, b, r)
    return best[1], best[2]


def num_threads() -> int:
    return get_num_threads()


# ----------------------------------------------------------------------------------------------------------------
# N-gram membership (contamination): one pass per row for several N against an open-addressing hash table
# (tk uint64 keys, tv int64 values, -1 = empty slot, power-of-two size, linear probing; built by the contamination
# stage, engine/stages/contamination.py build_lookup_table)
# ----------------------------------------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _probe(tk, tv, key):
    mask = np.uint64(tk.shape[0] - 1)
    j = key & mask
    while tv[j] >= 0:
        if tk[j] == key:
            return tv[j]
        j = (j + np.uint64(1)) & mask
    return -1


@njit(parallel=True, cache=True)
def _ngram_lookup_numba(data, offsets, ns, tk, tv, hseed, out_val, out_n):
    n = offsets.shape[0] - 1
    n_chunks = min(n, 256)
    for c in prange(n_chunks):
        lo = c * n // n_chunks
        hi = (c + 1) * n // n_chunks
        m = _max_row_bytes(offsets, lo, hi) + 2
        norm = np.empty(m, np.uint8)
        ws = np.empty(m, np.int64)
        we = np.empty(m, np.int64)
        wh = np.empty(m, np.uint64)
        for i in range(lo, hi):
            out_val[i] = -1
            out_n[i] = 0
            _nb, nw, _nch, _ncjk = _normalize_row(data, offsets[i], offsets[i + 1], norm, ws, we)
            for w in range(nw):
                wh[w] = hash_span(norm, ws[w], we[w], hseed)
            for q in range(ns.shape[0]):
                g = ns[q]
                found = -1
                for s in range(nw - g + 1):
                    h = np.uint64(0x9E3779B97F4A7C15)
                    for k in range(g):
                        h = _chain(h, wh[s + k])
                    found = _probe(tk, tv, _fmix64(h ^ np.uint64(g)))
                    if found >= 0:
                        break
                if found >= 0:
                    out_val[i] = found
                    out_n[i] = g
                    break


def ngram_lookup(
    texts: pa.Array | pa.ChunkedArray,
    ns: list[int],
    table: tuple[np.ndarray, np.ndarray],
    hash_seed: int = DEFAULT_HASH_SEED,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the table value of its first word n-gram (for N in ``ns``, in that order) found in ``table``
    (``engine.stages.contamination.build_lookup_table`` over ``shingle_hashes(..., mode="word")`` hashes), and
    that N; -1 / 0 if none."""
    data, offsets = utf8_view(texts)
    n = len(offsets) - 1
    out_val = np.empty(n, np.int64)
    out_n = np.empty(n, np.int32)
    if n:
        _ngram_lookup_numba(
            data, offsets, np.asarray(ns, np.int64), table[0], table[1], np.uint64(hash_seed), out_val, out_n
        )
    return out_val, out_n
