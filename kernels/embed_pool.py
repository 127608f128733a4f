"""Weighted mean of token vectors per row, L2-normalised: the static embedding tier's inner loop.

``out[i] = normalize(sum_t w[ids[t]] * table[ids[t]])`` over the tokens ``t`` of row ``i`` (ids[starts[i] :
starts[i] + counts[i]]). Dividing by ``sum w`` does not change the direction, and the rows are L2-normalised, so
the kernels skip it. A row with no tokens (or only zero-weight tokens) gets the zero vector.

Cost: one gather of a (dim,) row per token; 256 float32 = 1 KiB per token, so a 70-token row reads 70 KiB of a
table (30,522 x 256 x 4 B = 31 MB) that stays in L2/L3: the Numba path pooled ~550,000 alpaca rows/s (69 tokens
per row) on 2 shared cores, faster than tokenising them.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from numba import njit, prange

from kernels.strings import _P1, _fmix64
from kernels.wordpiece import MAX_INPUT_CHARS_PER_WORD, SPACE, UNCLEAN, WORD, _wordpiece_word


@triton.jit
def _embed_pool_kernel(
    table_ptr,  # (V, D) float32 token vectors
    table_stride,  # elements between rows of the table
    weight_ptr,  # (V,) float32 per-token weight (SIF / Zipf)
    ids_ptr,  # flat int32 token ids
    starts_ptr,  # (N,) int64 first position of each row in ids
    counts_ptr,  # (N,) int64 number of tokens of each row
    out_ptr,  # (N, D) float32 result
    out_stride,  # elements between rows of out
    D,  # embedding width
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + row)
    count = tl.load(counts_ptr + row)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in tl.range(0, count):
        tok = tl.load(ids_ptr + start + t).to(tl.int64)
        w = tl.load(weight_ptr + tok)
        vec = tl.load(table_ptr + tok * table_stride + cols, mask=mask, other=0.0)
        acc += w * vec
    norm = tl.sqrt(tl.sum(acc * acc, axis=0))
    # A zero row stays zero: 0 / 1e-30 = 0 (tl.where would evaluate 0 / 0 and warn).
    acc = acc / tl.maximum(norm, 1e-30)
    tl.store(out_ptr + row * out_stride + cols, acc, mask=mask)


def embed_pool_triton(
    table: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Launch one program per row; tensors on the same device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    table = table.float().contiguous()
    n, d = starts.shape[0], table.shape[1]
    out = torch.empty((n, d), dtype=torch.float32, device=table.device)
    if n == 0:
        return out
    _embed_pool_kernel[(n,)](
        table,
        table.stride(0),
        weights.float().contiguous(),
        ids.to(torch.int32).contiguous(),
        starts.to(torch.int64).contiguous(),
        counts.to(torch.int64).contiguous(),
        out,
        out.stride(0),
        d,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def embed_pool_reference(
    table: np.ndarray, weights: np.ndarray, ids: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Plain numpy, float64 accumulation: the definition the other paths are tested against."""
    n, d = len(starts), table.shape[1]
    out = np.zeros((n, d), np.float64)
    for i in range(n):
        t = ids[starts[i] : starts[i] + counts[i]]
        v = (weights[t, None].astype(np.float64) * table[t].astype(np.float64)).sum(0)
        nrm = np.linalg.norm(v)
        out[i] = v / nrm if nrm > 0 else v
    return out


@njit(parallel=True, cache=True, fastmath=True)
def embed_pool_numba(table, weights, ids, starts, counts):
    """Numba CPU path: rows in parallel, float32 accumulation (max abs error vs float64 ~1e-6 at 500 tokens)."""
    n = starts.shape[0]
    d = table.shape[1]
    out = np.zeros((n, d), np.float32)
    for i in prange(n):
        acc = np.zeros(d, np.float32)
        s = starts[i]
        for t in range(s, s + counts[i]):
            tok = ids[t]
            w = weights[tok]
            if w == 0.0:
                continue
            for k in range(d):
                acc[k] += w * table[tok, k]
        ss = np.float32(0.0)
        for k in range(d):
            ss += acc[k] * acc[k]
        if ss > 0:
            inv = np.float32(1.0) / np.sqrt(ss)
            for k in range(d):
                out[i, k] = acc[k] * inv
    return out


