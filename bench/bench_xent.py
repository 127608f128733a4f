"""Peak memory and time of the LM head + per-token cross-entropy: naive logits vs kernels.xent's chunked fallback.

Shape: 16 x 1024 tokens, V = 49,152 (SmolLM2), H = 576 (SmolLM2's hidden size), float32 on the CPU. The naive path
is what Cherry LLM / Superfiltering run after ``model(...).logits``: ``logits = h @ W^T`` (16,384 x 49,152 x 4 B =
3.2 GB) then ``cross_entropy(logits, t, reduction="none")`` (its log-softmax holds another 3.2 GB). The backbone is
the same in both paths and left out: this isolates what the kernel changes.

How memory is measured: tracemalloc sees only Python allocations (not torch's C++ buffers), and torch has no
allocator counters on the CPU, so each path runs in a fresh subprocess that allocates its inputs, reads its resident
set size (psutil), runs the path once, and reads the kernel's peak RSS high-water mark (``ru_maxrss``). The path's
peak extra memory is ``ru_maxrss - RSS before the call``: every page the call touched, whoever allocated it.

    .venv/bin/python bench/bench_xent.py            # 16 x 1024 tokens
    .venv/bin/python bench/bench_xent.py --tokens 4096   # a quicker look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import append_result, print_json

V, H = 49152, 576


def _inputs(tokens: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, H, generator=g)
    # Scale 0.05: logits with std ~ 0.05 * sqrt(576) = 1.2, like a trained head's spread.
    weight = torch.randn(V, H, generator=g) * 0.05
    target = torch.randint(0, V, (tokens,), generator=g)
    return hidden, weight, target


def worker(mode: str, tokens: int) -> dict:
    """Run one path in this (fresh) process; report its peak extra RSS, time and a checksum of the NLLs."""
    import psutil
    import torch
    import torch.nn.functional as F

    from kernels.xent import xent_chunked

    hidden, weight, target = _inputs(tokens)
    with torch.no_grad():
        # A tiny warm-up loads MKL / oneDNN code pages before the baseline RSS reading, so they don't count.
        F.cross_entropy(hidden[:8] @ weight[:64].T, target[:8] % 64, reduction="none")
        xent_chunked(hidden[:8], weight[:64], target[:8] % 64)
        before = psutil.Process().memory_info().rss
        t0 = time.perf_counter()
        if mode == "naive":
            nll = F.cross_entropy(hidden @ weight.T, target, reduction="none")
        else:
            nll = xent_chunked(hidden, weight, target)
        dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    torch.save(nll, f"/tmp/bench_xent_{mode}.pt")
    return {"mode": mode, "peak_extra_bytes": max(0, peak - before), "seconds": dt}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=16 * 1024, help="tokens T (default 16 x 1024)")
    ap.add_argument("--worker", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens)))
        return
    res = {}
    for mode in ("naive", "chunked"):
        out = subprocess.run(
            [sys.executable, __file__, "--worker", mode, "--tokens", str(args.tokens)],
            capture_output=True,
            text=True,
            check=True,
        )
        res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    a = torch.load("/tmp/bench_xent_naive.pt")
    b = torch.load("/tmp/bench_xent_chunked.pt")
    max_rel = float(((a - b).abs() / a.abs().clamp_min(1e-6)).max())
    n = args.tokens
    mem_ratio = res["chunked"]["peak_extra_bytes"] / max(1, res["naive"]["peak_extra_bytes"])
    for mode in ("naive", "chunked"):
        provider = "torch_logits_ce" if mode == "naive" else "winnow_chunked"
        append_result("xent_cpu", provider, n, "peak_extra_mib", res[mode]["peak_extra_bytes"] / 2**20)
        append_result("xent_cpu", provider, n, "tokens_per_s", n / res[mode]["seconds"])
    append_result("xent_cpu", "winnow_chunked", n, "memory_ratio_vs_naive", mem_ratio)
    print(f"T={n} V={V} H={H} float32 CPU")
    for mode in ("naive", "chunked"):
        r = res[mode]
        print(
            f"  {mode:8s} peak extra {r['peak_extra_bytes'] / 2**20:9.1f} MiB   {r['seconds']:7.2f} s   "
            f"{n / r['seconds']:9.0f} tokens/s"
        )
    print(f"  memory chunked / naive = {mem_ratio:.4f} (target <= 0.25); max relative NLL difference {max_rel:.2e}")
    print_json(
        {
            "op": "xent_cpu",
            "tokens": n,
            "vocab": V,
            "hidden": H,
            "naive_peak_extra_mib": round(res["naive"]["peak_extra_bytes"] / 2**20, 1),
            "chunked_peak_extra_mib": round(res["chunked"]["peak_extra_bytes"] / 2**20, 1),
            "memory_ratio": round(mem_ratio, 4),
            "naive_s": round(res["naive"]["seconds"], 3),
            "chunked_s": round(res["chunked"]["seconds"], 3),
            "speed_ratio": round(res["naive"]["seconds"] / res["chunked"]["seconds"], 3),
            "max_rel_diff": max_rel,
        }
    )


if __name__ == "__main__":
    main()
