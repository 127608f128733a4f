"""The static tier: a per-token table, trained on MiniLM's outputs (shipped) or distilled from an encoder (model2vec's
method), >100x faster than the encoder on CPU.

Trained table (the default for the shipped MiniLM): ``engine/models/data/static_minilm_tuned.npz``, made offline by
``bench/train_static.py`` (model2vec's tokenlearn idea): MiniLM embeds a real corpus, each token starts from its mean
in-context MiniLM state, then per-token weights, one linear map and finally every token row are fitted so that the
pooled static vector of each text points where MiniLM's does (cosine loss, targets projected on their top 256
singular directions); last, vectors for the 6,144 most frequent token bigrams of the corpus are fitted with the
table (+0.005 held-out 10-NN overlap on 15,000 texts, +0.014 on 84,000; a row then sums its tokens' and its known
bigrams' vectors, ``pool_with_bigrams``: 0.85x the fused unigram path's speed on alpaca rows, 774x MiniLM). Stored as
4-bit codes of the unit rows (one 16-level Lloyd codebook) plus float32 weights (4.5 MB with the bigrams, under the
project's 5 MiB limit per file; see ``write_tuned_table`` for what the packing costs), tied by
``model_fingerprint`` to the MiniLM weights it was trained against: another encoder (a user's ``static:PATH``),
another ``static_dim`` or ``static_sif`` gets the plain distillation below (``static_table_source``). Its key (folder
name and the tier's model key) carries a digest of the file, so a retrained table changes every cache and resume
key. Held-out 10-NN overlap with MiniLM (sets never trained on; bench/bench_static_agreement.py): see docs/EMBED.md.

Distilled table: every vocabulary token goes through the encoder once as ``[SEP] tok [CLS]`` (model2vec's order), the
three output vectors are averaged, PCA to ``static_dim`` (256) and each token is weighted by SIF over a Zipf estimate
of its frequency from its vocabulary rank, ``w = a / (a + p(rank))`` with a = 1e-4.

Either table (30,522 x 256 float16 = 15.6 MB) is decoded or distilled once into the user cache dir
(``$WINNOW_CACHE``, else ``$XDG_CACHE_HOME/winnow``, else ``~/.cache/winnow``), or into ``<prefix>/share/winnow`` by
``make install``; distilling took 11-57 s on 2 shared cores, decoding well under a second. It is built once, under an
exclusive file lock, even when several worker processes ask for it at the same time (see ``build_once``).
A row's vector is the weighted mean of its token vectors (``kernels.embed_pool``), tokenised by the Numba
WordPiece kernel (``kernels.wordpiece``, exact on ASCII rows; others go through the HF fast tokenizer); on ASCII rows
the two run fused, once per distinct word (``kernels.embed_pool.embed_pool_text``).

torch, transformers and sklearn are imported inside the functions only (engine.stages.embed imports this module
whenever engine.config loads).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from engine.models.device import resolve_device
from engine.models.embed_cache import user_cache_dir
from engine.models.encoder import default_model_path, model_fingerprint
from kernels.strings import utf8_view

log = logging.getLogger(__name__)

STR = pa.large_string()


def _bert_wordpiece_settings(tokenizer) -> dict | None:
    """The fast tokenizer's pipeline if it is BERT WordPiece (what kernels.wordpiece reproduces), else None."""
    try:
        cfg = json.loads(tokenizer.backend_tokenizer.to_str())
    except (AttributeError, ValueError):  # a slow (Python) tokenizer has no backend_tokenizer
        return None
    norm, pre, model = cfg.get("normalizer") or {}, cfg.get("pre_tokenizer") or {}, cfg.get("model") or {}
    if (
        norm.get("type") == "BertNormalizer"
        and norm.get("clean_text", True)
        and pre.get("type") == "BertPreTokenizer"
        and model.get("type") == "WordPiece"
        and model.get("continuing_subword_prefix") == "##"
        and model.get("max_input_chars_per_word", 100) == 100
    ):
        return {"lowercase": bool(norm.get("lowercase", True)), "unk": model.get("unk_token", "[UNK]")}
    return None


