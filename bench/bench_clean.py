"""Cleaning signals: kernels/text_stats.py (Numba, all threads) against plain Python on the same texts.

Two anchors, both in kernels/text_stats.py and both checked for identical outputs on a sample first:
- ``text_stats_reference``: every signal the kernel computes (character classes via ``unicodedata``, scripts, words,
  lines, n-grams), one text at a time;
- ``gopher_repetition_reference``: only the Gopher repetition rules (duplicate lines, top 2/3/4-gram, duplicated
  5..10-grams) with ``re`` and ``collections.Counter``, the narrower plain-Python implementation the issue names.
The kernel computes all signals in both comparisons. Texts: alpaca_52k's responses (../shared/data) when present,
else generated English-like texts with planted repetition. Target: >= 20x rows/s.

    .venv/bin/python bench/bench_clean.py [--rows N] [--ref-rows N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json
from kernels.text_stats import (
    REPETITION_SIGNALS,
    SIGNALS,
    gopher_repetition_reference,
    text_stats,
    text_stats_reference,
)

STR = pa.large_string()


def load_texts(rows: int, seed: int = 0) -> tuple[list[str], str]:
    path = SHARED_DATA / "alpaca_52k" / "train.parquet"
    if path.exists():
        import pyarrow.parquet as pq

        texts = pq.read_table(path, columns=["output"]).column("output").to_pylist()
        reps = -(-rows // len(texts))
        return (texts * reps)[:rows], "alpaca_52k.output"
    rng = np.random.default_rng(seed)
    vocab = np.array([f"w{i}" for i in range(5000)])
    out = []
    for _ in range(rows):
        words = list(rng.choice(vocab, rng.integers(5, 200)))
        if rng.random() < 0.1:  # planted repetition
            words = words[:10] * 5
        out.append(" ".join(words))
    return out, "generated"


def check_equal(ours: dict, ref: dict, keys) -> int:
    """Number of (row, signal) pairs that differ (fractions: by more than 1e-9)."""
    bad = 0
    for k in keys:
        a, b = np.asarray(ours[k]), np.asarray(ref[k])
        bad += int((~np.isclose(a, b, rtol=0, atol=1e-9)).sum() if a.dtype.kind == "f" else (a != b).sum())
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000, help="texts for the kernel (alpaca_52k repeated)")
    ap.add_argument("--ref-rows", type=int, default=5_000, help="texts for each plain-Python anchor")
    args = ap.parse_args()

    texts, corpus = load_texts(args.rows)
    arr = pa.array(texts, STR)
    nbytes = arr.nbytes
    text_stats(arr.slice(0, 100))  # compile or load from Numba's cache, build the character tables

    t0 = time.perf_counter()
    ours = text_stats(arr)
    t_ours = time.perf_counter() - t0

    sample = texts[: args.ref_rows]
    t0 = time.perf_counter()
    ref_full = text_stats_reference(sample)
    t_full = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref_rep = gopher_repetition_reference(sample)
    t_rep = time.perf_counter() - t0

    # the whole map stage (signals of prompt and response, every rule) on canonical batches of 8,192 rows
    from engine.stages.clean import CleanStage

    stage = CleanStage()
    k = len(texts)
    prompts = pa.array(["Explain the following in a few sentences."] * k, STR)
    canon = pa.RecordBatch.from_arrays(
        [prompts, arr, pa.array(["alpaca"] * k, STR), pa.array(["kept"] * k, STR), pa.nulls(k, STR)],
        names=["prompt", "response", "format", "verdict", "detail"],
    )
    t0 = time.perf_counter()
    for off in range(0, k, 8192):
        stage.process(canon.slice(off, 8192))
    t_stage = time.perf_counter() - t0

    head = {k: v[: len(sample)] for k, v in ours.items()}
    mismatches_full = check_equal(head, ref_full, SIGNALS + ("script_letters",))
    mismatches_rep = check_equal(head, ref_rep, REPETITION_SIGNALS)

    n = len(texts)
    ours_rps = n / t_ours
    full_rps = len(sample) / t_full
    rep_rps = len(sample) / t_rep
    import numba

    result = {
        "op": "clean_text_stats",
        "corpus": corpus,
        "rows": n,
        "ref_rows": len(sample),
        "mb": round(nbytes / 1e6, 2),
        "threads": numba.get_num_threads(),
        "numba_rows_per_s": round(ours_rps),
        "numba_mb_per_s": round(nbytes / 1e6 / t_ours, 1),
        "reference_all_signals_rows_per_s": round(full_rps),
        "reference_gopher_repetition_rows_per_s": round(rep_rps),
        "speedup_vs_all_signals": round(ours_rps / full_rps, 1),
        "speedup_vs_gopher_repetition": round(ours_rps / rep_rps, 1),
        "clean_stage_rows_per_s": round(n / t_stage),
        "mismatches_all_signals": mismatches_full,
        "mismatches_gopher_repetition": mismatches_rep,
        "target_speedup": 20,
    }
    append_result("clean_text_stats", "numba", n, "rows_per_s", float(ours_rps))
    append_result("clean_text_stats", "python_all_signals", len(sample), "rows_per_s", float(full_rps))
    append_result("clean_text_stats", "python_gopher_repetition", len(sample), "rows_per_s", float(rep_rps))
    append_result("clean_text_stats", "numba_vs_python_gopher_repetition", n, "speedup", float(ours_rps / rep_rps))
    append_result("clean_stage", "numba", n, "rows_per_s", float(n / t_stage))
    print_json(result)
    if mismatches_full or mismatches_rep:
        sys.exit(f"outputs differ: {mismatches_full} (all signals), {mismatches_rep} (repetition)")


if __name__ == "__main__":
    main()
