"""Task relevance for ``select --target FILE...``: how close each candidate is to a target set (examples of the task
the fine-tuned model is for), as a weight in [0, 1] that a selector multiplies into its objective or thresholds.

Two scores, either or both (``relevance(kind=...)``):

- **kNN** (``knn_scores``): the mean cosine similarity of a candidate's embedding to its k nearest target rows'
  embeddings (exact search, faiss ``IndexFlatIP`` over the target; the candidates are searched in chunks). Semantic:
  a paraphrase of a target row scores high even with no word in common. The target texts are embedded by the run's
  own embedder (``embed_target_texts``), so the two sets of vectors live in one space. Nearest-neighbour retrieval of
  task data from a pool, seen from the candidate's side: Ivison et al. 2023 ("Data-Efficient Finetuning Using
  Cross-Task Nearest Neighbors") retrieve each target example's nearest pool rows; scoring each candidate by its k
  nearest target rows instead gives every candidate a graded score. The mean over k (not the max) keeps a candidate
  near one odd target row from outranking one near many.
- **DSIR** (``dsir_scores``): Xie et al. 2023, "Data Selection for Language Models via Importance Resampling"
  (NeurIPS 2023). Two bag-of-hashed-n-grams models (word unigrams + bigrams hashed into B buckets,
  ``kernels/ngram_hash.py``), one fitted on the target and one on the raw candidate pool, each a categorical
  distribution over buckets with add-one smoothing: ``p(b) = (c_b + 1) / (sum(c) + B)``. A candidate's log importance
  weight is ``log p_target(x) - log p_raw(x) = sum_b count_b(x) * (log p_target(b) - log p_raw(b))``; here it is
  divided by the candidate's n-gram count (the paper resamples by the raw sum, which grows with length: a long
  off-topic text would outweigh a short on-topic one). Lexical: it needs no embedder, sees every word of a text
  (embedders truncate), and is what to use when the run embedded nothing (``--embedder none``).

Both raw scores have units of their own (a cosine, a mean log ratio), so ``relevance`` turns each into its rank
percentile among the candidates: ``(rank - 1) / (n - 1)`` with ties given their average rank (0 = least relevant
candidate, 1 = most; every candidate tied, or a lone one, is 0.5). Ranks are robust: a few extreme scores (a
duplicate of a target row, a one-word candidate) do not squash the others into a corner as a min-max scaling would,
and the two scores average on one scale (``kind="both"`` = the mean of the two percentiles).

Memory: DSIR is O(B + n) (two int64 count vectors, a float64 log-ratio table, one float32 score per candidate) and
streams the candidate texts twice, batch by batch (first to fit the raw model, then to score), so it needs the
batches as a list or as a factory that makes a fresh iterator (``candidate_text_batches``); the text is the one
exception to "selection never loads text", and it is never held whole. kNN is O(t x d) for the target index plus
O(chunk x (d + k)) for the search (65,536 candidates per chunk: 100 MB at d = 384), and O(n) for the scores.

Target rows are read with winnow's own readers (``read_texts``): any format ``score`` reads, the same canonical
columns, the same normalisation, and the same text as the embed stage embeds (``engine.stages.embed.embedding_text``:
``prompt + "\\n" + response``, the response alone when the prompt is empty).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from engine.errors import UserError
from engine.io.readers import ERROR, discover, read_shard
from engine.io.schema import canonicalize, detect_format
from engine.stage import set_column
from engine.stages.embed import EMBEDDING, EmbedConfig, embedding_text, make_embedder, model_path
from kernels.ngram_hash import DEFAULT_BUCKETS, ngram_score, ngram_totals, texts_view

KINDS = ("knn", "dsir", "both")
STR = pa.large_string()
# Candidates per faiss search call: bounds the float32 copy of a float16 chunk and the (chunk, k) results.
KNN_CHUNK_ROWS = 65536

TextBatch = list[str] | pa.Array
TextBatches = Iterable[TextBatch] | Callable[[], Iterable[TextBatch]]


# ---------------------------------------------------------------------------------------------------------------
# Target rows


def _target_error(path: str, err: Exception) -> UserError:
    """One line naming the target file: ``--target PATH: what is wrong``."""
    msg = " ".join(str(err).split()) or type(err).__name__
    return UserError(f"--target {msg}" if msg.startswith(str(path)) else f"--target {path}: {msg}")


def _shard_texts(
    shard, fmt: str, mapping: dict | None, normalize_form: str | None, batch_rows: int, problems: list[str]
) -> Iterator[pa.Array]:
    """The embedding text of each readable row of one shard; malformed rows are skipped, the first one's detail goes
    to ``problems``."""
    from kernels.normalize import normalize

    found = None
    for batch in read_shard(shard, batch_rows):
        have = [c for c in batch.schema.names if not c.startswith("__")]
        if not have:  # a batch of unreadable lines only
            if not problems and ERROR in batch.schema.names:
                problems.extend(e for e in batch.column(ERROR).drop_null().to_pylist()[:1])
            continue
        if found is None:
            found = detect_format(have, fmt, mapping)
        canon = canonicalize(batch, found, shard.path, mapping)
        kept = pc.equal(canon.column("verdict"), "kept")
        if not problems and not pc.all(kept).as_py():
            problems.append(canon.filter(pc.invert(kept)).column("detail")[0].as_py() or "malformed row")
        canon = canon.filter(kept)
        if canon.num_rows == 0:
            continue
        if normalize_form:  # what the normalize stage did to the candidates' prompt and response
            for col in ("prompt", "response"):
                canon = set_column(canon, col, normalize(canon.column(col), normalize_form))
        yield embedding_text(canon)


def read_texts(
    files: list[str],
    fmt: str = "auto",
    mapping: dict[str, str] | None = None,
    normalize_form: str | None = "NFC",
    batch_rows: int = 8192,
) -> list[str]:
    """The target rows' texts, from files, folders or globs in any format ``score`` reads (jsonl, jsonl.gz, json,
    parquet, arrow), through the project's readers and schema: ``prompt + "\\n" + response``, the response alone
    when the prompt is empty (text and classification rows), after the run's Unicode normalisation
    (``normalize_form``; None = as read). ``fmt`` and ``mapping`` are ``--format`` and ``--map`` (read.format,
    read.map) for targets whose columns are not detected. Rows that cannot be read (malformed) and empty texts are
    skipped.

    A file that does not exist, cannot be read or parsed, has no recognisable format, or holds no usable row is a
    one-line UserError naming it. Memory: the target's text (target sets are small: examples of a task)."""
    out: list[str] = []
    for f in files:
        try:
            shards, _warnings = discover([str(f)])
        except UserError as e:
            raise _target_error(str(f), e) from None
        before = len(out)
        problems: list[str] = []
        for shard in shards:
            try:
                for texts in _shard_texts(shard, fmt, mapping or None, normalize_form, batch_rows, problems):
                    out.extend(t for t in texts.to_pylist() if t)
            except (UserError, pa.ArrowException, OSError, ValueError, EOFError) as e:
                raise _target_error(shard.path, e) from None
        if len(out) == before:
            first = f"; first: {' '.join(problems[0].split())}" if problems else ""
            raise UserError(
                f"--target {f}: holds no usable row (every row is empty or malformed{first}); expected alpaca, "
                "chat, sharegpt, classification or text rows"
            )
    return out


