"""Selection at scale, side by side with the anchors in one run.

    python bench/bench_select.py --part anchors   # n = 10k, 50k, k = 1,000: winnow vs apricot, submodlib, SemHash
    python bench/bench_select.py --part scale     # n = 1M, 384-d float16, k = 100k: facility, kcenter, stratified
    python bench/bench_select.py --part greedi    # n = 10M (memory-mapped) via GreeDi partitions vs 1M centralised

Embeddings: bench/select_data.py's Gaussian mixture on the sphere (uneven cluster sizes, intra-cluster cosine about
0.6-0.8). Every selection is scored with the same dense yardstick, bench/select_anchors.py's
``facility_objective`` (sum_j max_{i in S} max(0, cos)), and ``kcenter_radius``. The anchors run in their own venv
(bench/select_anchors.py; ANCHOR_PYTHON) in a child process under a 16 GiB address-space cap, so a dense matrix that
cannot fit fails cleanly; that failure is reported, not hidden. Ratios print as anchor / winnow (time, memory) and
winnow / anchor (objective). Rows go to bench/results.csv.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import append_result
from bench.select_anchors import facility_objective, kcenter_radius, run_anchor
from bench.select_data import clustered_embeddings, write_memmap


def _winnow_child(emb_path: str, k: int, method: str, parts: int, epsilon: float, out: str) -> None:
    """Run one winnow selector in this (fresh) process, so that its peak RSS is its own."""
    import faiss  # noqa: F401 - imports and Numba's cached machine code load before the clock starts
    import torch  # noqa: F401

    from engine.select import base
    from engine.select.base import Candidates
    from engine.select.budget import Limits
    from engine.select.greedi import greedi

    warm = Candidates(
        np.arange(300), np.full(300, 0.5, np.float32), np.ones(300), emb=clustered_embeddings(300, 384, seed=1)
    )
    t0 = time.perf_counter()
    emb = np.load(emb_path, mmap_mode="r")
    n = emb.shape[0]
    if parts <= 1:
        emb = np.ascontiguousarray(emb)
    cfg = SimpleNamespace(
        quality_weight=0.0,
        neighbours=16,
        epsilon=epsilon,
        tau=0.9,
        kcenter="auto",
        score="",
        ascending=False,
        strata_rows=10,
    )
    sel = base.get(method)(cfg, seed=0)
    sel.select(warm, 30, Limits.none(300))
    cands = Candidates(np.arange(n), np.full(n, 0.5, np.float32), np.ones(n), emb=emb)
    t1 = time.perf_counter()
    if parts > 1:
        got = greedi(sel, cands, k, Limits.none(n), parts, contiguous=True)
    else:
        got = sel.select(cands, k, Limits.none(n))
    secs = time.perf_counter() - t1
    info = {a: b for a, b in got.info.items() if a != "partition_runs"}
    Path(out).write_text(
        json.dumps(
            {
                "selected": got.order.tolist(),
                "seconds": secs,
                "seconds_load": t1 - t0,
                "info": info,
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def run_winnow(emb_path: str, k: int, method: str, parts: int = 1, epsilon: float = 0.0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "r.json")
        subprocess.run(
            [sys.executable, __file__, "--_child", emb_path, str(k), method, str(parts), str(epsilon), out], check=True
        )
        return json.loads(Path(out).read_text())


def _score(emb: np.ndarray, sel) -> tuple[float, float]:
    return facility_objective(emb, sel), kcenter_radius(emb, sel)


def part_anchors(sizes=(10_000, 50_000), k=1000, semhash_k=(1000, 10_000)) -> None:
    for n in sizes:
        emb = clustered_embeddings(n, 384, seed=0)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "emb.npy")
            np.save(path, emb)
            w = run_winnow(path, k, "facility")
            wf, wr = _score(emb, w["selected"])
            print(
                f"n={n:,} k={k:,} winnow facility: {w['seconds']:.2f} s, {w['peak_rss_mib']:.0f} MiB, "
                f"objective {wf:.1f}, k-center radius {wr:.4f}, graph {w['info'].get('graph')}"
            )
            kc = run_winnow(path, k, "kcenter")
            kf, kr = _score(emb, kc["selected"])
            print(
                f"n={n:,} k={k:,} winnow kcenter ({kc['info'].get('path')}): {kc['seconds']:.2f} s, objective "
                f"{kf:.1f}, k-center radius {kr:.4f}"
            )
            append_result("select_kcenter", "winnow", n, "seconds", kc["seconds"])
            append_result("select_kcenter", "winnow", n, "radius", kr)
            append_result("select_facility", "winnow", n, "seconds", w["seconds"])
            append_result("select_facility", "winnow", n, "peak_rss_mib", w["peak_rss_mib"])
            append_result("select_facility", "winnow", n, "objective", wf)
            for anchor in ("apricot", "submodlib"):
                a = run_anchor(path, k, anchor)
                if a.get("error"):
                    print(f"  {anchor}: cannot run n={n:,}: {a['error']}")
                    append_result("select_facility", anchor, n, "error", float("nan"))
                    continue
                af = a["facility_objective"]
                print(
                    f"  {anchor}: {a['seconds']:.2f} s, {a['peak_rss_mib']:.0f} MiB, objective {af:.1f} -> "
                    f"winnow/anchor objective {wf / af:.4f}, speed-up {a['seconds'] / w['seconds']:.1f}x, "
                    f"memory {a['peak_rss_mib'] / w['peak_rss_mib']:.1f}x"
                )
                for metric, v in (("seconds", a["seconds"]), ("peak_rss_mib", a["peak_rss_mib"]), ("objective", af)):
                    append_result("select_facility", anchor, n, metric, v)
                append_result("select_facility", f"{anchor}_over_winnow", n, "speedup", a["seconds"] / w["seconds"])
            for ks in semhash_k:
                if ks >= n:
                    continue
                w2 = w if ks == k else run_winnow(path, ks, "facility")
                wf2 = wf if ks == k else facility_objective(emb, w2["selected"])
                a = run_anchor(path, ks, "semhash")
                if a.get("error"):
                    print(f"  semhash k={ks:,}: {a['error']}")
                    continue
                print(
                    f"  semhash k={ks:,}: {a['seconds']:.2f} s, objective {a['facility_objective']:.1f}; winnow "
                    f"{w2['seconds']:.2f} s, objective {wf2:.1f} -> coverage ratio "
                    f"{wf2 / a['facility_objective']:.3f}"
                )
                append_result(f"select_semhash_k{ks}", "semhash", n, "objective", a["facility_objective"])
                append_result(f"select_semhash_k{ks}", "semhash", n, "seconds", a["seconds"])
                append_result(f"select_semhash_k{ks}", "winnow", n, "objective", wf2)
                append_result(f"select_semhash_k{ks}", "winnow", n, "seconds", w2["seconds"])


def part_scale(n=1_000_000, k=100_000, methods=("facility", "kcenter", "stratified")) -> None:
    emb = clustered_embeddings(n, 384, seed=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "emb.npy")
        np.save(path, emb)
        del emb
        for method in methods:
            w = run_winnow(path, k, method)
            print(
                f"n={n:,} k={k:,} {method}: {w['seconds']:.1f} s, peak {w['peak_rss_mib'] / 1024:.2f} GiB, {w['info']}"
            )
            append_result(f"select_{method}_scale", "winnow", n, "seconds", w["seconds"])
            append_result(f"select_{method}_scale", "winnow", n, "peak_rss_mib", w["peak_rss_mib"])


def part_greedi(n=10_000_000, k=100_000, parts=10, folder="bench/_data/select") -> None:
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"emb_{n}.npy")
    if not os.path.exists(path):
        write_memmap(path, n, 384, seed=0)
    w = run_winnow(path, k, "facility", parts=parts, epsilon=0.0)
    print(
        f"n={n:,} k={k:,} facility via {parts} GreeDi partitions: {w['seconds']:.1f} s, peak "
        f"{w['peak_rss_mib'] / 1024:.2f} GiB, union {w['info'].get('union_rows')}"
    )
    append_result("select_facility_greedi", "winnow", n, "seconds", w["seconds"])
    append_result("select_facility_greedi", "winnow", n, "peak_rss_mib", w["peak_rss_mib"])
    # objective vs the centralised greedy, on the first 1M rows (the dense yardstick cannot run at 10M)
    m = 1_000_000
    sub = np.ascontiguousarray(np.load(path, mmap_mode="r")[:m])
    with tempfile.TemporaryDirectory() as tmp:
        p1 = os.path.join(tmp, "emb.npy")
        np.save(p1, sub)
        central = run_winnow(p1, k // 10, "facility")
        part = run_winnow(p1, k // 10, "facility", parts=parts)
    fc, fp = facility_objective(sub, central["selected"]), facility_objective(sub, part["selected"])
    print(
        f"n={m:,} k={k // 10:,}: GreeDi ({parts} partitions) objective {fp:.1f} vs centralised {fc:.1f} -> "
        f"{fp / fc:.4f}; {part['seconds']:.1f} s vs {central['seconds']:.1f} s"
    )
    append_result("select_facility_greedi_vs_central", "winnow", m, "objective_ratio", fp / fc)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _winnow_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), float(sys.argv[6]), sys.argv[7])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["anchors", "scale", "greedi"], default="anchors")
    ap.add_argument("--n", type=int, default=0)
    ap.add_argument("--k", type=int, default=0)
    ap.add_argument("--methods", default="facility,kcenter,stratified", help="--part scale: the selectors to time")
    a = ap.parse_args()
    if a.part == "anchors":
        part_anchors()
    elif a.part == "scale":
        part_scale(a.n or 1_000_000, a.k or 100_000, tuple(a.methods.split(",")))
    else:
        part_greedi(a.n or 10_000_000, a.k or 100_000)


if __name__ == "__main__":
    main()
