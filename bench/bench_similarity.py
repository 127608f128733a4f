"""Peak memory and time of the similarity max and facility-location gains: naive full product vs the blocked CPU path.

Shape: n = 200,000 rows of E, m = 2,000 rows of C, d = 384 (a MiniLM / bge-small embedding), float16 inputs computed
in float32 on the CPU. The naive path is what one writes with numpy: ``S = E.astype(f32) @ C.astype(f32).T``
(200,000 x 2,000 x 4 B = 1.6 GB), then ``S.argmax(1)`` and a gather for the max, or ``np.maximum(S - cur, 0).sum(0)``
for the gains (another 1.6 GB for ``S - cur``); it is ``rowmax_sim_reference`` / ``facility_gains_reference`` with
``dtype=np.float32``. Ours is ``rowmax_sim`` / ``facility_gains`` with ``device="cpu"`` (the blocked torch path, 16 MiB
tiles). Work counted in code: ``2 n m d`` FLOPs per call.

How memory is measured (as bench/bench_xent.py): each path runs in a fresh subprocess that loads the inputs, warms up
BLAS on a tiny problem, reads its resident set size (psutil), runs the path once, and reads its peak RSS high-water
mark (``ru_maxrss``). Peak extra memory is ``ru_maxrss - RSS before the call``.

    .venv/bin/python bench/bench_similarity.py              # n = 200,000
    .venv/bin/python bench/bench_similarity.py --n 50000    # a quicker look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import append_result, print_json

M, D = 2000, 384
MODES = ("naive_rowmax", "blocked_rowmax", "naive_gains", "blocked_gains")
WORKERS = ("write_inputs",) + MODES


def _write_inputs(n: int, folder: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for name, rows in (("E", n), ("C", M)):
        x = rng.standard_normal((rows, D), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)  # unit rows, as embeddings are
        np.save(folder / f"{name}.npy", x.astype(np.float16))
    # Coverage of a partial selection: rows' similarity to their nearest of 50 selected rows (~0.13 +- 0.02 here), so
    # the gains' relu keeps some terms and clips others, as in a greedy step.
    e, c = np.load(folder / "E.npy").astype(np.float32), np.load(folder / "C.npy")[:50].astype(np.float32)
    np.save(folder / "cur.npy", (e @ c.T).max(axis=1).astype(np.float32))


def worker(mode: str, folder: Path) -> dict:
    """Run one path in this (fresh) process; report its peak extra RSS and time; save its output."""
    import numpy as np
    import psutil

    from kernels import similarity as S

    E, C, cur = (np.load(folder / f"{x}.npy") for x in ("E", "C", "cur"))
    # A tiny warm-up loads BLAS / MKL code pages and thread pools before the baseline RSS reading.
    S.rowmax_sim_reference(E[:8], C[:64], dtype=np.float32)
    S.rowmax_sim(E[:8], C[:64], device="cpu")
    before = psutil.Process().memory_info().rss
    # Linux keeps the RSS high-water mark across fork + exec: a worker starts with its parent's RSS as its "peak", which
    # would hide a small path's peak (it read 173 MiB for the blocked path when the parent had built the inputs, 44 MiB
    # alone). Hence inputs are written by a worker too and the parent imports nothing heavy; this says if it happens.
    inherited = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    t0 = time.perf_counter()
    if mode == "naive_rowmax":
        out = S.rowmax_sim_reference(E, C, dtype=np.float32)
    elif mode == "blocked_rowmax":
        out = S.rowmax_sim(E, C, device="cpu")
    elif mode == "naive_gains":
        out = (S.facility_gains_reference(E, C, cur, dtype=np.float32),)
    else:
        out = (S.facility_gains(E, C, cur, device="cpu"),)
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    np.savez(folder / f"out_{mode}.npz", *out)
    return {"mode": mode, "peak_extra_bytes": max(0, peak - before), "seconds": dt, "inherited_hw_bytes": inherited}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=200_000, help="rows of E (default 200,000)")
    ap.add_argument("--worker", choices=WORKERS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "write_inputs":
        _write_inputs(args.n, Path(args.folder))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.folder))))
        return

    n = args.n
    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_similarity_") as tmp:
        folder = Path(tmp)
        for mode in WORKERS:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", mode, "--folder", tmp, "--n", str(n)],
                capture_output=True,
                text=True,
                check=True,
            )
            if mode != "write_inputs":
                res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
                if res[mode]["inherited_hw_bytes"] > 16 << 20:
                    print(f"note: {mode} inherited a {res[mode]['inherited_hw_bytes'] / 2**20:.0f} MiB RSS high-water")
        import numpy as np  # only now: the parent stays small while the workers run

        outs = {mode: [v for _, v in sorted(np.load(folder / f"out_{mode}.npz").items())] for mode in MODES}
    v_naive, i_naive = outs["naive_rowmax"]
    v_ours, i_ours = outs["blocked_rowmax"]
    max_abs_val = float(np.abs(v_naive - v_ours).max())
    idx_agree = float((i_naive == i_ours).mean())
    g_naive, g_ours = outs["naive_gains"][0], outs["blocked_gains"][0]
    # Relative to the largest gain: the 50 candidates behind ``cur`` gain ~0 (float32 rounding either side of 0).
    max_rel_gain = float(np.abs(g_naive.astype(np.float64) - g_ours).max() / np.abs(g_naive).max())

    gflop = 2 * n * M * D / 1e9
    print(f"n={n} m={M} d={D} float16 -> float32, CPU")
    summary = {"op": "similarity_cpu", "n": n, "m": M, "d": D}
    for op in ("rowmax", "gains"):
        naive, ours = res[f"naive_{op}"], res[f"blocked_{op}"]
        mem_ratio = ours["peak_extra_bytes"] / max(1, naive["peak_extra_bytes"])
        speed = naive["seconds"] / ours["seconds"]
        for mode, r in ((f"naive_{op}", naive), (f"blocked_{op}", ours)):
            print(
                f"  {mode:15s} peak extra {r['peak_extra_bytes'] / 2**20:8.1f} MiB   {r['seconds']:6.2f} s   "
                f"{gflop / r['seconds']:6.1f} GFLOP/s"
            )
            provider = "numpy_full_product" if mode.startswith("naive") else "winnow_blocked"
            append_result(
                f"{op}_sim_cpu" if op == "rowmax" else "facility_gains_cpu",
                provider,
                n,
                "peak_extra_mib",
                r["peak_extra_bytes"] / 2**20,
            )
            append_result(
                f"{op}_sim_cpu" if op == "rowmax" else "facility_gains_cpu", provider, n, "seconds", r["seconds"]
            )
        print(f"  {op}: memory blocked / naive = {mem_ratio:.4f}, time naive / blocked = {speed:.2f}x")
        summary[f"{op}_naive_peak_extra_mib"] = round(naive["peak_extra_bytes"] / 2**20, 1)
        summary[f"{op}_blocked_peak_extra_mib"] = round(ours["peak_extra_bytes"] / 2**20, 1)
        summary[f"{op}_memory_ratio"] = round(mem_ratio, 4)
        summary[f"{op}_naive_s"] = round(naive["seconds"], 3)
        summary[f"{op}_blocked_s"] = round(ours["seconds"], 3)
        summary[f"{op}_speed_ratio"] = round(speed, 3)
    print(
        f"  agreement: rowmax max |val diff| {max_abs_val:.2e}, idx equal in {idx_agree:.4%} of rows; "
        f"gains max |diff| / max gain {max_rel_gain:.2e}"
    )
    summary.update(
        {"rowmax_max_abs_diff": max_abs_val, "rowmax_idx_agree": idx_agree, "gains_max_rel_diff": max_rel_gain}
    )
    print_json(summary)


if __name__ == "__main__":
    main()
