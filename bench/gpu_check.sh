#!/usr/bin/env bash
# kernels/xent.py on a CUDA GPU, in one call: the dispatcher's self-check verdict per dtype (which path xent() runs
# on this GPU: "triton", or "triton-failed-check->torch-chunked" with a warning saying what differed), correctness of
# the Triton kernel itself (xent_triton, not the dispatcher, so a fallback cannot hide a wrong kernel) against a
# float64 reference, then
# forward time and peak memory vs naive torch (bf16 logits, float32 cross_entropy(reduction="none"), as HF does)
# and vs Liger-Kernel (fused linear cross-entropy, and its cross-entropy on materialised logits), at T = 8192 and
# 32768 tokens, (V, H) = (49152, 576) (SmolLM2) and (128256, 4096) (Llama 3 8B), bf16 inputs.
#
# Written in a session without a GPU: it has NOT been run yet, and no GPU figure for this kernel exists until it is.
#
#   bash bench/gpu_check.sh                 # from the repository root, with a CUDA torch in $PY's environment
#   PY=.venv/bin/python QUICK=1 bash bench/gpu_check.sh   # correctness + T=8192 only
#
# Liger-Kernel: used if importable; otherwise a wheel at bench/_wheels/liger_kernel-*.whl is installed with --no-deps
# (carry it to an offline machine: `pip download --no-deps liger-kernel -d bench/_wheels`); else its columns are
# skipped with a note. Targets (issue 5): faster than naive torch, at most 1.2x Liger's forward time, at most 1/4 of
# naive torch's peak memory. The last line printed is one JSON object; rows go to bench/results.csv.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
unset TRITON_INTERPRET  # the interpreter would run the kernel on the CPU
if ! $PY -c "import liger_kernel" 2>/dev/null; then
  whl=$(ls bench/_wheels/liger_kernel-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$whl" ]; then
    $PY -m pip install -q --no-deps "$whl" || echo "note: could not install $whl; Liger columns skipped"
  else
    echo "note: liger-kernel not installed and no wheel in bench/_wheels: Liger columns skipped"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

$PY - <<'PYEOF'
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.getcwd())
from bench._common import append_result  # noqa: E402
from kernels import xent as X  # noqa: E402

if not torch.cuda.is_available():
    sys.exit("gpu_check: torch.cuda.is_available() is False; run this on a machine with a CUDA GPU and a CUDA torch")
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

dev = torch.device("cuda")
props = torch.cuda.get_device_properties(dev)
print(f"device {props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}")
quick = os.environ.get("QUICK") == "1"
summary = {"device": props.name, "self_check": [], "correctness": [], "timing": []}

# ---- self-check: what xent(device="cuda") will run on this GPU, per dtype (a failed check also warns on stderr)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    check = X.check_triton(dev, dtype=dtype)
    path = X.xent_path(dev, dtype)
    print(f"self-check {check.describe()} -> xent path: {path}")
    summary["self_check"].append({"key": check.key, "ok": check.ok, "max_abs_err": check.max_abs_err,
                                  "max_rel_err": check.max_rel_err, "error": check.error, "path": path})


def inputs(t, h, v, dtype, seed=0, masked=0.0):
    g = torch.Generator(device=dev).manual_seed(seed)
    hidden = torch.randn(t, h, device=dev, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=dev, generator=g) * (1.0 / h**0.5)).to(dtype)
    target = torch.randint(0, v, (t,), device=dev, generator=g)
    mask = torch.rand(t, device=dev, generator=g) >= masked
    return hidden, weight, target, mask


# ---- correctness: float64 reference on the same (bf16 or fp32) values; irregular shapes, masks, a single row
ok_all = True
for (t, h, v) in [(1000, 576, 49152), (777, 4096, 128256), (1, 64, 997), (4099, 960, 50001)]:
    for dtype, atol in [(torch.float32, 2e-4), (torch.bfloat16, 2e-3)]:
        hid, w, tgt, m = inputs(t, h, v, dtype, seed=t, masked=0.25 if t > 1 else 0.0)
        want = X.xent_reference(hid.double(), w.double(), tgt, m)
        got = X.xent_triton(hid, w, tgt, m)  # the kernel itself, whatever the dispatcher's verdict
        err = float((got.double() - want).abs().max())
        seg = torch.arange(t, device=dev) // 7
        sums, counts = X.xent(hid, w, tgt, m, device="cuda", segment_ids=seg)
        seg_err = float((sums - torch.zeros_like(sums).index_add_(0, seg, want)).abs().max())
        ok = err <= atol and seg_err <= atol * 7 and int(counts.sum()) == int(m.sum())
        ok_all &= ok
        row = {"T": t, "H": h, "V": v, "dtype": str(dtype).split(".")[-1], "max_abs_err": err, "ok": ok}
        summary["correctness"].append(row)
        print(f"check T={t:5d} H={h:4d} V={v:6d} {row['dtype']:8s} max abs err {err:.2e} seg {seg_err:.2e} "
              f"{'ok' if ok else 'FAIL'}")
