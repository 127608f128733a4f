"""Forward-only fused linear + cross-entropy: per-token NLL from final hidden states and the LM head.

``nll[t] = logsumexp_v(h[t] . W[v]) - h[t] . W[target[t]]`` for scored tokens, 0 elsewhere, without ever holding the
``[T, V]`` logits. For 16 x 1024 tokens and SmolLM2's 49,152-word vocabulary the naive path (``logits`` then
``cross_entropy(reduction="none")``) holds 16,384 x 49,152 x 4 B = 3.2 GB of float32 logits plus as much again for
the log-softmax inside ``cross_entropy``; here each program keeps a ``[BLOCK_T, BLOCK_V]`` tile and three running
``[BLOCK_T]`` vectors (online logsumexp: running max ``m``, running ``sum exp(logit - m)``, the target's logit).
Measured on the CPU (bench/bench_xent.py, 16 x 1024 tokens, H = 576): naive path 6,167 MiB above its inputs,
``xent_chunked`` 111 MiB (1.8%).

Sections, in the house order: the Triton kernel ``_xent_kernel``; its launcher ``xent_triton``; the plain torch
reference ``xent_reference``; the chunked torch CPU fallback ``xent_chunked`` (the same online-logsumexp algorithm,
tiles of ``chunk_tokens x chunk_vocab``); the segment reduction ``segment_sums`` (per-token NLL -> per-sample sum and
token count); the dispatcher ``xent(..., device="auto")``.

Forward only (Liger-Kernel's fused linear cross-entropy with ``HAS_GRADIENTS`` off): scoring never needs a gradient,
so nothing is saved for backward and every function runs under ``torch.no_grad``.

GPU paths check themselves (DESIGN.md, "Devices and kernels"). The first time the dispatcher would run the Triton
kernel on a device, ``check_triton`` runs it and the float64 reference on a small fixed batch on that device and
compares them; if they differ, or the launch raises, the dispatcher warns (what differed, by how much, what runs
instead) and uses ``xent_chunked`` on that device for the rest of the process. The verdict is cached per device key
``"cuda:<index> <device name> <dtype>"`` (``"cpu:triton-interpreter <dtype>"`` when tests run the kernel under
``TRITON_INTERPRET=1``; ``"cpu <dtype>"`` for the plain CPU path). Public API for the loss stage's manifest:

- ``xent_path(device, dtype=torch.float32) -> str``: the path ``xent`` runs (or ran) for hidden states of ``dtype`` on
  ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``), running the self-check first if that device
  has no verdict yet. One of ``PATHS``: ``"triton"`` (passed its check), ``"torch-chunked"`` (the CPU path, or forced),
  ``"triton-failed-check->torch-chunked"`` (the check failed or raised), ``"triton-unchecked"`` (forced by
  ``set_path_override("triton")``, no check run).
- ``xent_paths_used() -> dict[str, str]``: device key -> path, for every device ``xent`` has run on in this process.
- ``check_triton(device, impl=None, *, dtype=torch.float32) -> XentCheck``: the check itself, with the implementation
  to check as a parameter (default ``xent_triton``), so that tests run it on CPU tensors under the interpreter.
- ``device_key(device, dtype) -> str``: the key above, for looking one device up in ``xent_paths_used()``.
- ``set_path_override(path)``: tests and benchmarks force ``"triton"`` or ``"torch-chunked"``; ``None`` restores the
  checked choice. ``set_cuda_override`` still pretends a GPU is (or is not) there; with it set to ``True`` under
  ``TRITON_INTERPRET=1``, ``xent(..., device="cuda")`` runs the Triton path, self-check included, on CPU tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import PATH_TRITON, PATH_UNCHECKED, Dispatch, device_key, dot_mode
from kernels.dispatch import interpreting as _interpreting

IGNORE_INDEX = -100  # torch's cross_entropy default: a target of -100 is never scored


# ---------------------------------------------------------------------------------------------------------------
# Triton kernel
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _xent_kernel(
    hidden_ptr,  # [T, H] final hidden states, row-major, contiguous (row stride = H)
    weight_ptr,  # [V, H] LM head, row-major, contiguous (row stride = H)
    target_ptr,  # [T] int64 target ids
    mask_ptr,  # [T] int8, 1 = score this token
    max_ptr,  # [T, S] float32 out: max logit over this program's vocabulary slice
    sumexp_ptr,  # [T, S] float32 out: sum over the slice of exp(logit - max)
    tlogit_ptr,  # [T, S] float32 out: the target's logit when it falls in the slice, else 0
    n_tokens,  # T
    vocab,  # V
    hidden,  # H
    v_per_split,  # vocabulary ids per program along grid axis 1 (a multiple of BLOCK_V)
    BLOCK_T: tl.constexpr,  # tokens per program (>= 16 for tl.dot)
    BLOCK_V: tl.constexpr,  # vocabulary ids per tile
    BLOCK_H: tl.constexpr,  # hidden features per tl.dot step
    DOT_MODE: tl.constexpr,  # 0: native dot (bf16/fp16 tensor cores), 1: exact fp32 ("ieee"), 2: upcast, then 1
):
    pid_t = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = offs_t < n_tokens
    scored = tl.load(mask_ptr + offs_t, mask=t_ok, other=0) != 0
    target = tl.load(target_ptr + offs_t, mask=t_ok, other=-1)
    # Running state of the online logsumexp, float32 whatever the input dtype.
    m = tl.full([BLOCK_T], -float("inf"), tl.float32)
    s = tl.zeros([BLOCK_T], dtype=tl.float32)
    t_logit = tl.zeros([BLOCK_T], dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_stop = tl.minimum(v_start + v_per_split, vocab)
    # Unscored rows load zeros: their logits are all 0, harmless, and their output is discarded by the combine.
    row_ok = t_ok & scored
    for v0 in tl.range(v_start, v_stop, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_ok = offs_v < v_stop
        logits = tl.zeros([BLOCK_T, BLOCK_V], dtype=tl.float32)
        for h0 in tl.range(0, hidden, BLOCK_H):
            offs_h = h0 + tl.arange(0, BLOCK_H)
            h_ok = offs_h < hidden
            a = tl.load(
                hidden_ptr + offs_t[:, None] * hidden + offs_h[None, :],
                mask=row_ok[:, None] & h_ok[None, :],
                other=0.0,
            )
            # W^T tile [BLOCK_H, BLOCK_V] read straight from the row-major head: no transposed copy of W.
            b = tl.load(
                weight_ptr + offs_v[None, :] * hidden + offs_h[:, None],
                mask=v_ok[None, :] & h_ok[:, None],
                other=0.0,
            )
            if DOT_MODE == 2:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if DOT_MODE == 0:
                logits = tl.dot(a, b, logits)
            else:
                logits = tl.dot(a, b, logits, input_precision="ieee")
        logits = tl.where(v_ok[None, :], logits, -float("inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        # exp(-inf - finite) = 0 on the first tile; every tile holds >= 1 valid id, so m_new is finite.
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m = m_new
        t_logit += tl.sum(tl.where(offs_v[None, :] == target[:, None], logits, 0.0), axis=1)
    out = offs_t * n_splits + pid_s
    tl.store(max_ptr + out, m, mask=t_ok)
    tl.store(sumexp_ptr + out, s, mask=t_ok)
    tl.store(tlogit_ptr + out, t_logit, mask=t_ok)


def _prepare(hidden, weight, target, mask, ignore_index):
    """Validate shapes and ids, fold ``ignore_index`` into the mask; returns (hidden, weight, target, mask)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"xent: hidden must be [T, H] and weight [V, H] with the same H; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)} (flatten [B, L, H] hidden states with .reshape(-1, H) first)"
        )
    target = target.reshape(-1).to(device=hidden.device, dtype=torch.int64)
    if target.numel() != hidden.shape[0]:
        raise ValueError(f"xent: {target.numel()} targets for {hidden.shape[0]} hidden rows")
    keep = target != ignore_index
    if mask is not None:
        mask = mask.reshape(-1).to(device=hidden.device)
        if mask.numel() != hidden.shape[0]:
            raise ValueError(f"xent: mask has {mask.numel()} entries for {hidden.shape[0]} hidden rows")
        keep &= mask.bool()
    vocab = weight.shape[0]
    bad = keep & ((target < 0) | (target >= vocab))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"xent: target[{i}] = {int(target[i])} is outside the vocabulary [0, {vocab})")
    return hidden, weight, target, keep