def embed_pool(table, weights, ids, starts, counts, device: str = "auto") -> np.ndarray:
    """(N, D) float32 L2-normalised weighted means. ``device``: "cpu" (Numba), "cuda" (Triton), "auto"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("embed_pool(device='cuda') needs a CUDA GPU; pass device='cpu' or 'auto'")
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a)).cuda()
        return embed_pool_triton(t(table), t(weights), t(ids), t(starts), t(counts)).cpu().numpy()
    if device != "cpu":
        raise ValueError(f"embed_pool device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return embed_pool_numba(
        np.ascontiguousarray(table, dtype=np.float32),
        np.ascontiguousarray(weights, dtype=np.float32),
        np.ascontiguousarray(ids, dtype=np.int32),
        np.ascontiguousarray(starts, dtype=np.int64),
        np.ascontiguousarray(counts, dtype=np.int64),
    )


# ---------------------------------------------------------------------------------------------------------------
# Straight from text, memoised per word (the static tier's CPU path)
#
# Natural text repeats its words (Zipf): 1M generated 1 KB documents use ~28,000 distinct words for 8.5M word
# occurrences per 50,000 rows, alpaca_52k 41,000 for 3.2M. So each distinct word is WordPiece-split once and its
# weighted token vector sum ``sum_t w[t] * table[t]`` (3.2 tokens per word on the generated text) kept; a row is
# then one memo probe plus one (dim,) add per word, in one pass over the bytes with no token id array. Measured on
# 50,000 generated rows (50 MB, 27.5M tokens, 8.5M words), one thread, CPU seconds: tokenize-then-pool 1.55 s
# (WordPiece) + 0.62 s (per-token adds); this path 0.68 s = byte scan 0.13 + key packing 0.06 + memo probes 0.12 +
# word-vector adds 0.37 (28 MB of memo vectors, read at random: the largest part now).
#
# Not bit-identical to embed_pool_numba: a row sums per-word partial sums, ``acc + (w1 v1 + w2 v2)`` instead of
# ``(acc + w1 v1) + w2 v2``, in float32. Max abs difference ~1e-6 on 1 KB rows, and ~7x closer to the float64
# reference than the per-token kernel (fewer rounded additions into the running sum); after the float16 cast ~0.1%
# of elements move by one float16 ulp (tests/kernels/test_embed_pool.py, tests/engine/models/test_static.py).
# The memo stays float32: Numba has no float16 arrays on the CPU, and rounding each word's sum would lose accuracy.

# A word of <= 16 bytes (all but 0.014% of alpaca's words) packs, lower-cased, into two uint64 keys; clean text has
# no 0 byte, so the zero padding makes the length implicit and a key compare is two integer compares. Longer words
# are split (and their vector summed) every time they occur.
MEMO_WORD_BYTES = 16


class WordVectorMemo:
    """Memo of ``embed_pool_text``: packed lower-cased word -> its weighted token vector sum, one per chunk of rows
    (one chunk per Numba thread, so threads never share one). Kept across calls; a full chunk starts empty again.

    ``keys[c, slot] = (k0, k1, entry)`` (open addressing, load <= 0.5, k0 == 0 marks an empty slot; 32 B per slot:
    one cache line per probe), ``vecs[c, entry]`` float32 (64 MB at the default 65,536 words x 256 dims per chunk;
    the OS commits only the pages written: 28 MB for the generated corpus' 28,000 words), ``state[c]`` = (words held,
    times it started again). Only speed depends on its contents: a word's vector is computed the same way on a hit
    or a miss.
    """

    def __init__(self, dim: int, max_words: int = 1 << 16, chunks: int = 1):
        self.dim, self.max_words, self.chunks = int(dim), int(max_words), int(chunks)
        cap = 1 << max(4, int(np.ceil(np.log2(2 * max(1, self.max_words)))))
        self.keys = np.zeros((self.chunks, cap, 4), np.uint64)
        self.vecs = np.zeros((self.chunks, self.max_words, self.dim), np.float32)
        self.state = np.zeros((self.chunks, 2), np.int64)  # per chunk: [words held, times it started again]


@njit(inline="always", cache=True)
def _word_vector(ids, ntok, table, weights, vec):
    """vec = sum over ids[:ntok] of w[tok] * table[tok] (zero-weight tokens skipped), float32, in token order."""
    vec[:] = 0.0
    for t in range(ntok):
        tok = ids[t]
        w = weights[tok]
        if w == 0.0:
            continue
        for q in range(vec.shape[0]):
            vec[q] += w * table[tok, q]


@njit(nogil=True, cache=True, fastmath=True)
def _embed_rows(
    lo, hi, data, offsets, byte_class, lower, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars,
    table, weights, keys, vecs, state, out, fallback,
):  # fmt: skip
    """Rows lo..hi-1 of embed_pool_text_numba with one memo chunk (keys, vecs; state = [used, resets])."""
    d = table.shape[1]
    acc = np.zeros(d, np.float32)
    scratch = np.zeros(d, np.float32)
    nbuf = max(MEMO_WORD_BYTES, max_chars) + 1
    wbuf = np.empty(nbuf, np.uint8)
    ids = np.empty(nbuf, np.int32)
    mask = np.uint64(keys.shape[0] - 1)
    max_words = vecs.shape[0]
    for i in range(lo, hi):
        s = offsets[i]
        e = offsets[i + 1]
        acc[:] = 0.0
        bad = False
        j = s
        while j < e:
            cl = byte_class[data[j]]
            if cl == SPACE:
                j += 1
                continue
            if cl == UNCLEAN:
                bad = True
                break
            # A punctuation byte is a word of its own; otherwise the word runs to the next non-word byte (an
            # UNCLEAN one ends it too and is caught on the next turn, so the row still falls back).
            k = j + 1
            if cl == WORD:
                while k < e and byte_class[data[k]] == WORD:
                    k += 1
            n = k - j
            if n <= MEMO_WORD_BYTES:
                k0 = np.uint64(0)
                k1 = np.uint64(0)
                for q in range(min(n, 8)):
                    k0 |= np.uint64(lower[data[j + q]]) << np.uint64(8 * q)
                for q in range(8, n):
                    k1 |= np.uint64(lower[data[j + q]]) << np.uint64(8 * (q - 8))
                h = _fmix64(k0 + k1 * _P1) & mask
                while True:
                    if keys[h, 0] == k0 and keys[h, 1] == k1:
                        ent = keys[h, 2]
                        break
                    if keys[h, 0] == 0:
                        if state[0] >= max_words:  # full: start again empty (hot words come back within a row)
                            keys[:, :] = 0
                            state[0] = 0
                            state[1] += 1
                            h = _fmix64(k0 + k1 * _P1) & mask
                        ent = np.uint64(state[0])
                        state[0] += 1
                        keys[h, 0] = k0
                        keys[h, 1] = k1
                        keys[h, 2] = ent
                        for q in range(n):
                            wbuf[q] = lower[data[j + q]]
                        ntok = _wordpiece_word(
                            wbuf, 0, n, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars, ids, 0
                        )
                        _word_vector(ids, ntok, table, weights, vecs[ent])
                        break
                    h = (h + np.uint64(1)) & mask
                vec = vecs[ent]
            else:
                if n <= max_chars:
                    for q in range(n):
                        wbuf[q] = lower[data[j + q]]
                ntok = _wordpiece_word(
                    wbuf, 0, n, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars, ids, 0
                )
                _word_vector(ids, ntok, table, weights, scratch)
                vec = scratch
            for q in range(d):
                acc[q] += vec[q]
            j = k
        if bad:
            fallback[i] = True
            continue
        ss = np.float32(0.0)
        for q in range(d):
            ss += acc[q] * acc[q]
        if ss > 0:
            inv = np.float32(1.0) / np.sqrt(ss)
            for q in range(d):
                out[i, q] = acc[q] * inv


@njit(parallel=True, cache=True)
def embed_pool_text_numba(
    data, offsets, byte_class, lower, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars,
    table, weights, keys, vecs, state,
):  # fmt: skip
    """(out (N, D) float32, fallback (N,) bool): tokenise (kernels.wordpiece) and pool in one pass over the UTF-8
    bytes, rows split into ``keys.shape[0]`` contiguous chunks, one memo chunk each. Fallback rows stay zero."""
    n = offsets.shape[0] - 1
    chunks = keys.shape[0]
    out = np.zeros((n, table.shape[1]), np.float32)
    fallback = np.zeros(n, np.bool_)
    for c in prange(chunks):
        _embed_rows(
            n * c // chunks, n * (c + 1) // chunks, data, offsets, byte_class, lower, vdata, vstarts, vends, vcont,
            vids, slots, unk_id, max_chars, table, weights, keys[c], vecs[c], state[c], out, fallback,
        )  # fmt: skip
    return out, fallback


def embed_pool_text(wp, table: np.ndarray, weights: np.ndarray, data: np.ndarray, offsets: np.ndarray, memo=None):
    """(N, D) float32 unit vectors and the (N,) fallback mask for a text column given as
    ``kernels.strings.utf8_view`` output, tokenised by ``wp`` (a ``kernels.wordpiece.WordPieceTable``); ``memo`` a
    ``WordVectorMemo`` to keep across calls (None: a fresh one). ``table`` float32 (V, D), ``weights`` float32 (V,).
    Fallback rows (non-ASCII or control bytes: see kernels.wordpiece) come back as zero rows for the caller."""
    if memo is None:
        memo = WordVectorMemo(table.shape[1])
    out, fallback = embed_pool_text_numba(
        data, offsets, wp.byte_class, wp.lower, wp.data, wp.starts, wp.ends, wp.cont, wp.ids, wp.slots,
        np.int32(wp.unk_id), MAX_INPUT_CHARS_PER_WORD, table, weights, memo.keys, memo.vecs, memo.state,
    )  # fmt: skip
    return out, fallback
