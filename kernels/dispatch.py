"""Where a Triton kernel family runs, and whether it may: the GPU probe, the test overrides, the self-check verdicts
and the record of which path ran on which device.

kernels/xent.py and kernels/similarity.py each hold one ``Dispatch``. Both follow DESIGN.md's "Devices and kernels":
the first time a Triton kernel would run on a device, the family's ``check_triton`` runs it against a float64
reference on a small fixed problem there; a kernel that differs (or raises) is replaced by the family's torch path on
the same device for the rest of the process, with one warning. Verdicts are cached per key (``device_key``, prefixed
by the op where a family has several), and ``paths_used()`` maps every key that ran to its path, which the stages
write into their manifests.

The path names are shared: ``"triton"`` (checked), ``"triton-unchecked"`` (forced), the family's own torch path
(``"torch-chunked"``, ``"torch-blocked"``) and ``"triton-failed-check-><torch path>"``.
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections.abc import Callable

import torch

PATH_TRITON = "triton"  # the Triton kernel, which passed its self-check on this device
PATH_UNCHECKED = "triton-unchecked"  # forced (set_path_override("triton") or device="triton"): trusted unchecked


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU (``TRITON_INTERPRET=1``, read when ``@triton.jit`` runs)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def device_key(device: torch.device | str, dtype: torch.dtype, *, triton_path: bool = True) -> str:
    """``"cuda:0 NVIDIA H200 bfloat16"``: device index + name + dtype, the key verdicts and used paths go under;
    ``"cpu:triton-interpreter float16"`` for the Triton path under the interpreter, ``"cpu float32"`` otherwise."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)} {dtype_name(dtype)}"
    if triton_path and interpreting():
        return f"{device.type}:triton-interpreter {dtype_name(dtype)}"
    return f"{device.type} {dtype_name(dtype)}"


def dot_mode(dtype: torch.dtype) -> int:
    """How a kernel multiplies tiles: 1 = exact fp32 dot for float32 inputs (no TF32, matching torch's matmul default
    to ~1e-6); 0 = fp16/bf16 tensor cores with float32 accumulation (their products are exact in float32); 2 = upcast
    half-precision tiles to float32 first, under ``TRITON_INTERPRET=1``: Triton 3.9's interpreter multiplies bf16 tiles
    as raw 16-bit integers (a tl.dot of two bf16 16 x 16 tiles came out ~1e10 off, a plain .to(float32) of the same
    tile exact); fp16 came out right (8e-6 off on a 64 x 64 tile of N(0,1) values) but costs nothing to upcast."""
    if dtype == torch.float32:
        return 1
    return 2 if interpreting() else 0


@functools.cache
def cuda_probe() -> bool:
    """torch's own answer, asked once per process."""
    return torch.cuda.is_available()


class Dispatch:
    """One kernel family's routing state. ``fallback`` is the family's torch path name (``"torch-chunked"``)."""

    def __init__(self, name: str, fallback: str, fallback_what: str):
        self.name = name  # "kernels.xent": the warning's prefix
        self.fallback = fallback
        self.failed = f"triton-failed-check->{fallback}"
        self.fallback_what = fallback_what  # "xent_chunked on the same device": what the warning says runs instead
        self.cuda_override: bool | None = None  # tests pretend a GPU is (True) or is not (False) there
        self.path_override: str | None = None  # tests and benchmarks force "triton" or the fallback on the GPU branch
        self.verdicts: dict[str, str] = {}  # key -> path chosen by the self-check, once per process
        self.used: dict[str, str] = {}  # key -> path that ran there
        self.lock = threading.Lock()  # two threads' first calls on one device run one check, and warn once

    @property
    def paths(self) -> tuple[str, str, str, str]:
        return PATH_TRITON, self.fallback, self.failed, PATH_UNCHECKED

    def cuda_available(self) -> bool:
        """Whether a CUDA GPU can run the Triton kernels; probed once per process, overridable by tests."""
        return cuda_probe() if self.cuda_override is None else self.cuda_override

    def set_cuda_override(self, value: bool | None) -> None:
        """Pretend a GPU is (True) or is not (False) present; None restores the real probe. With True under
        ``TRITON_INTERPRET=1`` the GPU branch (self-check included) runs on CPU tensors."""
        self.cuda_override = value

    def set_path_override(self, path: str | None) -> None:
        """Force the GPU branch's path: ``"triton"`` (no self-check; recorded as ``"triton-unchecked"``) or the
        family's torch path; None restores the self-checked choice. The CPU branch always runs the torch path."""
        if path not in (None, PATH_TRITON, self.fallback):
            raise ValueError(
                f"set_path_override: path must be None, {PATH_TRITON!r} or {self.fallback!r}, got {path!r}"
            )
        self.path_override = path

    def paths_used(self) -> dict[str, str]:
        """Key -> path for every key that ran in this process (a copy)."""
        with self.lock:
            return dict(self.used)

    def record(self, key: str, path: str) -> None:
        with self.lock:
            self.used[key] = path

    def gpu_branch_path(self, key: str, run_check: Callable[[], object], *, stacklevel: int) -> str:
        """The GPU branch's path for ``key``: the override, else the cached verdict of ``run_check()`` (an object
        with ``ok`` and ``describe()``), running it once and warning when it fails."""
        if self.path_override is not None:
            return PATH_UNCHECKED if self.path_override == PATH_TRITON else self.fallback
        with self.lock:
            path = self.verdicts.get(key)
            if path is None:
                check = run_check()
                path = PATH_TRITON if check.ok else self.failed
                if not check.ok:
                    warnings.warn(
                        f"{self.name}: the Triton kernel failed its self-check: {check.describe()}. Using "
                        f"{self.fallback} ({self.fallback_what}) for {key} for the rest of this process; the paths "
                        f"used record it as {self.failed!r}.",
                        RuntimeWarning,
                        stacklevel=stacklevel + 1,
                    )
                self.verdicts[key] = path
        return path

    @staticmethod
    def no_gpu_error(what: str, instead: str) -> RuntimeError:
        return RuntimeError(
            f"{what} needs a CUDA GPU, but torch.cuda.is_available() is False (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda}). {instead}"
        )
