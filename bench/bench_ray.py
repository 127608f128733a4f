"""``score`` on Ray Data against the local engine, in one run: clean + exact/MinHash dedup + static embeddings
(``--embedder static --no-loss --no-token-count``) on generated documents, the local engine with 1 and 2 worker
processes beside ``--engine ray`` on a local Ray instance with 1 and 2 CPUs. Prints throughput, the Ray / local
ratio at the same worker count, the time split by phase, and a paper estimate of a 100M-row run on a cluster from
the per-stage costs the manifests measured.

The paper estimate now counts the global stages Ray distributes (exact dedup's grouping, near dedup's band keys,
buckets and candidate pairs, the label-noise folds) over the cluster's cores, from the Ray run's own split of each
such stage into cluster and driver seconds (``manifest.json`` ``ray.global_split_s``); see ``estimate``.

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


def estimate(m: dict, mr: dict, n: int, target: int, nodes: int, cores: int, ray_overhead: float) -> dict:
    """A ``target``-row run on ``nodes`` x ``cores`` from two measured runs of ``n`` rows: ``m`` the local engine with
    1 worker (its stage seconds are CPU seconds) and ``mr`` the Ray engine with 1 CPU.

    - map phase: the local CPU seconds per row spread over every core of the cluster, times the measured Ray / local
      map overhead;
    - global stages that Ray distributes (exact dedup's grouping, near dedup's band keys / buckets / pairs, the
      label-noise folds): the Ray run's cluster seconds (1 CPU, so CPU seconds, Ray's fixed costs included: an
      upper bound) spread over every core, plus its driver seconds scaled linearly with rows (near dedup's driver
      part is linear in candidate pairs, which grow with rows on this corpus's duplicate rate);
    - the other global stages and the verdict store's load: the local seconds, linear in rows, on one node;
    - finalize: the local seconds over the driver's cores instead of this machine's 2."""
    t = m["timings"]
    split = mr.get("ray", {}).get("global_split_s", {})
    stage_cpu = sum(v.get("seconds", 0) for k, v in m["stages"].items() if k in m["stages_run"]["map"])
    map_cpu_per_row = t["map_s"] / n  # 1 worker: wall = CPU (read, stages, write)
    scale = target / n
    map_s = map_cpu_per_row * target / (nodes * cores) * ray_overhead
    glob: dict[str, dict] = {}
    for k, v in t["global_s"].items():
        if k in split:
            c = split[k].get("cluster", 0.0)
            # label noise records its fold tasks only: the rest of the stage ran on the driver
            d = split[k]["driver"] if "driver" in split[k] else max(0.0, mr["timings"]["global_s"].get(k, 0.0) - c)
            glob[k] = {"cluster_s": round(c * scale / (nodes * cores), 1), "driver_s": round(d * scale, 1),
                       "single_node_s": round(v * scale, 1)}  # fmt: skip
        else:
            glob[k] = {"driver_s": round(v * scale, 1), "single_node_s": round(v * scale, 1)}
    fin = t["finalize_s"] * scale * 2 / cores
    glob_total = sum(g.get("cluster_s", 0) + g["driver_s"] for g in glob.values())
    return {
        "rows": target, "cluster": f"{nodes} nodes x {cores} cores",
        "measured_on": f"{n:,} rows: local engine 1 worker (map, other global stages, finalize), Ray engine 1 CPU "
                       "(the split of its distributed global stages)",
        "map_cpu_us_per_row": round(map_cpu_per_row * 1e6, 2),
        "map_stage_cpu_us_per_row": {k: round(v["seconds"] / n * 1e6, 2) for k, v in m["stages"].items()
                                     if k in m["stages_run"]["map"] and "seconds" in v},
        "map_read_write_us_per_row": round((t["map_s"] - stage_cpu) / n * 1e6, 2),
        "map_s": round(map_s, 1),
        "global": glob,
        "global_s": round(glob_total, 1),
        "global_s_if_all_on_driver": round(sum(g["single_node_s"] for g in glob.values()), 1),
        "finalize_s_on_driver": round(fin, 1),
        "total_s": round(map_s + glob_total + fin, 1),
        "assumes": "map and the distributed global parts scale over every core (Ray overhead as measured here); "
                   "driver parts linear in rows; finalize over the driver's cores; shared filesystem not limiting",
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
    # the 1-worker pair first: if a long run is cut short, its log still has the Ray / local ratio
    for engine, workers in (("local", 1), ("ray", 1), ("local", 2), ("ray", 2)):
        wall, m = run(data, work / f"run_{engine}_{workers}", engine, workers)
        assert m["rows_in"] == args.docs
        results[(engine, workers)] = (wall, m)
        t = m["timings"]
        print(f"{engine} x{workers}: {wall:.1f} s wall ({args.docs / wall:.0f} rows/s), map {t['map_s']} s, global "
              f"{t['global_s']}, finalize {t['finalize_s']} s, ray split {m.get('ray', {}).get('global_split_s')}",
              flush=True)  # fmt: skip
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
    m1 = results[("local", 1)][1]
    overhead = max(1.0, ratios["ray_vs_local_map_w1"])
    out = {
        "docs": args.docs,
        "machine_load_1min": round(os.getloadavg()[0], 1),
        "runs": table,
        "ratios": ratios,
        "verdicts": v[("local", 1)],
        "ray_global_split_s": {f"ray_w{w}": results[("ray", w)][1]["ray"].get("global_split_s") for w in (1, 2)},
        "estimate": estimate(
            m1, results[("ray", 1)][1], args.docs, args.target_rows, args.nodes, args.cores, overhead
        ),
    }
    print_json(out)


if __name__ == "__main__":
    main()