summary["correct"] = ok_all


# ---- timing and memory
def measure(fn):
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    ms = do_bench(fn, warmup=5, rep=25)
    return ms, peak


def naive(h, w, t):
    return F.cross_entropy((h @ w.T).float(), t, reduction="none")


try:
    from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    liger_flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    liger_ce = LigerCrossEntropyLoss(reduction="none")
except Exception as e:  # noqa: BLE001
    print(f"note: Liger-Kernel unavailable ({type(e).__name__}: {e}); Liger columns skipped")
    liger_flce = liger_ce = None

# A small block sweep at the first shape picks the tiles (the defaults were chosen without a GPU to try them on).
configs = [
    dict(block_t=64, block_v=128, block_h=64, num_warps=4, num_stages=3),
    dict(block_t=128, block_v=128, block_h=64, num_warps=8, num_stages=3),
    dict(block_t=128, block_v=64, block_h=64, num_warps=4, num_stages=4),
    dict(block_t=64, block_v=256, block_h=32, num_warps=8, num_stages=3),
]
best = configs[0]
shapes = [(8192, 49152, 576), (8192, 128256, 4096)] + ([] if quick else [(32768, 49152, 576), (32768, 128256, 4096)])
for k, (t, v, h) in enumerate(shapes):
    hid, w, tgt, _ = inputs(t, h, v, torch.bfloat16, seed=k)
    if k == 0 or (t, v) == (8192, 128256):
        sweep = []
        for cfg in configs:
            try:
                ms = do_bench(lambda: X.xent_triton(hid, w, tgt, **cfg), warmup=3, rep=10)
            except Exception as e:  # noqa: BLE001 - a config that does not fit shared memory
                print(f"  config {cfg} failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            sweep.append((ms, cfg))
            print(f"  sweep T={t} V={v} H={h} {cfg}: {ms:.3f} ms")
        best = min(sweep, key=lambda x: x[0])[1]
    res = {"T": t, "V": v, "H": h, "config": best}
    res["winnow_ms"], res["winnow_peak"] = measure(lambda: X.xent_triton(hid, w, tgt, **best))
    res["naive_ms"], res["naive_peak"] = measure(lambda: naive(hid, w, tgt))
    if liger_flce is not None:
        with torch.no_grad():
            res["liger_flce_ms"], res["liger_flce_peak"] = measure(lambda: liger_flce(w, hid, tgt))
            res["liger_ce_ms"], res["liger_ce_peak"] = measure(lambda: liger_ce((hid @ w.T), tgt))
    flops = 2 * t * v * h
    line = (f"T={t:6d} V={v:6d} H={h:4d} bf16 | winnow {res['winnow_ms']:8.2f} ms {res['winnow_peak'] / 2**30:6.2f} GiB"
            f" ({flops / res['winnow_ms'] / 1e9:6.1f} TFLOP/s) | naive {res['naive_ms']:8.2f} ms "
            f"{res['naive_peak'] / 2**30:6.2f} GiB")
    if "liger_flce_ms" in res:
        line += (f" | liger FLCE {res['liger_flce_ms']:8.2f} ms {res['liger_flce_peak'] / 2**30:6.2f} GiB"
                 f" | liger CE(+logits) {res['liger_ce_ms']:8.2f} ms {res['liger_ce_peak'] / 2**30:6.2f} GiB")
    print(line)
    res["speed_vs_naive"] = res["naive_ms"] / res["winnow_ms"]
    res["memory_vs_naive"] = res["winnow_peak"] / res["naive_peak"]
    if "liger_flce_ms" in res:
        res["time_vs_liger_flce"] = res["winnow_ms"] / res["liger_flce_ms"]
    print(f"    speed vs naive {res['speed_vs_naive']:.2f}x (target > 1), memory vs naive "
          f"{res['memory_vs_naive']:.3f} (target <= 0.25)"
          + (f", time vs Liger FLCE {res['time_vs_liger_flce']:.2f}x (target <= 1.2)" if "liger_flce_ms" in res else ""))
    for prov, key in [("winnow_triton", "winnow"), ("torch_naive", "naive"), ("liger_flce", "liger_flce"),
                      ("liger_ce_logits", "liger_ce")]:
        if f"{key}_ms" in res:
            append_result(f"xent_cuda_V{v}_H{h}", prov, t, "ms", res[f"{key}_ms"])
            append_result(f"xent_cuda_V{v}_H{h}", prov, t, "peak_mib", res[f"{key}_peak"] / 2**20)
    summary["timing"].append(res)
    del hid, w, tgt
    torch.cuda.empty_cache()

summary["paths_used"] = X.xent_paths_used()
for key, path in summary["paths_used"].items():
    print(f"xent path used: {key} -> {path}")
print(json.dumps(summary, default=str, sort_keys=True))
PYEOF