# ---------------------------------------------------------------------------------------------------------------
# DSIR


def _batches(candidate_texts: TextBatches) -> Callable[[], Iterable[TextBatch]]:
    """A factory of fresh iterables over the candidate batches (DSIR reads them twice)."""
    if callable(candidate_texts):
        return candidate_texts
    if isinstance(candidate_texts, pa.ChunkedArray):
        chunks = candidate_texts.chunks
        return lambda: chunks
    if isinstance(candidate_texts, pa.Array):
        return lambda: [candidate_texts]
    if isinstance(candidate_texts, (list, tuple)):
        if candidate_texts and (isinstance(candidate_texts[0], str) or candidate_texts[0] is None):
            return lambda: [candidate_texts]  # one batch of strings, not a list of batches
        return lambda: candidate_texts
    if iter(candidate_texts) is candidate_texts:
        raise TypeError(
            "dsir_scores reads the candidates twice: pass a list of batches or a function returning a "
            "fresh iterator of batches, not a one-shot iterator"
        )
    return lambda: candidate_texts


def _log_probs(counts: np.ndarray) -> np.ndarray:
    """log of the add-one smoothed categorical distribution over buckets: ``(c_b + 1) / (sum(c) + B)``."""
    return np.log(counts + 1.0) - np.log(float(counts.sum()) + len(counts))


