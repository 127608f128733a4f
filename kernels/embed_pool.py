"""Weighted mean of token vectors per row, L2-normalised: the static embedding tier's inner loop.

``out[i] = normalize(sum_t w[ids[t]] * table[ids[t]])`` over the tokens ``t`` of row ``i`` (ids[starts[i] :
starts[i] + counts[i]]). Dividing by ``sum w`` does not change the direction, and the rows are L2-normalised, so
the kernels skip it. A row with no tokens (or only zero-weight tokens) gets the zero vector.

Cost: one gather of a (dim,) row per token; 256 float32 = 1 KiB per token, so a 70-token row reads 70 KiB of a
table (30,522 x 256 x 4 B = 31 MB) that stays in L2/L3: the Numba path pooled ~550,000 alpaca rows/s (69 tokens
per row) on 2 shared cores, faster than tokenising them.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from numba import njit, prange


@triton.jit
def _embed_pool_kernel(
    table_ptr,  # (V, D) float32 token vectors
    table_stride,  # elements between rows of the table
    weight_ptr,  # (V,) float32 per-token weight (SIF / Zipf)
    ids_ptr,  # flat int32 token ids
    starts_ptr,  # (N,) int64 first position of each row in ids
    counts_ptr,  # (N,) int64 number of tokens of each row
    out_ptr,  # (N, D) float32 result
    out_stride,  # elements between rows of out
    D,  # embedding width
    BLOCK_D: tl.constexpr,  # power of two >= D
):
    row = tl.program_id(0).to(tl.int64)
    start = tl.load(starts_ptr + row)
    count = tl.load(counts_ptr + row)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for t in tl.range(0, count):
        tok = tl.load(ids_ptr + start + t).to(tl.int64)
        w = tl.load(weight_ptr + tok)
        vec = tl.load(table_ptr + tok * table_stride + cols, mask=mask, other=0.0)
        acc += w * vec
    norm = tl.sqrt(tl.sum(acc * acc, axis=0))
    # A zero row stays zero: 0 / 1e-30 = 0 (tl.where would evaluate 0 / 0 and warn).
    acc = acc / tl.maximum(norm, 1e-30)
    tl.store(out_ptr + row * out_stride + cols, acc, mask=mask)


def embed_pool_triton(
    table: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor
) -> torch.Tensor:
    """Launch one program per row; tensors on the same device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    table = table.float().contiguous()
    n, d = starts.shape[0], table.shape[1]
    out = torch.empty((n, d), dtype=torch.float32, device=table.device)
    if n == 0:
        return out
    _embed_pool_kernel[(n,)](
        table,
        table.stride(0),
        weights.float().contiguous(),
        ids.to(torch.int32).contiguous(),
        starts.to(torch.int64).contiguous(),
        counts.to(torch.int64).contiguous(),
        out,
        out.stride(0),
        d,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out


def embed_pool_reference(
    table: np.ndarray, weights: np.ndarray, ids: np.ndarray, starts: np.ndarray, counts: np.ndarray
) -> np.ndarray:
    """Plain numpy, float64 accumulation: the definition the other paths are tested against."""
    n, d = len(starts), table.shape[1]
    out = np.zeros((n, d), np.float64)
    for i in range(n):
        t = ids[starts[i] : starts[i] + counts[i]]
        v = (weights[t, None].astype(np.float64) * table[t].astype(np.float64)).sum(0)
        nrm = np.linalg.norm(v)
        out[i] = v / nrm if nrm > 0 else v
    return out


@njit(parallel=True, cache=True, fastmath=True)
def embed_pool_numba(table, weights, ids, starts, counts):
    """Numba CPU path: rows in parallel, float32 accumulation (max abs error vs float64 ~1e-6 at 500 tokens)."""
    n = starts.shape[0]
    d = table.shape[1]
    out = np.zeros((n, d), np.float32)
    for i in prange(n):
        acc = np.zeros(d, np.float32)
        s = starts[i]
        for t in range(s, s + counts[i]):
            tok = ids[t]
            w = weights[tok]
            if w == 0.0:
                continue
            for k in range(d):
                acc[k] += w * table[tok, k]
        ss = np.float32(0.0)
        for k in range(d):
            ss += acc[k] * acc[k]
        if ss > 0:
            inv = np.float32(1.0) / np.sqrt(ss)
            for k in range(d):
                out[i, k] = acc[k] * inv
    return out


def embed_pool(table, weights, ids, starts, counts, device: str = "auto") -> np.ndarray:
    """(N, D) float32 L2-normalised weighted means. ``device``: "cpu" (Numba), "cuda" (Triton), "auto"."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("embed_pool(device='cuda') needs a CUDA GPU; pass device='cpu' or 'auto'")
        t = lambda a: torch.as_tensor(np.ascontiguousarray(a)).cuda()
        return embed_pool_triton(t(table), t(weights), t(ids), t(starts), t(counts)).cpu().numpy()
    if device != "cpu":
        raise ValueError(f"embed_pool device must be 'cpu', 'cuda' or 'auto', got {device!r}")
    return embed_pool_numba(
        np.ascontiguousarray(table, dtype=np.float32),
        np.ascontiguousarray(weights, dtype=np.float32),
        np.ascontiguousarray(ids, dtype=np.int32),
        np.ascontiguousarray(starts, dtype=np.int64),
        np.ascontiguousarray(counts, dtype=np.int64),
    )
