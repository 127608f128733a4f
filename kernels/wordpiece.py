"""BERT WordPiece tokenisation of Arrow text in Numba, bit-exact with the Hugging Face fast tokenizer on ASCII rows.

Why: the static embedding tier is a table lookup plus a weighted mean, so its cost is the tokenizer. The HF fast
tokenizer (Rust, ``encode_batch``) plus turning its ``Encoding`` objects into id arrays ran at about 17,000
alpaca rows/s on this 2-core machine; the MiniLM tier ran at 200-275 rows/s with bf16 matmuls on a quiet machine,
so a 100x static tier needs >= 25,000 rows/s end to end. This kernel reads the Arrow UTF-8 buffer directly (no
Python string per row) and writes ids into one flat int32 buffer: ~430,000 alpaca rows/s on the same 2 cores.

Scope: the BERT pipeline ``BertNormalizer(clean_text, lowercase) -> BertPreTokenizer -> WordPiece("##")``, for rows
that are pure printable ASCII (plus tab/newline/CR). On such rows the normaliser's Unicode steps (accent
stripping, CJK spacing, control removal) are no-ops, so the result equals the HF tokenizer's exactly
(tests/engine/test_embed.py compares ids on real rows). Rows with any other byte are flagged and the caller
tokenises them with the HF tokenizer (6-7% of alpaca_52k rows: curly quotes, accents, symbols; at ~17,000 rows/s
that fallback is most of the static tier's time, so handling Unicode here is the next speed-up).

The static tier's fused path (``kernels.embed_pool.embed_pool_text``) reuses this file's byte classes
(``byte_tables``) and per-word split (``_wordpiece_word``), running the split once per distinct word.

Vocabulary lookup: one open-addressing hash table over all pieces, keyed by ``hash_span`` of the piece's bytes
(continuation pieces ``##x`` are stored as ``x`` with a different seed); a hit is confirmed by comparing bytes,
so a 64-bit collision cannot return a wrong id.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels.strings import hash_span

_SEED_START = np.uint64(0)
_SEED_CONT = np.uint64(0x5851F42D4C957F2D)
# HF WordPiece default: words longer than 100 characters become one [UNK].
MAX_INPUT_CHARS_PER_WORD = 100


class WordPieceTable:
    """Hash table of a WordPiece vocabulary: ``bytes`` (all pieces, '##' stripped), ``starts`` / ``ends`` into it,
    ``ids`` (int32), ``cont`` (bool: piece was '##...'), ``slots`` (int32 entry index per slot, -1 empty);
    ``byte_class`` / ``lower`` (uint8[256]) the pre-tokeniser's byte classes and the normaliser's byte map."""

    def __init__(self, vocab: dict[str, int], unk_token: str = "[UNK]", prefix: str = "##", lowercase: bool = True):
        pieces = sorted(vocab.items(), key=lambda kv: kv[1])
        blobs, starts, ends, ids, cont = [], [], [], [], []
        pos = 0
        for tok, tid in pieces:
            is_cont = tok.startswith(prefix) and len(tok) > len(prefix)
            b = (tok[len(prefix) :] if is_cont else tok).encode("utf-8")
            blobs.append(b)
            starts.append(pos)
            pos += len(b)
            ends.append(pos)
            ids.append(tid)
            cont.append(is_cont)
        self.data = np.frombuffer(b"".join(blobs), dtype=np.uint8).copy() if pos else np.zeros(1, np.uint8)
        self.starts = np.asarray(starts, np.int64)
        self.ends = np.asarray(ends, np.int64)
        self.ids = np.asarray(ids, np.int32)
        self.cont = np.asarray(cont, np.bool_)
        # Load factor <= 0.25: 30,522 BERT pieces -> 131,072 slots (512 KiB), probes ~1.2 on average.
        cap = 1 << max(4, int(np.ceil(np.log2(4 * max(1, len(ids))))))
        self.slots = _build_slots(self.data, self.starts, self.ends, self.cont, cap)
        self.unk_id = int(vocab[unk_token])
        self.lowercase = bool(lowercase)
        self.byte_class, self.lower = byte_tables(self.lowercase)


@njit(cache=True)
def _build_slots(data, starts, ends, cont, cap):
    slots = np.full(cap, -1, np.int32)
    mask = np.uint64(cap - 1)
    for e in range(starts.shape[0]):
        seed = _SEED_CONT if cont[e] else _SEED_START
        s = hash_span(data, starts[e], ends[e], seed) & mask
        while slots[s] != -1:
            s = (s + np.uint64(1)) & mask
        slots[s] = e
    return slots


@njit(inline="always", cache=True)
def _lookup(text, a, b, is_cont, vdata, vstarts, vends, vcont, vids, slots):
    """Id of piece text[a:b] (as '##' piece if is_cont), or -1."""
    seed = _SEED_CONT if is_cont else _SEED_START
    mask = np.uint64(slots.shape[0] - 1)
    s = hash_span(text, a, b, seed) & mask
    n = b - a
    while True:
        e = slots[s]
        if e == -1:
            return -1
        if vcont[e] == is_cont and vends[e] - vstarts[e] == n:
            vs = vstarts[e]
            same = True
            for k in range(n):
                if vdata[vs + k] != text[a + k]:
                    same = False
                    break
            if same:
                return vids[e]
        s = (s + np.uint64(1)) & mask


@njit(inline="always", cache=True)
def _is_punct(c):
    # ASCII punctuation as BERT sees it: 33-47, 58-64, 91-96, 123-126 (HF `is_bert_punc` on ASCII).
    return (33 <= c <= 47) or (58 <= c <= 64) or (91 <= c <= 96) or (123 <= c <= 126)


@njit(inline="always", cache=True)
def _is_space(c):
    return c == 32 or c == 9 or c == 10 or c == 13


@njit(inline="always", cache=True)
def _is_unclean(c):
    # >= 0x80: non-ASCII (Unicode normalisation applies); < 32 except \t \n \r, and 127: removed by clean_text,
    # which would join the neighbouring bytes into one word.
    return c >= 128 or c == 127 or (c < 32 and c != 9 and c != 10 and c != 13)


# Byte classes of the pre-tokeniser on clean ASCII, as one table lookup per byte (kernels.embed_pool's text path).
WORD, SPACE, PUNCT, UNCLEAN = 0, 1, 2, 3


def byte_tables(lowercase: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(class uint8[256]: WORD / SPACE / PUNCT / UNCLEAN, lower uint8[256]: the normaliser's byte map)."""
    c = np.arange(256)
    cls = np.full(256, WORD, np.uint8)  # same sets as _is_space / _is_punct / _is_unclean above
    cls[(c == 32) | (c == 9) | (c == 10) | (c == 13)] = SPACE
    punct = ((33 <= c) & (c <= 47)) | ((58 <= c) & (c <= 64)) | ((91 <= c) & (c <= 96)) | ((123 <= c) & (c <= 126))
    cls[punct] = PUNCT
    cls[(c >= 128) | (c == 127) | ((c < 32) & (c != 9) & (c != 10) & (c != 13))] = UNCLEAN
    lower = np.arange(256, dtype=np.uint8)
    if lowercase:
        lower[65:91] += 32
    return cls, lower


