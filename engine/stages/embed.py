"""Sentence embeddings for every kept row: an encoder tier (all-MiniLM-L6-v2 or any local HF encoder) and a static
tier distilled from the same encoder (model2vec's method) that is >100x faster on CPU.

What is embedded: ``prompt + "\\n" + response`` (the response alone when the prompt is empty: text and
classification rows, whose content is the response). A labelled row whose response is its label (a ``--map`` that
made the label the response) embeds the prompt alone: an embedding that contains the label would let the
label-noise proxy (engine/stages/labels.py) read the given label back instead of judging it from the text.

The embedders live in ``engine/models/``: ``encoder.py`` (``EncoderEmbedder``: mean pooling + L2 norm, exactly
sentence-transformers' for all-MiniLM-L6-v2, token-budget batches, bf16 autocast on a CPU with native bf16),
``static.py`` (``StaticEmbedder``: the distilled per-token table, built once into the user cache dir),
``device.py`` (device and dtype resolution) and ``embed_cache.py`` (the vector cache). This file holds the stage:
its config, which embedder runs (``choose_embedder``), which text each row embeds, and the Arrow column.

Cache: ``OUT/work/embed_cache/<model key>/`` holds (keys, vectors) npy pairs; the key is a 64-bit hash of the exact
text embedded (the content the vector is a function of), the model key names the tier, the weights' fingerprint,
the max length and the dtype. A rerun (or a repeat of the same text) embeds nothing twice.

Importing this file stays cheap (no torch, no transformers): engine.config imports it to build its sections, and
the embedders import their heavy libraries only when constructed.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.models.device import resolve_device
from engine.models.embed_cache import EmbeddingCache
from engine.models.encoder import EncoderEmbedder, default_model_path  # noqa: F401 (re-exported for tests)
from engine.models.static import StaticEmbedder
from engine.registry import Option, Range, check_fields, register
from engine.stage import Stage, kept_mask, set_column
from kernels.strings import hash_strings

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
    # Cache folder; "" = no cache unless the driver sets <run work dir>/embed_cache (it does for cli runs).
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
    # Set by the driver (not an option): hash of the encoder's weight files, so the resume key sees new weights.
    fingerprint: str = ""
    # Folder for distilled static tables; "" = $WINNOW_CACHE or $XDG_CACHE_HOME/winnow or ~/.cache/winnow.
    static_dir: str = ""
    # auto on CPU picks the encoder up to this many rows (at ~50-250 rows/s: 20,000 rows = 2-7 minutes), above it
    # the static tier (28,000-74,000 rows/s measured). -1 = always the encoder.
    auto_cpu_max_rows: int = 20000

    def validate(self) -> None:
        check_fields(
            self,
            "embed",
            max_length=Range(1, also=(-1,)),
            token_budget=Range(1),
            max_batch_rows=Range(1),
            dtype=("auto", "float32", "bfloat16", "float16"),
            num_threads=Range(0),
            static_dim=Range(1),
            static_sif=Range(0, lo_open=True),
            auto_cpu_max_rows=Range(0, also=(-1,)),
        )
        name = self.embedder
        path = name.split(":", 1)[1] if name.startswith("static:") else name
        if name not in ("auto", "none", "minilm", "static") and not os.path.isfile(os.path.join(path, "config.json")):
            what = "a folder without config.json" if os.path.isdir(path) else "not a folder"
            raise ValueError(
                f"--embedder {name}: {path} is {what}; expected auto, none, minilm, static, a local HF "
                "encoder folder or static:FOLDER"
            )
        if self.device == "cuda" and name != "none":
            from engine.stages.loss import _cuda_present  # the loss stage's probe: no torch import without a GPU

            if not _cuda_present({}):
                raise ValueError(
                    "--embed-device cuda: no CUDA GPU here (torch sees none); use --embed-device cpu or auto"
                )


# ---------------------------------------------------------------------------------------------------------------
# Which embedder


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
# Which text each row embeds


def embedding_text(batch: pa.RecordBatch | pa.Table) -> pa.Array:
    """``prompt + "\\n" + response``, the response alone when the prompt is empty, the prompt alone when the response
    is the row's label (see the module docstring)."""
    names = batch.schema.names
    prompt = pc.fill_null(batch.column("prompt").cast(STR), "")
    if "response" not in names:
        return prompt
    response = pc.fill_null(batch.column("response").cast(STR), "")
    both = pc.binary_join_element_wise(prompt, response, pa.scalar("\n", STR))
    # A plain-text row has prompt "" (schema: format text): embed the response alone, not "\n" + response.
    both = pc.if_else(pc.equal(pc.binary_length(prompt), 0), response, both)
    if "label" in names:
        is_label = pc.fill_null(pc.equal(response, batch.column("label").cast(STR)), False)
        both = pc.if_else(is_label, prompt, both)
    if isinstance(both, pa.ChunkedArray):
        both = both.combine_chunks()
    return both