def dsir_log_ratio(target_counts: np.ndarray, raw_counts: np.ndarray) -> np.ndarray:
    """float64 (B,): ``log p_target(b) - log p_raw(b)`` per bucket (both add-one smoothed)."""
    return _log_probs(target_counts) - _log_probs(raw_counts)


def dsir_scores(candidate_texts: TextBatches, target_texts: TextBatch, buckets: int = DEFAULT_BUCKETS) -> np.ndarray:
    """float32 (n,): each candidate's DSIR log importance weight per n-gram, ``mean over its hashed n-grams of
    log p_target(b) - log p_raw(b)`` (module docstring). > 0: the candidate's words are more typical of the target than
    of the pool; 0 for a candidate without a word.

    ``candidate_texts``: batches (lists of str or Arrow string arrays), as a list, a ``pa.ChunkedArray``, or a
    function returning a fresh iterable of them (called twice: fit the raw model, then score). ``target_texts``: a
    list of str or a string array. Memory O(B + n); the batches are never concatenated."""
    make = _batches(candidate_texts)
    target = texts_view(target_texts)
    if len(target[1]) <= 1:
        raise ValueError("dsir_scores: the target set is empty")
    target_counts = ngram_totals(*target, buckets=buckets)
    raw_counts = np.zeros(int(buckets), np.int64)
    n_fit = 0
    for batch in make():
        data, offsets = texts_view(batch)
        ngram_totals(data, offsets, out=raw_counts)
        n_fit += len(offsets) - 1
    logratio = dsir_log_ratio(target_counts, raw_counts)
    parts = [ngram_score(*texts_view(batch), logratio).astype(np.float32) for batch in make()]
    out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    if len(out) != n_fit:
        raise ValueError(
            f"dsir_scores: the candidate batches gave {n_fit} rows on the first pass and {len(out)} on "
            "the second; the factory must yield the same batches each time"
        )
    return out


# ---------------------------------------------------------------------------------------------------------------
# kNN


def knn_scores(
    cand_emb: np.ndarray, target_emb: np.ndarray, k: int = 10, chunk_rows: int = KNN_CHUNK_ROWS
) -> np.ndarray:
    """float32 (n,): the mean cosine similarity of each candidate to its ``min(k, t)`` nearest target rows.

    Both arrays hold L2-normalised rows (float16 or float32, as the embed stage and ``embed_target_texts`` make them),
    so the inner product is the cosine; a zero row (a candidate without an embedding) scores 0. Exact search: faiss
    ``IndexFlatIP`` over the t target rows, candidates searched ``chunk_rows`` at a time. Memory O(t x d + chunk_rows
    x (d + k) + n)."""
    import faiss

    cand_emb = np.asarray(cand_emb)
    target = np.ascontiguousarray(target_emb, dtype=np.float32)
    if target.ndim != 2 or target.shape[0] == 0:
        raise ValueError(f"knn_scores: target embeddings must be a non-empty (t, d) array, got shape {target.shape}")
    if cand_emb.ndim != 2 or cand_emb.shape[1] != target.shape[1]:
        raise ValueError(
            f"knn_scores: candidate embeddings {cand_emb.shape} and target embeddings {target.shape} "
            "differ in width: embed both with the run's embedder (embed_target_texts)"
        )
    if k < 1:
        raise ValueError(f"knn_scores: k must be >= 1, got {k}")
    k = min(int(k), target.shape[0])
    index = faiss.IndexFlatIP(target.shape[1])
    index.add(target)
    n = cand_emb.shape[0]
    out = np.zeros(n, np.float32)
    for s in range(0, n, chunk_rows):
        q = np.ascontiguousarray(cand_emb[s : s + chunk_rows], dtype=np.float32)
        sims, _ = index.search(q, k)
        out[s : s + len(q)] = sims.mean(axis=1)
    return out


