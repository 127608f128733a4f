"""``score`` on Ray Data against the local engine, in one run: clean + exact/MinHash dedup + static embeddings
(``--embedder static --no-loss --no-token-count``) on generated documents, the local engine with 1 and 2 worker
processes beside ``--engine ray`` on a local Ray instance with 1 and 2 CPUs. Prints throughput, the Ray / local
ratio at the same worker count, the time split by phase, and a paper estimate of a 100M-row run on a cluster from
the per-stage costs the manifests measured.

Corpus: bench/bench_dedup.py's generator (~1 KB documents, 80% unique, 10% exact copies, 10% near copies), Parquet
shards of 50k rows, generated once, not timed. Every run is a fresh ``cli.py score`` process (Ray's start and stop
included in its wall time: that is what a user waits for).

    python bench/bench_ray.py --docs 200000
    python bench/bench_ray.py --docs 1000000 --nodes 8 --cores 32 --target-rows 100000000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, append_result, print_json

FLAGS = ["--embedder", "static", "--no-loss", "--no-token-count", "--quiet"]


def run(data: Path, out: Path, engine: str, workers: int) -> tuple[float, dict]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "score",
        str(data),
        "--out",
        str(out),
        "--engine",
        engine,
        "--workers",
        str(workers),
        *FLAGS,
    ]
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        sys.exit(f"{engine} x{workers} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    m = json.loads((out / "manifest.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    return wall, m


def estimate(m: dict, wall: float, n: int, target: int, nodes: int, cores: int, ray_overhead: float) -> dict:
    """A 100M-row run on ``nodes`` x ``cores`` from one measured run of ``n`` rows (the local engine, 1 worker, so
    its stage seconds are CPU seconds): the map phase spreads over every core of the cluster (times the measured
    Ray / local overhead), the global phase and finalize run on the driver and scale with rows (finalize's threads
    over ``cores`` instead of this machine's 2)."""
    t = m["timings"]
    stage_cpu = sum(v.get("seconds", 0) for k, v in m["stages"].items() if k in m["stages_run"]["map"])
    map_cpu_per_row = t["map_s"] / n  # 1 worker: wall = CPU (read, stages, write)
    scale = target / n
    map_s = map_cpu_per_row * target / (nodes * cores) * ray_overhead
    glob = {k: round(v * scale, 1) for k, v in t["global_s"].items()}
    fin = t["finalize_s"] * scale * 2 / cores
    return {
        "rows": target, "cluster": f"{nodes} nodes x {cores} cores",
        "measured_on": f"{n:,} rows, local engine, 1 worker",
        "map_cpu_us_per_row": round(map_cpu_per_row * 1e6, 2),
        "map_stage_cpu_us_per_row": {k: round(v["seconds"] / n * 1e6, 2) for k, v in m["stages"].items()
                                     if k in m["stages_run"]["map"] and "seconds" in v},
        "map_read_write_us_per_row": round((t["map_s"] - stage_cpu) / n * 1e6, 2),
        "map_s": round(map_s, 1),
        "global_s_on_driver": glob,
        "finalize_s_on_driver": round(fin, 1),
        "total_s": round(map_s + sum(glob.values()) + fin, 1),
        "assumes": "map scales over every core (Ray overhead factor as measured here); global stages single-node, "
                   "linear in rows; finalize over the driver's cores; shared filesystem bandwidth not limiting",
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=1_000_000, help="generated documents (default 1,000,000)")
    ap.add_argument("--work", default=str(ROOT / "bench" / "_data" / "ray"), help="scratch folder")
    ap.add_argument("--target-rows", type=int, default=100_000_000, help="rows of the paper estimate")
    ap.add_argument("--nodes", type=int, default=8)
    ap.add_argument("--cores", type=int, default=32)
    args = ap.parse_args()
    work = Path(args.work)
    data = work / f"docs_{args.docs}"
    if not (data / "truth.npz").exists():
        shutil.rmtree(data, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "bench_dedup.py"),
                "--generate",
                str(args.docs),
                "--work",
                str(data),
            ],
            check=True,
        )
    results = {}
    for engine, workers in (("local", 1), ("local", 2), ("ray", 1), ("ray", 2)):
        wall, m = run(data, work / f"run_{engine}_{workers}", engine, workers)
        assert m["rows_in"] == args.docs
        results[(engine, workers)] = (wall, m)
        append_result("score_static", f"winnow_{engine}_w{workers}", args.docs, "seconds", wall)
    v = {k: r[1]["verdicts"] for k, r in results.items()}
    assert all(x == v[("local", 1)] for x in v.values()), v  # every engine, the same verdicts
    table = {}
    for (engine, workers), (wall, m) in results.items():
        t = m["timings"]
        table[f"{engine}_w{workers}"] = {
            "wall_s": round(wall, 2), "rows_per_s": round(args.docs / wall),
            "map_s": t["map_s"], "global_s": round(sum(t["global_s"].values()), 2), "finalize_s": t["finalize_s"],
            "startup_and_rest_s": round(wall - t["total_s"], 2),
        }  # fmt: skip
    ratios = {f"ray_vs_local_w{w}": round(results[("ray", w)][0] / results[("local", w)][0], 2) for w in (1, 2)}
    ratios.update({f"ray_vs_local_map_w{w}": round(results[("ray", w)][1]["timings"]["map_s"]
                                                    / results[("local", w)][1]["timings"]["map_s"], 2)
                   for w in (1, 2)})  # fmt: skip
    ratios["ray_w2_vs_w1"] = round(results[("ray", 1)][0] / results[("ray", 2)][0], 2)
    ratios["local_w2_vs_w1"] = round(results[("local", 1)][0] / results[("local", 2)][0], 2)
    wall1, m1 = results[("local", 1)]
    overhead = max(1.0, ratios["ray_vs_local_map_w1"])
    out = {
        "docs": args.docs,
        "machine_load_1min": round(os.getloadavg()[0], 1),
        "runs": table,
        "ratios": ratios,
        "verdicts": v[("local", 1)],
        "estimate": estimate(m1, wall1, args.docs, args.target_rows, args.nodes, args.cores, overhead),
    }
    print_json(out)


if __name__ == "__main__":
    main()