def distill_static(
    model_path: str, dim: int = 256, sif: float = 1e-4, device: str = "auto", batch_rows: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """model2vec distillation: (table (V, dim) float32, weights (V,) float32) from a local encoder folder.

    Each token id goes through the encoder as ``[SEP] id [CLS]`` (model2vec found this reversed order better) and
    the 3 output vectors are averaged; ``[unusedN]`` tokens get weight 0 and stay out of the PCA fit and the Zipf
    ranks. PCA (full SVD) to ``dim``; weights ``sif / (sif + p)`` with ``p`` proportional to 1 / (rank + 2).
    """
    import torch
    from sklearn.decomposition import PCA
    from transformers import AutoModel, AutoTokenizer

    dev = resolve_device(device)
    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModel.from_pretrained(model_path).eval().to(dev)
    vocab = tok.get_vocab()
    v = max(vocab.values()) + 1
    probe = tok("A")["input_ids"]
    bos, eos = int(probe[0]), int(probe[-1])
    ids = torch.arange(v)
    seq = torch.stack([torch.full((v,), eos), ids, torch.full((v,), bos)], dim=1)
    vecs = np.zeros((v, model.config.hidden_size), np.float32)
    with torch.inference_mode():
        for s in range(0, v, batch_rows):
            b = seq[s : s + batch_rows].to(dev)
            h = model(input_ids=b, attention_mask=torch.ones_like(b), token_type_ids=torch.zeros_like(b))
            vecs[s : s + len(b)] = h.last_hidden_state.float().mean(1).cpu().numpy()
    unused = np.zeros(v, bool)
    pat = re.compile(r"\[unused\d+\]")
    for t, i in vocab.items():
        if pat.fullmatch(t):
            unused[i] = True
    keep = np.flatnonzero(~unused)
    dim = min(dim, vecs.shape[1], len(keep))
    pca = PCA(n_components=dim, svd_solver="full").fit(vecs[keep])
    table = pca.transform(vecs).astype(np.float32)
    inv_rank = 1.0 / np.arange(2, len(keep) + 2)
    proba = inv_rank / inv_rank.sum()
    weights = np.zeros(v, np.float32)
    weights[keep] = sif / (sif + proba)
    return table, weights


def build_once(paths: Sequence[Path], build: Callable[[], Sequence[np.ndarray]]) -> bool:
    """Make every ``.npy`` file in ``paths`` exist, calling ``build()`` (one array per path, in order) at most once
    however many processes ask at the same time; True when this call built them.

    Two worker processes can start on an empty cache together (the map phase starts them at once), and each would
    otherwise distil the table (11-57 s of CPU) and write it over the other's. So the check-and-build runs under an
    exclusive ``fcntl.flock`` on ``.lock`` in the files' folder: the first process builds, a second blocks on the
    lock, then checks again, finds the finished files and builds nothing. Reading needs no lock: each file appears by
    an atomic rename (tmp + ``os.replace``), so a reader that sees every file sees complete files. The kernel drops
    the lock when its holder exits or dies, so a crashed build leaves no stale lock (at most a tmp file). The lock
    file is never deleted: unlinking it would let a late process lock a fresh inode while another holds the old one.
    """
    if all(p.exists() for p in paths):
        return False
    folder = paths[0].parent
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds; released when the file closes
        if all(p.exists() for p in paths):
            return False
        arrays = build()
        for path, arr in zip(paths, arrays, strict=True):
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
    return True


def shipped_static_dir() -> Path:
    """Static tables installed with winnow (``<prefix>/share/winnow/static``): distilled once at install time, so a
    first run with an empty user cache does not spend minutes distilling."""
    return Path(sys.prefix) / "share" / "winnow" / "static"


# The trained table for the shipped MiniLM (bench/train_static.py), 4-bit codes: part of the package.
TUNED_FILE = Path(__file__).resolve().parent / "data" / "static_minilm_tuned.npz"
CODE_LEVELS = 16  # 4 bits per entry, two entries per byte


def _lloyd_codebook(x: np.ndarray, levels: int = CODE_LEVELS, iters: int = 30, sample: int = 500_000) -> np.ndarray:
    """(levels,) float32 scalar quantiser fitted to the values ``x`` by Lloyd's algorithm (each level the mean of the
    values nearest it), started from the quantiles; seeded subsample, so the same table gives the same file."""
    x = np.asarray(x, np.float64).ravel()
    if len(x) > sample:
        x = x[np.random.default_rng(0).choice(len(x), sample, replace=False)]
    c = np.quantile(x, (np.arange(levels) + 0.5) / levels)
    for _ in range(iters):
        idx = np.searchsorted((c[1:] + c[:-1]) / 2, x)
        sums = np.bincount(idx, x, minlength=levels)
        counts = np.bincount(idx, minlength=levels)
        c = np.where(counts > 0, sums / np.maximum(counts, 1), c)
    return np.sort(c).astype(np.float32)


def write_tuned_table(
    path: Path, vectors: np.ndarray, fingerprint: str, sif: float, meta: dict, bigram_keys: np.ndarray | None = None
) -> None:
    """Save a trained table ``F`` (V, d): pooling is ``normalize(sum_t F_t)``, stored as weights ``|F_t|`` (float32)
    and unit rows in 4 bits per entry (two per byte), with the fingerprint of the encoder the targets came from.

    The 4-bit code indexes one 16-level codebook fitted by Lloyd's algorithm to the entries of the unit rows scaled
    by sqrt(d) (unit rows all have that rms, so no per-row scale is needed; ``read_tuned_table`` renormalises each
    decoded row and the weight carries its length). Measured on the 15,000-text table (held-out 10-NN overlap with
    MiniLM, mean of 8 sets): int8 + per-row scale 0.4176 (7.0 MB), this 0.4168 (3.7 MB), uniform 4-bit absmax
    0.4160, 3-bit Lloyd 0.4145. ``sif`` is the setting the table answers to (the default's: a user who asks for
    another SIF or dim gets a plain distillation).

    ``bigram_keys`` (K,) sorted int64 ``first_id * 65536 + second_id``: the last K rows of ``vectors`` are the vectors
    of these token bigrams, added to a row's sum wherever the pair occurs (see ``StaticEmbedder.encode``)."""
    f = np.asarray(vectors, np.float32)
    keys = np.zeros(0, np.int64) if bigram_keys is None else np.asarray(bigram_keys, np.int64)
    if len(keys) and (len(keys) >= len(f) or np.any(np.diff(keys) <= 0)):
        raise ValueError("bigram_keys must be sorted, distinct, and fewer than the table's rows")
    d = f.shape[1]
    if d % 2:
        raise ValueError(f"a trained table needs an even dim to pack 4-bit codes, got {d}")
    weights = np.linalg.norm(f, axis=1)
    x = f / np.maximum(weights, 1e-30)[:, None] * np.float32(np.sqrt(d))
    codebook = _lloyd_codebook(x[weights > 0])
    codes = np.searchsorted((codebook[1:] + codebook[:-1]) / 2, x).astype(np.uint8)
    packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
    meta = {**meta, "fingerprint": fingerprint, "dim": int(d), "sif": float(sif), "format": "4bit-lloyd"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.npz")
    np.savez_compressed(tmp, codes=packed, codebook=codebook, weights=weights.astype(np.float32), bigram_keys=keys,
                        meta=np.array(json.dumps(meta, sort_keys=True)))  # fmt: skip
    os.replace(tmp, path)


def tuned_table_meta(path: Path) -> dict | None:
    """The metadata of a trained table file (None when absent or unreadable), plus ``digest``: 8 bytes of blake2b
    over the file, so that a retrained table changes the static tier's key (and every cache and resume key)."""
    import hashlib

    try:
        with np.load(path) as z:
            meta = json.loads(str(z["meta"]))
        meta["digest"] = hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
        return meta
    except (OSError, KeyError, ValueError):
        return None


def read_tuned_table(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(table float16 (V + K, d) unit rows, weights float32 (V + K,), bigram keys int64 (K,)) of a trained table
    file (``write_tuned_table``); K = 0 for a table without bigrams."""
    with np.load(path) as z:
        packed, codebook, weights = z["codes"], z["codebook"], z["weights"].astype(np.float32)
        keys = z["bigram_keys"].astype(np.int64) if "bigram_keys" in z.files else np.zeros(0, np.int64)
    codes = np.empty((len(packed), packed.shape[1] * 2), np.uint8)
    codes[:, 0::2] = packed & 0x0F
    codes[:, 1::2] = packed >> 4
    table = codebook[codes]
    table /= np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-30)
    return table.astype(np.float16), weights, keys


def static_table_source(model_path: str, dim: int, sif: float, tuned: bool = True) -> tuple[str, Path | None]:
    """(key, trained file or None): the trained table when it was trained against this very encoder (same
    ``model_fingerprint``) at this ``dim`` and ``sif``, else plain distillation. The key names the folder and the
    static tier's model key: ``<model>-<fingerprint>-d<dim>-tuned-<file digest>`` or ``...-d<dim>-sif<sif>``."""
    fp = model_fingerprint(model_path)
    base = f"{os.path.basename(os.path.normpath(model_path))}-{fp}-d{dim}"
    meta = tuned_table_meta(TUNED_FILE) if tuned and TUNED_FILE.exists() else None
    if meta and meta.get("fingerprint") == fp and meta.get("dim") == dim and meta.get("sif") == sif:
        return f"{base}-tuned-{meta['digest']}", TUNED_FILE
    return f"{base}-sif{sif:g}", None


def load_static_table(
    model_path: str,
    dim: int = 256,
    sif: float = 1e-4,
    cache_dir: str = "",
    device: str = "auto",
    tuned: bool = True,
) -> tuple[np.ndarray, np.ndarray, Path]:
    """(table float16, weights float32, folder) from the installed share folder or the user cache, built on first
    use (once, under a lock: see ``build_once``): decoded from the trained table when it fits the encoder (see
    ``static_table_source``; ``tuned=False``: always the plain distillation), else distilled. A trained table's
    folder also holds ``bigrams.npy`` (its bigram keys, ``read_bigram_keys``); its table then has V + K rows."""
    key, trained = static_table_source(model_path, dim, sif, tuned)
    names = ("table.npy", "weights.npy") + (("bigrams.npy",) if trained is not None else ())
    shipped = shipped_static_dir() / key  # built by `make install` (python -m engine.run.warmup --ship)
    if all((shipped / n).exists() for n in names):
        return np.load(shipped / "table.npy"), np.load(shipped / "weights.npy"), shipped
    folder = user_cache_dir(cache_dir) / "static" / key

    def build() -> tuple[np.ndarray, ...]:
        t0 = time.perf_counter()
        if trained is not None:
            table, weights, keys = read_tuned_table(trained)
            log.info("decoded the trained static table %s from %s", folder, trained)
            return table, weights, keys
        table, weights = distill_static(model_path, dim, sif, device)
        log.info("distilled static table %s in %.1f s", folder, time.perf_counter() - t0)
        return table.astype(np.float16), weights

    build_once(tuple(folder / n for n in names), build)
    return np.load(folder / "table.npy"), np.load(folder / "weights.npy"), folder


def read_bigram_keys(folder: Path) -> np.ndarray:
    """The sorted bigram keys of a static table folder (empty: unigrams only, as every distilled table)."""
    path = folder / "bigrams.npy"
    return np.load(path).astype(np.int64) if path.exists() else np.zeros(0, np.int64)


def bigram_ids(ids: np.ndarray, counts: np.ndarray, keys: np.ndarray, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """(row ids (M,), table ids (M,)) of the known bigrams in dense token ids (rows back to back, ``counts`` each):
    the pair (a, b) of neighbouring tokens of one row is key ``a * 65536 + b``, table row ``vocab + its index in
    keys``. Rows in order, pairs in text order within a row."""
    n_tok = len(ids)
    if not len(keys) or n_tok < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    row = np.repeat(np.arange(len(counts)), counts)
    first = ids[:-1].astype(np.int64)
    pair = first * 65536 + ids[1:].astype(np.int64)
    same_row = row[:-1] == row[1:]
    pos = np.searchsorted(keys, pair).clip(0, len(keys) - 1)
    hit = np.flatnonzero(same_row & (keys[pos] == pair))
    return row[hit], vocab + pos[hit]


def pool_with_bigrams(table, weights, ids, starts, counts, keys, vocab) -> np.ndarray:
    """(n, d) float32 ``normalize(sum_t w_t table_t + sum_pairs w_p table_p)`` per row: the row's tokens (ids[starts[i]
    : starts[i] + counts[i]]) and each neighbouring pair found in ``keys`` (table row ``vocab`` + its index), one
    Numba pass (``bigram_ids`` is the same lookup in numpy, for training). Zero rows stay zero."""
    return _pool_with_bigrams(
        np.ascontiguousarray(table, np.float32), np.ascontiguousarray(weights, np.float32), ids,
        np.asarray(starts, np.int64), np.asarray(counts, np.int64), np.asarray(keys, np.int64), int(vocab),
    )  # fmt: skip


def _numba_pool_with_bigrams():
    from numba import njit, prange

    @njit(parallel=True, cache=True, fastmath=True)
    def pool(table, weights, ids, starts, counts, keys, vocab):
        n, d, k = starts.shape[0], table.shape[1], keys.shape[0]
        out = np.zeros((n, d), np.float32)
        for i in prange(n):
            acc = np.zeros(d, np.float32)
            s, e = starts[i], starts[i] + counts[i]
            for t in range(s, e):
                tok = ids[t]
                w = weights[tok]
                if w != 0.0:
                    for c in range(d):
                        acc[c] += w * table[tok, c]
                if t + 1 < e and k > 0:
                    key = np.int64(tok) * 65536 + np.int64(ids[t + 1])
                    j = np.searchsorted(keys, key)
                    if j < k and keys[j] == key:
                        r = vocab + j
                        w = weights[r]
                        for c in range(d):
                            acc[c] += w * table[r, c]
            ss = np.float32(0.0)
            for c in range(d):
                ss += acc[c] * acc[c]
            if ss > 0:
                inv = np.float32(1.0) / np.sqrt(ss)
                for c in range(d):
                    out[i, c] = acc[c] * inv
        return out

    return pool


_POOL = None


def _pool_with_bigrams(*args):
    global _POOL
    if _POOL is None:  # compiled (or loaded from Numba's cache) on first use only
        _POOL = _numba_pool_with_bigrams()
    return _POOL(*args)


class StaticEmbedder:
    """Weighted mean of distilled token vectors: tokenise (Numba WordPiece or HF fast tokenizer), gather, pool."""

    def __init__(
        self,
        model_path: str | None = None,
        dim: int = 256,
        sif: float = 1e-4,
        cache_dir: str = "",
        device: str = "auto",
    ):
        from transformers import AutoTokenizer

        from kernels.wordpiece import WordPieceTable

        self.model_path = model_path or default_model_path()
        self.device = resolve_device(device)
        table, weights, self.folder = load_static_table(self.model_path, dim, sif, cache_dir, device)
        self.bigram_keys = read_bigram_keys(self.folder)
        self.vocab = len(table) - len(self.bigram_keys)
        # float32 in memory: 31 MB for BERT's vocab, and the pooling loop avoids a float16 convert per element.
        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.weights = np.ascontiguousarray(weights, dtype=np.float32)
        self.dim = self.table.shape[1]
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        settings = _bert_wordpiece_settings(self.tokenizer)
        self.wordpiece = (
            WordPieceTable(self.tokenizer.get_vocab(), settings["unk"], lowercase=settings["lowercase"])
            if settings
            else None
        )
        # A private copy of the Rust tokenizer without the padding / truncation that tokenizer.json may carry
        # (MiniLM's pads to 128): the static tier pools every token of the row.
        from tokenizers import Tokenizer

        self.fast = Tokenizer.from_str(self.tokenizer.backend_tokenizer.to_str())
        self.fast.no_padding()
        self.fast.no_truncation()
        self.model_key = f"static-{self.folder.name}"
        self.fallback_rows = 0
        self.memo = None  # kernels.embed_pool.WordVectorMemo, made on the first encode

    def tokenize(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32, starts int64, counts int64) for an Arrow string array, no special tokens."""
        n = len(texts)
        if self.wordpiece is not None:
            from kernels.wordpiece import wordpiece

            data, offsets = utf8_view(texts)
            ids, counts, fallback = wordpiece(self.wordpiece, data, offsets)
            starts = offsets[:-1].astype(np.int64)
            rest = np.flatnonzero(fallback)
        else:
            ids, starts, counts = np.zeros(0, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64)
            rest = np.arange(n)
        if len(rest):
            self.fallback_rows += len(rest)
            extra_ids, extra_starts, lens = self._tokenize_hf(texts.take(pa.array(rest)))
            starts = starts.copy()
            counts = counts.copy()
            starts[rest] = len(ids) + extra_starts
            counts[rest] = lens
            ids = np.concatenate([ids, extra_ids])
        return ids, starts, counts

    def _tokenize_hf(self, texts: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, starts, counts) from the HF fast tokenizer: rows the Numba WordPiece kernel does not handle."""
        encs = self.fast.encode_batch(["" if s is None else s for s in texts.to_pylist()], add_special_tokens=False)
        extra = [np.asarray(e.ids, np.int32) for e in encs]
        lens = np.fromiter((len(e) for e in extra), np.int64, count=len(extra))
        starts = np.zeros(len(extra), np.int64)
        np.cumsum(lens[:-1], out=starts[1:])
        return (np.concatenate(extra) if extra else np.zeros(0, np.int32)), starts, lens

    @staticmethod
    def _as_array(texts: list[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
        if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = pa.array(["" if t is None else t for t in texts], STR)
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        return texts

    def encode(self, texts: list[str] | pa.Array) -> np.ndarray:
        """(n, dim) float32 unit vectors (zero for a row with no known token).

        ASCII rows are tokenised and pooled in one pass from the Arrow bytes, each distinct word split and summed
        once (``kernels.embed_pool.embed_pool_text``, with a per-word memo kept across calls): 3.5x the
        tokenize-then-pool path of ``encode_reference`` on generated 1 KB rows (75,000 vs 21,000 rows/s, one
        thread; bench/bench_static.py), within ~1e-6 of it (sums per word, then per row, in float32; see the
        kernel's notes). Other rows go through the HF tokenizer and ``embed_pool``: on alpaca_52k those 7-8% of rows
        take ~70% of the time (HF at ~1.5 us per token), so real text gains 1.4x, not 3.5x."""
        from kernels.embed_pool import WordVectorMemo, embed_pool, embed_pool_text

        texts = self._as_array(texts)
        if self.wordpiece is None or len(self.bigram_keys):
            return self.encode_reference(texts)
        import numba

        # One memo chunk per Numba thread (the runner sets 1 per worker process); rebuilt if that count changes.
        chunks = numba.get_num_threads()
        if self.memo is None or self.memo.chunks != chunks:
            self.memo = WordVectorMemo(self.dim, chunks=chunks)
        data, offsets = utf8_view(texts)
        out, fallback = embed_pool_text(self.wordpiece, self.table, self.weights, data, offsets, self.memo)
        rest = np.flatnonzero(fallback)
        if len(rest):
            self.fallback_rows += len(rest)
            ids, starts, counts = self._tokenize_hf(texts.take(pa.array(rest)))
            out[rest] = embed_pool(self.table, self.weights, ids, starts, counts, device="cpu")
        return out

    def encode_reference(self, texts: list[str] | pa.Array) -> np.ndarray:
        """``encode`` as two passes: ``tokenize`` (every token id of every row), then ``embed_pool`` per token.

        With bigram keys (a trained table's ``bigrams.npy``), each row's known token bigrams join its tokens in the
        sum: ``normalize(sum_t F_t + sum_(a,b) G_ab)`` with F and G the table's rows times their weights (the
        bigram rows sit after the vocabulary), pooled by ``pool_with_bigrams``. The fused per-word kernel cannot see
        pairs across words, so this path serves every row then: 13,183 rows/s against the fused path's 15,450 on
        20,000 alpaca rows (1 thread, same run)."""
        from kernels.embed_pool import embed_pool

        ids, starts, counts = self.tokenize(self._as_array(texts))
        if len(self.bigram_keys):
            return pool_with_bigrams(self.table, self.weights, ids, starts, counts, self.bigram_keys, self.vocab)
        return embed_pool(self.table, self.weights, ids, starts, counts, device="cpu")
