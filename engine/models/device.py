"""Where a model runs and at what precision: ``device`` (auto | cpu | cuda) and autocast ``dtype`` resolution.

torch is imported inside the functions only: engine.stages.embed imports this module whenever engine.config loads.
"""

from __future__ import annotations


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed device 'cuda' was asked for but torch sees no CUDA GPU; use --embed-device cpu/auto")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"embed device must be auto, cpu or cuda, got {device!r}")
    return device


def cpu_has_native_bf16() -> bool:
    """True when the CPU multiplies bf16 in hardware (Intel AMX or AVX512-BF16); without it bf16 is emulated."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    return False


def resolve_dtype(dtype: str, device: str) -> str:
    if dtype != "auto":
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"embed dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
        return dtype
    if device == "cuda":
        return "float16"
    return "bfloat16" if cpu_has_native_bf16() else "float32"
