"""Read -> normalise -> write throughput of winnow's map phase vs a plain pyarrow read-and-write (the floor).

Both sides read the same shards and write zstd Parquet in the same run. The floor is the least any tool must do:
``ParquetFile.iter_batches`` (or ``pyarrow.json.read_json``) then ``ParquetWriter.write_batch``. winnow does the
whole map phase: canonical schema (ids, prompt/response), NFC normalisation, basic rules, content hashes, and writes
the input columns *plus* the canonical ones (so it writes more bytes than it reads). Target: >= 50% of the floor.

Also measures peak RSS of ``score`` on 1x and 10x the corpus (bounded memory: within 1.5x of each other).

    python bench/bench_io.py                      # alpaca_52k from ../shared/data if present, else generated
    python bench/bench_io.py --copies 4 --rss     # 4 shards per run; add the 1x/10x peak-RSS check
MB/s counts the Arrow in-memory bytes of the input columns (the data a user means by "the corpus").
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyarrow as pa
import pyarrow.json as pj
import pyarrow.parquet as pq

from bench._common import ROOT, SHARED_DATA, append_result, print_json

DATA = ROOT / "bench" / "_data"


def make_shards(copies: int, kind: str) -> tuple[list[Path], int, int]:
    """``copies`` shards of the base corpus; returns (paths, rows, input Arrow bytes)."""
    src = SHARED_DATA / "alpaca_52k" / "train.parquet"
    if src.exists():
        base = pq.read_table(src)
    else:
        from engine.io.demo import make_demo

        tmp = DATA / "demo"
        make_demo(tmp, n_alpaca=20000)
        base = pa.Table.from_pylist(
            [
                json.loads(x)
                for x in (tmp / "input" / "alpaca.jsonl").read_text().splitlines()
                if x.startswith("{") and '"output": "' in x
            ]
        )
    folder = DATA / f"{kind}_{copies}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    paths = []
    for i in range(copies):
        p = folder / (f"shard-{i:03d}.parquet" if kind == "parquet" else f"shard-{i:03d}.jsonl")
        if kind == "parquet":
            pq.write_table(base, p, compression="zstd")
        else:
            import polars as pl

            pl.from_arrow(base).write_ndjson(p)
        paths.append(p)
    return paths, base.num_rows * copies, base.nbytes * copies


def floor(paths: list[Path], out: Path, kind: str) -> float:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i, p in enumerate(paths):
        if kind == "parquet":
            pf = pq.ParquetFile(p)
            batches = pf.iter_batches(batch_size=8192)
            schema = pf.schema_arrow
        else:
            t = pj.read_json(p)
            batches = t.to_batches(8192)
            schema = t.schema
        with pq.ParquetWriter(out / f"{i}.parquet", schema, compression="zstd", compression_level=1) as w:
            for b in batches:
                w.write_batch(b)
    return time.perf_counter() - t0


def ours(paths: list[Path], out: Path, workers: int) -> float:
    from engine.config import Config
    from engine.run.local import score

    cfg = Config()
    cfg.run.workers = workers
    # This benchmark is the I/O path: read -> canonical schema -> normalise (+ basic rules, content hash) -> write.
    # Cleaning signals, MinHash signatures and embeddings have their own benchmarks (bench_clean, _dedup, _embed).
    cfg.exact.enabled = False
    cfg.run.skip_stages = ["clean", "minhash", "embed"]
    t0 = time.perf_counter()
    score([str(p) for p in paths], out, cfg)
    return time.perf_counter() - t0


def rss_of_score(paths: list[Path], out: Path) -> float:
    """Peak RSS (MiB) of a fresh process scoring ``paths`` (its own plus its workers')."""
    code = (
        f"import sys, json, resource; sys.path.insert(0, {str(ROOT)!r})\n"
        "from engine.config import Config; from engine.run.local import score\n"
        "c = Config(); c.run.workers = 1; c.run.skip_stages = ['clean', 'minhash', 'embed']\n"
        f"score({[str(p) for p in paths]!r}, {str(out)!r}, c)\n"
        "print(json.dumps(max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--copies", type=int, default=4, help="shards per run (copies of the base corpus)")
    ap.add_argument("--rss", action="store_true", help="also measure peak RSS at 1x and 10x")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved repeats; the best time of each is kept")
    args = ap.parse_args()
    result = {}
    for kind in ("parquet", "jsonl"):
        paths, rows, nbytes = make_shards(args.copies, kind)
        runs = DATA / "runs"
        shutil.rmtree(runs, ignore_errors=True)
        # Warm-up (page cache, Numba compile cache) so neither side pays it.
        ours(paths[:1], runs / "warm", 1)
        floor(paths[:1], runs / "warmf", kind)
        # Interleaved repeats, best of each: the machine is shared, so the minimum is the least noisy estimate.
        t_floor = t_ours1 = t_ours = float("inf")
        for rep in range(args.repeat):
            t_floor = min(t_floor, floor(paths, runs / f"floor{rep}", kind))
            t_ours1 = min(t_ours1, ours(paths, runs / f"ours1_{rep}", 1))
            t_ours = min(t_ours, ours(paths, runs / f"ours{rep}", 0))
        for prov, t in (("pyarrow_floor", t_floor), ("winnow_1proc", t_ours1), ("winnow_auto", t_ours)):
            append_result(f"io_{kind}", prov, rows, "rows_per_s", rows / t)
            append_result(f"io_{kind}", prov, rows, "MB_per_s", nbytes / t / 1e6)
        result[kind] = {
            "rows": rows,
            "MB": round(nbytes / 1e6, 1),
            "floor_rows_per_s": round(rows / t_floor),
            "winnow_1proc_rows_per_s": round(rows / t_ours1),
            "winnow_rows_per_s": round(rows / t_ours),
            "floor_MB_per_s": round(nbytes / t_floor / 1e6, 1),
            "winnow_MB_per_s": round(nbytes / t_ours / 1e6, 1),
            "ratio_1proc_vs_floor": round(t_floor / t_ours1, 3),
            "ratio_vs_floor": round(t_floor / t_ours, 3),
        }
        append_result(f"io_{kind}", "winnow_vs_floor", rows, "ratio", t_floor / t_ours)
        shutil.rmtree(runs, ignore_errors=True)
    if args.rss:
        p1, _, _ = make_shards(1, "parquet")
        p10, _, _ = make_shards(10, "parquet")
        r1 = rss_of_score(p1, DATA / "rss1")
        r10 = rss_of_score(p10, DATA / "rss10")
        result["peak_rss_MiB_1x"] = round(r1)
        result["peak_rss_MiB_10x"] = round(r10)
        result["rss_ratio_10x_vs_1x"] = round(r10 / r1, 3)
        append_result("io_rss", "winnow", 10, "rss_ratio_10x_vs_1x", r10 / r1)
        shutil.rmtree(DATA / "rss1", ignore_errors=True)
        shutil.rmtree(DATA / "rss10", ignore_errors=True)
    shutil.rmtree(DATA, ignore_errors=True)
    print_json(result)


if __name__ == "__main__":
    main()