@njit(inline="always", cache=True)
def _wordpiece_word(text, j, k, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars, out, pos):
    """WordPiece greedy longest-match-first of the (normalised) word text[j:k] into out[pos:]; returns the new pos.

    A word longer than max_chars, or with a remainder no piece matches, is one [UNK] (HF's rule)."""
    if k - j > max_chars:
        out[pos] = unk_id
        return pos + 1
    p = pos
    start = j
    while start < k:
        end = k
        found = -1
        while start < end:
            found = _lookup(text, start, end, start > j, vdata, vstarts, vends, vcont, vids, slots)
            if found >= 0:
                break
            end -= 1
        if found < 0:
            out[pos] = unk_id
            return pos + 1
        out[p] = found
        p += 1
        start = end
    return p


@njit(parallel=True, cache=True)
def wordpiece_numba(data, offsets, lowercase, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars):
    """Token ids of each row of (data, offsets), no special tokens.

    Returns ``(ids, counts, fallback)``: row i's ids are ``ids[offsets[i] : offsets[i] + counts[i]]`` (a row of b
    bytes never has more than b tokens, so the byte offsets double as id offsets); ``fallback[i]`` is true for
    rows this kernel does not handle exactly (any byte >= 0x80 or a control character), whose count is 0.
    """
    n = offsets.shape[0] - 1
    ids = np.empty(max(1, data.shape[0]), np.int32)
    counts = np.zeros(n, np.int64)
    fallback = np.zeros(n, np.bool_)
    # Lower-cased copy so lookups hash the normalised bytes (1 byte per byte: ASCII lowercase keeps length).
    text = data.copy()
    if lowercase:
        for j in prange(data.shape[0]):
            c = data[j]
            if 65 <= c <= 90:
                text[j] = c + 32
    for i in prange(n):
        s = offsets[i]
        e = offsets[i + 1]
        bad = False
        for j in range(s, e):
            if _is_unclean(text[j]):
                bad = True
                break
        if bad:
            fallback[i] = True
            continue
        out = s
        j = s
        while j < e:
            c = text[j]
            if _is_space(c):
                j += 1
                continue
            # A punctuation byte is a word of its own; otherwise the word runs to the next space or punctuation.
            k = j + 1
            if not _is_punct(c):
                while k < e and not (_is_space(text[k]) or _is_punct(text[k])):
                    k += 1
            out = _wordpiece_word(text, j, k, vdata, vstarts, vends, vcont, vids, slots, unk_id, max_chars, ids, out)
            j = k
        counts[i] = out - s
    return ids, counts, fallback


def wordpiece(table: WordPieceTable, data: np.ndarray, offsets: np.ndarray):
    """(ids, counts, fallback) for a text column given as ``kernels.strings.utf8_view`` output."""
    return wordpiece_numba(
        data,
        offsets,
        table.lowercase,
        table.data,
        table.starts,
        table.ends,
        table.cont,
        table.ids,
        table.slots,
        np.int32(table.unk_id),
        MAX_INPUT_CHARS_PER_WORD,
    )
