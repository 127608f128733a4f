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
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

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
def _dot_mode(dtype: torch.dtype) -> int:
    """How the kernel multiplies: float32 inputs use an exact fp32 dot, matching torch's matmul (TF32 off by
    default) to ~1e-6; bf16/fp16 use tensor cores with float32 accumulation. Triton 3.9's interpreter multiplies
    bf16 tiles as raw 16-bit integers (tl.dot of two bf16 16 x 16 tiles came out ~1e10 off, a plain .to(float32)
    of the same tile exact), so under TRITON_INTERPRET=1 half-precision tiles are upcast first."""
    if dtype == torch.float32:
        return 1
    return 2 if os.environ.get("TRITON_INTERPRET") == "1" else 0


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
        DOT_MODE=_dot_mode(hidden.dtype),
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
# Dispatcher
# ---------------------------------------------------------------------------------------------------------------
_CUDA_OVERRIDE: bool | None = None  # tests set this (nanochat's _override_impl) to pretend a GPU is or isn't there


@functools.cache
def _cuda_probe() -> bool:
    return torch.cuda.is_available()


def cuda_available() -> bool:
    """Whether a CUDA GPU can run the Triton kernel; probed once per process, overridable by tests."""
    return _cuda_probe() if _CUDA_OVERRIDE is None else _CUDA_OVERRIDE


def set_cuda_override(value: bool | None) -> None:
    """Pretend a GPU is (True) or is not (False) present; None restores the real probe."""
    global _CUDA_OVERRIDE
    _CUDA_OVERRIDE = value


def resolve_device(device: str, tensor: torch.Tensor | None = None) -> str:
    """``"auto"`` -> ``"cuda"`` when the data is on a GPU, else ``"cpu"``; an explicit ``"cuda"`` needs a GPU."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"xent: device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not cuda_available():
        raise RuntimeError(
            "xent(device='cuda') needs a CUDA GPU, but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}). Use device='auto' or device='cpu' "
            "for the chunked CPU path, or install a CUDA build of torch on a machine with a GPU."
        )
    if device == "auto":
        return "cuda" if tensor is not None and tensor.is_cuda else "cpu"
    return device


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

    ``device``: ``"cuda"`` runs the Triton kernel (inputs are moved to the GPU if needed), ``"cpu"`` the chunked
    torch fallback, ``"auto"`` picks by where ``hidden`` lives. Results come back on ``hidden``'s device.
    """
    where = resolve_device(device, hidden)
    home = hidden.device
    if where == "cuda":
        dev = hidden.device if hidden.is_cuda else torch.device("cuda")
        nll = xent_triton(
            hidden.to(dev),
            weight.to(dev),
            target.to(dev),
            None if mask is None else mask.to(dev),
            ignore_index=ignore_index,
        )
    else:
        cpu = torch.device("cpu")
        nll = xent_chunked(
            hidden.to(cpu),
            weight.to(cpu),
            target.to(cpu),
            None if mask is None else mask.to(cpu),
            ignore_index=ignore_index,
        )
    nll = nll.to(home)
    if segment_ids is None:
        return nll
    if num_segments is None:
        num_segments = int(segment_ids.max()) + 1 if segment_ids.numel() else 0
    keep = target.reshape(-1).to(home) != ignore_index
    if mask is not None:
        keep &= mask.reshape(-1).to(home).bool()
    return segment_sums(nll, segment_ids.to(home), num_segments, keep)