# ---------------------------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def xent_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    compact: bool = True,
    block_t: int | None = None,
    block_v: int | None = None,
    block_h: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Per-token NLL ``[T]`` float32 (0 where not scored) with the Triton kernel.

    ``compact`` gathers the scored rows first, so unscored tokens (prompt tokens, padding) cost no head FLOPs.
    Block sizes default to GPU tiles (64 x 128 x 64); under ``TRITON_INTERPRET=1`` each (program x loop iteration)
    costs ~1.4 ms, so tests pass large blocks. ``num_splits`` splits the vocabulary over a second grid axis so that
    few token blocks still fill the GPU: 8,192 tokens / 64 = 128 programs for an H200's 132 SMs is one wave, while
    4 programs per SM hide load latency (flash-decoding's split-K idea); the partial (max, sumexp, target logit)
    triples combine in float32 afterwards.
    """
    hidden, weight, target, keep = _prepare(hidden, weight, target, mask, ignore_index)
    n_all = hidden.shape[0]
    out = torch.zeros(n_all, dtype=torch.float32, device=hidden.device)
    rows = None
    if compact:
        rows = keep.nonzero().squeeze(1)
        if rows.numel() == 0:
            return out
        if rows.numel() < n_all:
            hidden, target, keep = hidden.index_select(0, rows), target.index_select(0, rows), keep[rows]
        else:
            rows = None
    hidden = hidden.contiguous()
    weight = weight.contiguous()
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)
    n_tokens, n_hidden = hidden.shape
    vocab = weight.shape[0]
    block_t = block_t or 64
    block_v = block_v or 128
    block_h = block_h or min(64, max(16, triton.next_power_of_2(n_hidden)))
    n_tblocks = triton.cdiv(n_tokens, block_t)
    n_vblocks = triton.cdiv(vocab, block_v)
    if num_splits is None:
        sms = torch.cuda.get_device_properties(hidden.device).multi_processor_count if hidden.is_cuda else 1
        num_splits = max(1, min(n_vblocks, triton.cdiv(4 * sms, n_tblocks)))
    # Every split gets a whole number of tiles and at least one valid id (no split reads past V).
    v_per_split = triton.cdiv(n_vblocks, max(1, num_splits)) * block_v
    num_splits = triton.cdiv(vocab, v_per_split)
    shape = (n_tokens, num_splits)
    part_max = torch.empty(shape, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty(shape, dtype=torch.float32, device=hidden.device)
    part_tgt = torch.empty(shape, dtype=torch.float32, device=hidden.device)
    _xent_kernel[(n_tblocks, num_splits)](
        hidden,
        weight,
        target,
        keep.to(torch.int8),
        part_max,
        part_sum,
        part_tgt,
        n_tokens,
        vocab,
        n_hidden,
        v_per_split,
        BLOCK_T=block_t,
        BLOCK_V=block_v,
        BLOCK_H=block_h,
        DOT_MODE=dot_mode(hidden.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    m = part_max.amax(dim=1)
    lse = m + torch.log((part_sum * torch.exp(part_max - m[:, None])).sum(dim=1))
    nll = torch.where(keep, lse - part_tgt.sum(dim=1), 0.0)
    if rows is None:
        return nll
    return out.index_copy_(0, rows, nll)


# ---------------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def xent_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """The naive path: full ``[T, V]`` logits, then ``cross_entropy(reduction="none")``; float64 in -> float64 out."""
    hidden, weight, target, keep = _prepare(hidden, weight, target, mask, ignore_index)
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    nll = F.cross_entropy(logits, torch.where(keep, target, 0), reduction="none")
    return torch.where(keep, nll, 0.0)


# ---------------------------------------------------------------------------------------------------------------
# Chunked torch fallback (CPU)
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def xent_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    chunk_tokens: int = 1024,
    chunk_vocab: int = 8192,
) -> torch.Tensor:
    """Per-token NLL ``[T]`` float32 by ``chunk_tokens x chunk_vocab`` tiles with the kernel's online logsumexp.

    Peak extra memory is one float32 tile (1024 x 8192 x 4 B = 32 MiB by default), plus a float32 copy of the head
    when it is not float32 (49,152 x 576 x 4 B = 113 MB for SmolLM2), against 3.2 GB of logits (and as much for the log-softmax) on the
    naive path at 16 x 1024 tokens, V = 49,152. Tiles of 8,192 ids keep the matmul large enough that MKL runs
    near its peak (a [1024, 576] x [576, 8192] GEMM): at 16 x 1024 tokens it took 18.4 s against the naive path's
    39.4 s (which spends its time faulting in 6 GB of fresh pages) on the shared 2-core machine.
    Unscored tokens are gathered out first and cost nothing.
    """
    hidden, weight, target, keep = _prepare(hidden, weight, target, mask, ignore_index)
    out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == 0:
        return out
    h_all = hidden.index_select(0, rows)
    t_all = target.index_select(0, rows)
    vocab = weight.shape[0]
    w32 = [weight[v0 : v0 + chunk_vocab].float() for v0 in range(0, vocab, chunk_vocab)]
    nll = torch.empty(rows.numel(), dtype=torch.float32, device=hidden.device)
    for t0 in range(0, rows.numel(), chunk_tokens):
        h = h_all[t0 : t0 + chunk_tokens].float()
        tgt = t_all[t0 : t0 + chunk_tokens]
        m = torch.full((h.shape[0],), -float("inf"), dtype=torch.float32, device=h.device)
        s = torch.zeros_like(m)
        t_logit = torch.zeros_like(m)
        for k, w in enumerate(w32):
            v0 = k * chunk_vocab
            logits = h @ w.T
            inside = (tgt >= v0) & (tgt < v0 + w.shape[0])
            picked = logits.gather(1, (tgt - v0).clamp(0, w.shape[0] - 1)[:, None]).squeeze(1)
            t_logit += torch.where(inside, picked, 0.0)
            m_new = torch.maximum(m, logits.amax(dim=1))
            # In place: exp(logits - m_new) reuses the tile's memory instead of allocating a second one.
            s = s * torch.exp(m - m_new) + logits.sub_(m_new[:, None]).exp_().sum(dim=1)
            m = m_new
        nll[t0 : t0 + chunk_tokens] = m + torch.log(s) - t_logit
    return out.index_copy_(0, rows, nll)


# ---------------------------------------------------------------------------------------------------------------
# Segment reduction: per-token NLL -> per-sample sums and counts
# ---------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def segment_sums(
    nll: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums float64 ``[num_segments]``, counts int64) of ``nll`` per segment, counting only scored tokens.

    Sums are float64: a 4,096-token response's mean then keeps float32's per-token precision (float32 sums of
    ~4e3 terms lose ~3 digits to rounding, float64 none that matter).
    """
    seg = segment_ids.reshape(-1).to(device=nll.device, dtype=torch.int64)
    if seg.numel() != nll.numel():
        raise ValueError(f"segment_sums: {seg.numel()} segment ids for {nll.numel()} tokens")
    if seg.numel() and (int(seg.min()) < 0 or int(seg.max()) >= num_segments):
        raise ValueError(f"segment_sums: segment ids must lie in [0, {num_segments})")
    counted = torch.ones_like(seg) if mask is None else mask.reshape(-1).to(nll.device).long()
    sums = torch.zeros(num_segments, dtype=torch.float64, device=nll.device)
    sums.index_add_(0, seg, nll.reshape(-1).double() * counted)
    counts = torch.zeros(num_segments, dtype=torch.int64, device=nll.device)
    counts.index_add_(0, seg, counted)
    return sums, counts


# ---------------------------------------------------------------------------------------------------------------
# Self-check of the Triton path on the device it runs on
# ---------------------------------------------------------------------------------------------------------------
DISPATCH = Dispatch("kernels.xent", "torch-chunked", "xent_chunked on the same device")
PATH_CHUNKED = DISPATCH.fallback  # xent_chunked: the CPU path, or forced by set_path_override
PATH_FALLBACK = DISPATCH.failed  # the check failed (or raised): xent_chunked on the same device
PATHS = DISPATCH.paths  # PATH_TRITON, PATH_UNCHECKED (set_path_override("triton")) as in kernels/dispatch.py

# (T, H, V) of the fixed batch. V = 1,283 is prime: its last 128-wide tile holds 3 ids, so a missing vocabulary mask
# shows; H = 80 is one full 64-wide hidden tile plus a ragged one; T = 150 with 30% unscored leaves 105 scored rows,
# two token blocks of 64 after compaction, the second ragged. Under the interpreter (sms = 1) it splits V four ways
# (0.2-0.3 s per check on the 2-core machine); on an H200 eleven ways, one tile each: both exercise the split combine.
# It checks the algorithm and its lowering on this device, not every specialisation Triton compiles (H and V divisible
# by 16 compile another variant): bench/gpu_check.sh covers the production shapes.
CHECK_SHAPE = (150, 80, 1283)
CHECK_SEED = 1283
# The reference is float64 on the same dtype-rounded inputs, so the kernel's only error is float32 accumulation: a
# dot of 80 terms and an online logsumexp over 1,283 ids. Measured under the interpreter: max rel err 1.5e-7 (fp32),
# 0.9e-7 (bf16), 1.2e-7 (fp16) on NLLs of 5.5-138. On the GPU, bf16/fp16 tensor-core products are exact in the
# float32 accumulator and fp32 uses input_precision="ieee" (no TF32); ex2.approx/lg2.approx add ~1e-7 relative.
# rtol = 1e-4 leaves ~500x margin over that noise and still sees small bugs (both planted in the tests): dropping the
# ragged last tile's 3 ids shifts NLLs by 2.3e-4 rel (median) and fails 93 of the 105 rows at 1e-4, but 1 row at the
# usual 1e-3 for logsumexp losses; scoring the masked ids >= V as logit 0 shifts them by up to 1.1e-2.
# atol = 1e-5 only matters for NLLs near 0, which this batch has none of.
CHECK_RTOL = 1e-4
CHECK_ATOL = 1e-5


@dataclass(frozen=True)
class XentCheck:
    """The outcome of ``check_triton`` on one device key."""

    key: str  # the device key the verdict is cached under
    ok: bool  # every position within atol + rtol * |reference|, unscored positions exactly 0, and no exception
    max_abs_err: float  # max |got - reference| over all positions (inf for NaN/inf, or when the launch raised)
    max_rel_err: float  # max |got - reference| / |reference| over the scored positions
    unscored_nonzero: int = 0  # positions that are not scored (masked or ignore_index) but did not come back 0
    error: str | None = None  # "ExceptionType: message" when the implementation raised, else None

    def describe(self) -> str:
        t, h, v = CHECK_SHAPE
        what = f"on a fixed {t} x {h} batch, V = {v}, rtol {CHECK_RTOL:g}, atol {CHECK_ATOL:g}"
        if self.error is not None:
            return f"{self.key}: the launch raised {self.error} ({what})"
        verdict = "matches" if self.ok else "DIFFERS from"
        zeros = f"{self.unscored_nonzero} unscored positions not 0; " if self.unscored_nonzero else ""
        return (
            f"{self.key}: Triton {verdict} the float64 reference (max abs err {self.max_abs_err:.3g}, "
            f"max rel err {self.max_rel_err:.3g}; {zeros}{what})"
        )


def _check_batch(device: torch.device, dtype: torch.dtype):
    """The fixed, seeded batch, drawn on the CPU (the same values on every device), then moved to ``device``."""
    t, h, v = CHECK_SHAPE
    g = torch.Generator().manual_seed(CHECK_SEED)
    hidden = torch.randn(t, h, generator=g)
    # Head scale 1/sqrt(H): logits with std ~1, so a few wrong ids move the logsumexp visibly (see CHECK_RTOL).
    weight = torch.randn(v, h, generator=g) / math.sqrt(h)
    # Three rows with logits of std ~40 (max ~130): exp overflows float32 without the running max.
    hidden[:3] *= 40.0
    target = torch.randint(0, v, (t,), generator=g)
    target[3], target[4] = v - 1, 0  # the last id (in the ragged last tile) and the first
    target[5::11] = IGNORE_INDEX
    mask = torch.rand(t, generator=g) >= 0.2
    mask[:5] = True
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    return tuple(x.to(device) for x in (hidden, weight, target, mask))


@torch.no_grad()
def check_triton(device: torch.device | str, impl=None, *, dtype: torch.dtype = torch.float32) -> XentCheck:
    """Run ``impl`` (default ``xent_triton``, its default launch, as the dispatcher calls it) and ``xent_reference``
    in float64 on the fixed batch on ``device``; compare every position. Never raises for the implementation's sake:
    an exception from ``impl`` is a failed check."""
    device = torch.device(device)
    impl = xent_triton if impl is None else impl
    key = device_key(device, dtype)
    hidden, weight, target, mask = _check_batch(device, dtype)
    want = xent_reference(hidden.double(), weight.double(), target, mask).cpu()
    try:
        got = impl(hidden, weight, target, mask)
        got = got.detach().to("cpu", torch.float64).reshape(-1)
        if got.numel() != want.numel():
            raise ValueError(f"returned {got.numel()} values for {want.numel()} tokens")
    except Exception as e:  # noqa: BLE001 - any failure of the checked path means: do not use it
        return XentCheck(key, False, math.inf, math.inf, error=f"{type(e).__name__}: {str(e)[:300]}")
    err = torch.nan_to_num((got - want).abs(), nan=math.inf)
    scored = (mask & (target != IGNORE_INDEX)).cpu()
    rel = err[scored] / want[scored].abs().clamp_min(1e-30)
    within = err <= CHECK_ATOL + CHECK_RTOL * want.abs()
    nonzero = int((got[~scored] != 0).sum())
    return XentCheck(key, bool(within.all()) and nonzero == 0, float(err.max()), float(rel.max()), nonzero)


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------
cuda_available = DISPATCH.cuda_available
set_cuda_override = DISPATCH.set_cuda_override
set_path_override = DISPATCH.set_path_override
xent_paths_used = DISPATCH.paths_used  # device key -> path, e.g. "cuda:0 NVIDIA H200 bfloat16": "triton"


def _no_gpu_error(what: str) -> RuntimeError:
    return Dispatch.no_gpu_error(
        what,
        "Use device='auto' or device='cpu' for the chunked CPU path, or install a CUDA build of torch on a "
        "machine with a GPU.",
    )


def resolve_device(device: str, tensor: torch.Tensor | None = None) -> str:
    """``"auto"`` -> ``"cuda"`` when the data is on a GPU, else ``"cpu"``; an explicit ``"cuda"`` needs a GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"xent: device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda_available():
        raise _no_gpu_error("xent(device='cuda')")
    if device == "auto":
        return "cuda" if tensor is not None and tensor.is_cuda else "cpu"
    return device


def _triton_device(hidden: torch.Tensor) -> torch.device:
    """Where the GPU branch runs: ``hidden``'s GPU, else the current one. Under ``TRITON_INTERPRET=1`` with
    ``set_cuda_override(True)`` the interpreter's host is the "GPU", so tests reach this branch with CPU tensors."""
    if hidden.is_cuda:
        return hidden.device
    if DISPATCH.cuda_override and _interpreting():
        return torch.device("cpu")
    return torch.device("cuda")


def _gpu_branch_path(dev: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(device key, path) for the GPU branch on ``dev``: the override, else the cached self-check verdict."""
    key = device_key(dev, dtype)
    return key, DISPATCH.gpu_branch_path(key, lambda: check_triton(dev, xent_triton, dtype=dtype), stacklevel=4)


def xent_path(device: torch.device | str, dtype: torch.dtype = torch.float32) -> str:
    """The path ``xent`` runs for ``dtype`` hidden states on ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a
    ``torch.device``): ``"torch-chunked"`` on the CPU; on a GPU the self-checked verdict, running the check now if
    that device has none yet. An explicit GPU without one raises, as ``xent(device="cuda")`` does."""
    dev = torch.device(device)
    if dev.type == "cpu":
        return PATH_CHUNKED
    if dev.type != "cuda":
        raise ValueError(f"xent_path: device must be a CPU or CUDA device, got {str(dev)!r}")
    if not cuda_available():
        raise _no_gpu_error(f"xent_path({str(dev)!r})")
    return _gpu_branch_path(dev, dtype)[1]


@torch.no_grad()
def xent(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    device: str = "auto",
    ignore_index: int = IGNORE_INDEX,
    segment_ids: torch.Tensor | None = None,
    num_segments: int | None = None,
):
    """Per-token NLL ``[T]`` (``reduction="none"``), or per-sample ``(sums, counts)`` when ``segment_ids`` is given.

    ``device``: ``"cuda"`` runs the Triton kernel (inputs are moved to the GPU if needed) once it has passed its
    self-check on that device, else ``xent_chunked`` there; ``"cpu"`` the chunked torch fallback; ``"auto"`` picks by
    where ``hidden`` lives. Results come back on ``hidden``'s device; ``xent_paths_used()`` says which path ran.
    """
    where = resolve_device(device, hidden)
    home = hidden.device
    if where == "cuda":
        dev = _triton_device(hidden)
        key, path = _gpu_branch_path(dev, hidden.dtype)
    else:
        dev = torch.device("cpu")
        key, path = device_key(dev, hidden.dtype, triton_path=False), PATH_CHUNKED
    impl = xent_triton if path in (PATH_TRITON, PATH_UNCHECKED) else xent_chunked
    nll = impl(
        hidden.to(dev),
        weight.to(dev),
        target.to(dev),
        None if mask is None else mask.to(dev),
        ignore_index=ignore_index,
    )
    DISPATCH.record(key, path)
    nll = nll.to(home)
    if segment_ids is None:
        return nll
    if num_segments is None:
        num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    keep = target.reshape(-1).to(home) != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1).to(home).bool()
    return segment_sums(nll, segment_ids.to(home), num_segments, keep)