def text_keys(texts: pa.Array) -> np.ndarray:
    """uint64 cache key per row: a hash of the exact UTF-8 bytes embedded."""
    return hash_strings(texts, seed=_KEY_SEED)


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


def model_path(choice: str) -> str:
    """The encoder folder a resolved choice embeds with (the static tier is distilled from it)."""
    if choice in ("minilm", "static"):
        from engine.models.encoder import default_model_path

        try:
            return default_model_path()
        except RuntimeError:
            return ""
    return choice.split(":", 1)[1] if choice.startswith("static:") else choice


def _resolve(config, facts: dict) -> dict:
    """Turn ``embedder = auto`` into the concrete choice once, in the driver (by device and the corpus size), so
    every worker, the resume key and the manifest see the same embedder; point the cache at ``OUT/work``.

    One run folder uses one embedder: the choice ``auto`` made is recorded in ``OUT/work/embedder.json``, and a rerun
    (a resumed or a grown corpus for which ``auto`` would now choose otherwise) keeps it, saying so, so that old and
    new shards never hold vectors of two models. An explicit ``--embedder`` always wins (shards embedded otherwise
    are then redone: the embed section is in the resume key). ``fingerprint`` (set here) is the hash of the encoder's
    weight files (engine/models/fingerprint.py): new weights at the same path redo the shards too."""
    import json

    from engine.models.fingerprint import fingerprint

    sec = config.embed
    requested = sec.embedder
    choice, reason = choose_embedder(requested, facts.get("n_rows"), sec.device, sec.auto_cpu_max_rows)
    record = os.path.join(facts["work_dir"], "embedder.json") if facts.get("work_dir") else None
    earlier = None
    if record and requested == "auto" and os.path.exists(record):
        try:
            with open(record) as f:
                earlier = json.load(f).get("choice")
        except (OSError, ValueError, AttributeError):
            earlier = None
    kept_earlier = bool(earlier) and earlier != choice
    if kept_earlier:
        reason = (
            f"kept {earlier}, the choice of this run folder's earlier run (auto would now choose {choice}: "
            f"{reason}); pass --embedder {choice} to re-embed every shard with it"
        )
        choice = earlier
    sec.embedder = choice
    if choice != "none":
        sec.fingerprint = fingerprint(model_path(choice))
    if not sec.cache_dir and facts.get("work_dir"):
        sec.cache_dir = os.path.join(facts["work_dir"], "embed_cache")
    if record:
        from engine.io.writers import write_json_atomic

        os.makedirs(os.path.dirname(record), exist_ok=True)
        write_json_atomic(Path(record), {"requested": requested, "choice": choice})
    print(f"[embed] embedder = {choice}: {reason}", file=sys.stderr)
    return {
        "choice": choice,
        "reason": reason,
        "tier": embed_tier(choice),
        "fingerprint": sec.fingerprint,
        "kept_earlier_choice": kept_earlier,
    }


def embed_tier(choice: str) -> str:
    """'static' or 'encoder' for a resolved embedder choice (the semantic-dedup threshold depends on it)."""
    return "static" if choice == "static" or choice.startswith("static:") else "encoder"


@register(
    name="embed", kind="map", section="embed", config=EmbedConfig, order=80, columns=(EMBEDDING,),
    enabled=lambda sec, cfg: sec.embedder != "none", resolve=_resolve,
    options=[
        Option("--embedder", "embedder", "auto | none | minilm | static | PATH (local HF encoder) | static:PATH "
               "(default: auto = MiniLM on a GPU or for <= 20,000 rows on CPU, else the static tier; the choice and "
               "why go into the manifest)"),
        Option("--embed-device", "device", "auto | cpu | cuda (default: auto)", allowed=("auto", "cpu", "cuda")),
    ],
)  # fmt: skip
class EmbedStage(Stage):
    """Map stage: adds ``embedding`` (fixed_size_list<halffloat>[dim], null for rows not embedded).

    ``embedder`` should be resolved already (the driver runs ``_resolve``); ``auto`` still works here, choosing for an
    unknown corpus size. The cache goes to ``cache_dir`` (the driver sets ``OUT/work/embed_cache``). With
    ``embedder = "none"`` batches pass unchanged. Stats: rows_embedded (computed now), cache_hits, rows_skipped (not
    kept), tokens / padded_tokens (encoder), dim.
    """

    def __init__(self, config: EmbedConfig | None = None):
        super().__init__(config or EmbedConfig())
        cfg = self.config
        self.choice, self.reason = choose_embedder(cfg.embedder, None, cfg.device, cfg.auto_cpu_max_rows)
        self.embedder = make_embedder(self.choice, cfg)
        self.cache = None
        static = isinstance(self.embedder, StaticEmbedder)
        if self.embedder is not None and cfg.cache and (cfg.cache_static or not static) and cfg.cache_dir:
            self.cache = EmbeddingCache(cfg.cache_dir, self.embedder.model_key, self.embedder.dim)

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
