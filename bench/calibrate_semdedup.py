"""Calibrate the SemDeDup cosine threshold on real instruction sets: nearest-neighbour cosine bands and sample pairs.

    .venv/bin/python bench/calibrate_semdedup.py --embedder minilm --sets alpaca_52k,code_alpaca_2k,gsm8k
    .venv/bin/python bench/calibrate_semdedup.py --embedder static

For each set: every row's nearest neighbour (exact, faiss inner product) and its cosine; counts of rows whose
nearest neighbour is at or above each candidate threshold; ``--show`` sample pairs per band, to read by eye.
Vectors are cached under the user cache dir (bench_cache), so a second run costs seconds. Prints JSON last.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, print_json
from engine.models.embed_cache import user_cache_dir
from engine.stages.embed import EmbedConfig, EmbedStage, embeddings_to_numpy

STR = pa.large_string()
BANDS = [0.85, 0.90, 0.93, 0.95, 0.97, 0.99, 1.001]


def load_set(name: str, rows: int) -> pa.RecordBatch:
    """Canonical-like prompt / response (schema.py's alpaca rule: instruction + "\\n\\n" + input) or text + label."""
    files = sorted((SHARED_DATA / name).glob("train.parquet")) or sorted((SHARED_DATA / name).glob("*.parquet"))
    t = pq.read_table(files[0])
    if rows > 0:
        t = t.slice(0, rows)
    if "instruction" in t.column_names:
        instr = t["instruction"].cast(STR)
        if "input" in t.column_names:
            inp = pc.fill_null(t["input"].cast(STR), "")
            joined = pc.binary_join_element_wise(instr, inp, pa.scalar("\n\n", STR))
            prompt = pc.if_else(pc.equal(pc.binary_length(inp), 0), instr, joined)
        else:
            prompt = instr
        response = pc.fill_null(t["output"].cast(STR), "") if "output" in t.column_names else pa.nulls(len(t), STR)
        label = pa.nulls(len(t), STR)
    else:
        prompt, response = t["text"].cast(STR), t["label_name"].cast(STR)
        label = t["label"].cast(STR).combine_chunks()
    n = len(t)
    return pa.RecordBatch.from_pydict(
        {
            "prompt": prompt.combine_chunks() if isinstance(prompt, pa.ChunkedArray) else prompt,
            "response": response.combine_chunks() if isinstance(response, pa.ChunkedArray) else response,
            "label": label,
            "verdict": pa.array(["kept"] * n, STR),
        }
    )


def embed_set(batch: pa.RecordBatch, embedder: str, threads: int) -> np.ndarray:
    cache = str(user_cache_dir() / "bench_cache")
    stage = EmbedStage(EmbedConfig(embedder=embedder, cache_dir=cache, num_threads=threads))
    out = []
    for s in range(0, batch.num_rows, 2048):
        out.append(embeddings_to_numpy(stage.process(batch.slice(s, 2048)).column("embedding"))[0])
    return np.concatenate(out).astype(np.float32)


def nearest(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    index = faiss.IndexFlatIP(emb.shape[1])
    index.add(emb)
    sims, idx = index.search(emb, 2)
    # Column 0 is usually the row itself; when an exact duplicate ties, it may be the other copy.
    self_first = idx[:, 0] == np.arange(len(emb))
    nn = np.where(self_first, idx[:, 1], idx[:, 0])
    sim = np.where(self_first, sims[:, 1], sims[:, 0])
    return nn, sim


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--embedder", default="minilm", help="minilm | static | PATH")
    ap.add_argument(
        "--sets",
        default="alpaca_52k,code_alpaca_2k,gsm8k,financial_phrasebank",
        help="comma-separated set names, each optionally NAME:ROWS (first ROWS rows)",
    )
    ap.add_argument("--rows", type=int, default=-1, help="rows per set without its own :ROWS (-1 = all)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--show", type=int, default=4, help="sample pairs printed per band")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    summary = {"embedder": args.embedder}
    for spec in args.sets.split(","):
        name, _, rows = spec.partition(":")
        if not (SHARED_DATA / name).exists():
            print(f"skip {name}: absent", file=sys.stderr)
            continue
        batch = load_set(name, int(rows) if rows else args.rows)
        t0 = time.perf_counter()
        emb = embed_set(batch, args.embedder, args.threads)
        secs = time.perf_counter() - t0
        nn, sim = nearest(emb)
        texts_p = batch.column("prompt").to_pylist()
        texts_r = batch.column("response").to_pylist()
        counts = {f">={b:.2f}": int((sim >= b).sum()) for b in BANDS[:-1]}
        summary[name] = {
            "rows": batch.num_rows,
            "embed_s": round(secs, 1),
            "nn_at_or_above": counts,
            "nn_cos_p50": float(np.median(sim)),
            "nn_cos_p99": float(np.quantile(sim, 0.99)),
        }
        print(f"\n=== {name}: {batch.num_rows} rows, embedded in {secs:.1f} s; rows whose NN cos >= t: {counts}")
        for lo, hi in itertools.pairwise(BANDS):
            band = np.flatnonzero((sim >= lo) & (sim < hi) & (np.arange(len(sim)) < nn))
            print(f"--- band [{lo:.2f}, {hi:.2f}): {len(band)} pairs")
            for i in rng.choice(band, min(args.show, len(band)), replace=False) if len(band) else []:
                j = nn[i]
                clip = lambda s: (s or "").replace("\n", " | ")[:160]
                print(
                    f"  cos {sim[i]:.3f}\n    A: {clip(texts_p[i])} => {clip(texts_r[i])}\n"
                    f"    B: {clip(texts_p[j])} => {clip(texts_r[j])}"
                )
    print_json(summary)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()