def _read_manifest(run: Path) -> dict:
    try:
        with open(run / "manifest.json") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{run}: not a winnow run folder (no manifest.json); run `winnow score` first") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{run / 'manifest.json'}: cannot read it ({e})") from None


def _run_embedding_dim(run: Path) -> int | None:
    """The width of the run's ``embedding`` column (from one part's schema), or None without one."""
    parts = sorted((run / "scores").glob("part-*.parquet"))
    if not parts:
        return None
    schema = pq.read_schema(parts[0])
    if EMBEDDING not in schema.names:
        return None
    t = schema.field(EMBEDDING).type
    return t.list_size if pa.types.is_fixed_size_list(t) else None


def embed_target_texts(run_dir: str | Path, texts: list[str] | pa.Array, device: str | None = None) -> np.ndarray:
    """(t, d) float32 L2-normalised embeddings of ``texts`` by the embedder the run used, so that they compare with
    the run's ``embedding`` column (the same vectors the embed stage stores, before its float16 cast).

    The run folder says which: ``manifest.json``'s resolved choice (``resolved.embed.choice``, what ``auto`` became)
    and its ``config.embed`` section (width of the static tier, max length, dtype...). The embedder's weights must be
    the ones the run embedded with (same fingerprint), else the vectors would not be comparable: a UserError says so.
    ``device`` overrides the recorded one (the run may have embedded on a GPU). The vector cache is not used."""
    from engine.models.fingerprint import fingerprint

    run = Path(run_dir)
    m = _read_manifest(run)
    recorded = dict((m.get("config") or {}).get("embed") or {})
    resolved = (m.get("resolved") or {}).get("embed") or {}
    choice = resolved.get("choice") or recorded.get("embedder")
    if not choice or choice == "auto":
        try:
            with open(run / "work" / "embedder.json") as f:
                choice = json.load(f).get("choice")
        except (OSError, ValueError, AttributeError):
            choice = None
    if not choice or choice == "none":
        raise UserError(
            f"{run}: this run embedded nothing (embedder = {choice or 'unknown'}); rerun `winnow score` "
            "with an embedder, or use the lexical relevance (dsir), which needs none"
        )
    fields = {f.name for f in dataclasses.fields(EmbedConfig)}
    cfg = EmbedConfig(**{k: v for k, v in recorded.items() if k in fields})
    cfg.embedder, cfg.cache, cfg.cache_dir = choice, False, ""
    if device is not None:
        cfg.device = device
    want = resolved.get("fingerprint") or recorded.get("fingerprint")
    if want:
        have = fingerprint(model_path(choice))
        if have != want:
            raise UserError(
                f"{run}: the run embedded with {choice} at {want}, but the model at "
                f"{model_path(choice) or '(missing)'} is now {have or 'absent'}: target vectors would not "
                "be comparable; restore those weights or rerun `winnow score`"
            )
    embedder = make_embedder(choice, cfg)
    if not isinstance(texts, (pa.Array, pa.ChunkedArray)):
        texts = pa.array(["" if t is None else t for t in texts], STR)
    vec = (
        np.asarray(embedder.encode(texts), dtype=np.float32) if len(texts) else np.zeros((0, embedder.dim), np.float32)
    )
    dim = _run_embedding_dim(run)
    if dim is not None and dim != vec.shape[1]:
        raise UserError(
            f"{run}: the run's embeddings have width {dim} but {choice} now gives {vec.shape[1]}; rerun "
            "`winnow score` or pass the run's embedder settings"
        )
    return vec


# ---------------------------------------------------------------------------------------------------------------
# Candidates of a run, and the combined weight


def candidate_text_batches(run_dir: str | Path, batch_rows: int = 65536) -> Callable[[], Iterator[pa.Array]]:
    """A factory of fresh iterators over the embedding text of the run's ``kept`` rows, in the order of
    ``sorted(scores/part-*.parquet)`` and of the rows within each part (``candidate_ids`` gives their ids in the
    same order). Reads only prompt, response, label and verdict, ``batch_rows`` at a time."""
    parts = sorted((Path(run_dir) / "scores").glob("part-*.parquet"))

    def batches() -> Iterator[pa.Array]:
        for p in parts:
            f = pq.ParquetFile(p)
            cols = [c for c in ("prompt", "response", "label", "verdict") if c in f.schema_arrow.names]
            for b in f.iter_batches(batch_size=batch_rows, columns=cols):
                b = b.filter(pc.equal(b.column("verdict"), "kept"))
                if b.num_rows:
                    yield embedding_text(b)

    return batches


def candidate_ids(run_dir: str | Path) -> np.ndarray:
    """The ids of the run's ``kept`` rows, in ``candidate_text_batches``' order (object array of str)."""
    out = []
    for p in sorted((Path(run_dir) / "scores").glob("part-*.parquet")):
        t = pq.read_table(p, columns=["id", "verdict"])
        out.append(t.filter(pc.equal(t.column("verdict"), "kept")).column("id").to_numpy(zero_copy_only=False))
    return np.concatenate(out).astype(object) if out else np.zeros(0, object)


def rank_percentile(scores: np.ndarray) -> np.ndarray:
    """float32 (n,) in [0, 1]: ``(rank - 1) / (n - 1)``, ties at their average rank, NaN ranked lowest; 0.5 for every
    row when all tie or n = 1."""
    from scipy.stats import rankdata

    x = np.asarray(scores, np.float64)
    n = len(x)
    if n == 0:
        return np.zeros(0, np.float32)
    if n == 1:
        return np.full(1, 0.5, np.float32)
    r = rankdata(np.where(np.isnan(x), -np.inf, x), method="average")
    return ((r - 1.0) / (n - 1.0)).astype(np.float32)


def relevance(
    kind: str,
    *,
    candidate_texts: TextBatches | None = None,
    target_texts: TextBatch | None = None,
    cand_emb: np.ndarray | None = None,
    target_emb: np.ndarray | None = None,
    k: int = 10,
    buckets: int = DEFAULT_BUCKETS,
) -> np.ndarray:
    """float32 (n,) in [0, 1]: how relevant each candidate is to the target, as a rank percentile among the
    candidates (1 = the most relevant; see the module docstring).

    ``kind``: ``knn`` (needs ``cand_emb`` and ``target_emb``), ``dsir`` (needs ``candidate_texts`` and
    ``target_texts``) or ``both`` (all four; the mean of the two percentiles)."""
    if kind not in KINDS:
        raise ValueError(f"relevance kind must be one of {', '.join(KINDS)}, got {kind!r}")
    pct = []
    if kind in ("knn", "both"):
        if cand_emb is None or target_emb is None:
            raise ValueError(f"relevance({kind!r}) needs cand_emb and target_emb")
        pct.append(rank_percentile(knn_scores(cand_emb, target_emb, k)))
    if kind in ("dsir", "both"):
        if candidate_texts is None or target_texts is None:
            raise ValueError(f"relevance({kind!r}) needs candidate_texts and target_texts")
        pct.append(rank_percentile(dsir_scores(candidate_texts, target_texts, buckets)))
    if len(pct) == 2 and len(pct[0]) != len(pct[1]):
        raise ValueError(f"relevance('both'): {len(pct[0])} candidate embeddings but {len(pct[1])} candidate texts")
    return pct[0] if len(pct) == 1 else ((pct[0] + pct[1]) / 2).astype(np.float32)
