"""Dot-product similarity reductions over rows of two embedding matrices, without the ``n x m`` product.

Two operations, both over ``E`` (n, d) and ``C`` (m, d) (float16, bfloat16 or float32; numpy arrays or torch tensors,
and the result comes back as the same kind, on ``E``'s device):

- ``rowmax_sim(E, C) -> (vals float32 (n,), idx int64 (n,))``: ``vals[i] = max_j <E_i, C_j>`` and ``idx[i]`` the
  lowest ``j`` reaching it (ties go to the lowest ``j``); ``m = 0`` gives ``vals = -inf``, ``idx = -1``. With ``C``
  the selected set, ``vals`` is each row's coverage and ``idx`` its nearest selected row (k-center, facility location).
- ``facility_gains(E, C, cur) -> float32 (m,)``: ``gains[c] = sum_i max(0, <E_i, C_c> - cur[i])``: facility
  location's marginal gain of adding candidate ``c`` given the current coverage ``cur`` (n,) (0 or the ``vals`` of
  ``rowmax_sim`` against the selected set).

Memory: the naive path holds the ``n x m`` float32 product: 200,000 x 2,000 x 4 B = 1.6 GB (and, for the gains, a
second array as large for ``max(0, P - cur)``). Here the Triton kernels keep one ``[BLOCK_N, BLOCK_M]`` float32 tile per
program and write ``n x S`` (rowmax) or ``m x S`` (gains) partials, ``S`` the number of splits of the reduced axis;
the blocked torch path holds one ``block_rows x block_cols`` float32 tile (16 MiB by default), one ``block_rows x d``
float32 block of ``E`` and a float32 copy of ``C`` when ``C`` is not float32 (2,000 x 384 x 4 B = 3 MB).

Sections, in the house order: the Triton kernels ``_rowmax_sim_kernel`` and ``_facility_gains_kernel`` (sharing the
tile product ``_sim_tile``); their launchers ``rowmax_sim_triton`` / ``facility_gains_triton``; the references
``rowmax_sim_reference`` / ``facility_gains_reference`` (numpy, full product, float64 by default); the blocked
torch paths ``rowmax_sim_blocked`` / ``facility_gains_blocked`` (the CPU path: BLAS GEMMs on tiles, with the kernels'
running max / running sum; also the fallback on a GPU whose Triton check failed); the self-check; the dispatchers
``rowmax_sim(..., device="auto")`` / ``facility_gains(..., device="auto")``. No Numba kernel: the work is a GEMM and
BLAS already runs it near peak; a hand-written loop would be slower.

``device``: ``"cpu"`` the blocked path on the CPU; ``"cuda"`` the Triton kernel on the GPU once it has passed its
self-check there (inputs are moved to the GPU and results moved back), else the blocked path on the GPU; ``"auto"``
(default) ``"cuda"`` when a CUDA GPU is present (numpy and CPU inputs are movable), else ``"cpu"``; ``"triton"`` the
Triton kernel with no self-check (recorded as ``"triton-unchecked"``), on the GPU if there is one, else on CPU tensors,
which needs ``TRITON_INTERPRET=1`` set before ``kernels.similarity`` is imported (tests/conftest.py does).

GPU paths check themselves (DESIGN.md, "Devices and kernels"), as in kernels/xent.py: the first time the dispatcher
would run a Triton kernel on a device, ``check_triton`` runs it and the float64 reference on a small fixed problem
on that device; if they differ, or the launch raises, the dispatcher warns (what differed, by how much, what runs
instead) and uses the blocked path on that device for the rest of the process. Verdicts are cached per
``"<op> <device key>"``, the device key as in xent: ``"cuda:0 NVIDIA H200 float16"``, ``"cpu:triton-interpreter
float16"`` under the interpreter with ``set_cuda_override(True)``, ``"cpu float16"`` on the plain CPU path.
``similarity_paths_used()`` maps each such key to the path that ran there.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kernels.dispatch import PATH_TRITON, PATH_UNCHECKED, Dispatch, cuda_probe, device_key, dot_mode
from kernels.dispatch import interpreting as _interpreting

OPS = ("rowmax_sim", "facility_gains")


# ---------------------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------------------
@triton.jit
def _sim_tile(
    e_ptr,  # (n, d) rows of E, unit inner stride
    c_ptr,  # (m, d) rows of C, unit inner stride
    offs_n,  # [BLOCK_N] int64 row ids of E in this tile
    offs_m,  # [BLOCK_M] int64 row ids of C in this tile
    n_ok,  # [BLOCK_N] offs_n < n
    m_ok,  # [BLOCK_M] offs_m < m (or < the split's end)
    dim,  # d
    stride_e,  # elements between rows of E
    stride_c,  # elements between rows of C
    BLOCK_N: tl.constexpr,  # rows of E per tile (>= 16 for tl.dot)
    BLOCK_M: tl.constexpr,  # rows of C per tile (>= 16)
    BLOCK_D: tl.constexpr,  # features per tl.dot step (>= 16)
    DOT_MODE: tl.constexpr,  # 0: native dot (fp16/bf16 tensor cores), 1: exact fp32 ("ieee"), 2: upcast, then 1
):
    """[BLOCK_N, BLOCK_M] float32 tile of E @ C^T; rows/columns outside the masks read zeros (their dots are 0)."""
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for d0 in tl.range(0, dim, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_ok = offs_d < dim
        a = tl.load(
            e_ptr + offs_n[:, None] * stride_e + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0
        )
        # C^T tile [BLOCK_D, BLOCK_M] read straight from the row-major C: no transposed copy.
        b = tl.load(
            c_ptr + offs_m[None, :] * stride_c + offs_d[:, None], mask=m_ok[None, :] & d_ok[:, None], other=0.0
        )
        if DOT_MODE == 2:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if DOT_MODE == 0:
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, input_precision="ieee")
    return acc


@triton.jit
def _rowmax_sim_kernel(
    e_ptr,  # (n, d) E
    c_ptr,  # (m, d) C
    val_ptr,  # (n, S) float32 out: max over this program's slice of C
    idx_ptr,  # (n, S) int64 out: the lowest j in the slice reaching it
    n_rows,  # n
    m_rows,  # m
    dim,  # d
    stride_e,  # elements between rows of E
    stride_c,  # elements between rows of C
    m_per_split,  # rows of C per program along grid axis 1 (a multiple of BLOCK_M)
    BLOCK_N: tl.constexpr,  # rows of E per program
    BLOCK_M: tl.constexpr,  # rows of C per tile
    BLOCK_D: tl.constexpr,  # features per tl.dot step
    DOT_MODE: tl.constexpr,  # see _sim_tile
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < n_rows
    best = tl.full([BLOCK_N], -float("inf"), tl.float32)
    best_j = tl.full([BLOCK_N], -1, tl.int64)
    m_start = pid_s * m_per_split
    m_stop = tl.minimum(m_start + m_per_split, m_rows)
    for j0 in tl.range(m_start, m_stop, BLOCK_M):
        offs_m = j0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < m_stop
        sim = _sim_tile(
            e_ptr, c_ptr, offs_n, offs_m, n_ok, m_ok, dim, stride_e, stride_c, BLOCK_N, BLOCK_M, BLOCK_D, DOT_MODE
        )
        sim = tl.where(m_ok[None, :], sim, -float("inf"))
        tile_max = tl.max(sim, axis=1)
        # Lowest j reaching the tile's max; every tile holds >= 1 valid j, so tile_max is finite and a j is found.
        tile_j = tl.min(tl.where(sim == tile_max[:, None], offs_m[None, :], m_rows), axis=1)
        # Strictly greater: on a tie the earlier tile (lower j) keeps its j.
        better = tile_max > best
        best_j = tl.where(better, tile_j, best_j)
        best = tl.where(better, tile_max, best)
    out = offs_n * n_splits + pid_s
    tl.store(val_ptr + out, best, mask=n_ok)
    tl.store(idx_ptr + out, best_j, mask=n_ok)


@triton.jit
def _facility_gains_kernel(
    e_ptr,  # (n, d) E
    c_ptr,  # (m, d) C, the candidates
    cur_ptr,  # (n,) float32 current coverage
    part_ptr,  # (m, S) float32 out: sum over this program's slice of E of max(0, sim - cur)
    n_rows,  # n
    m_rows,  # m
    dim,  # d
    stride_e,  # elements between rows of E
    stride_c,  # elements between rows of C
    n_per_split,  # rows of E per program along grid axis 1 (a multiple of BLOCK_N)
    BLOCK_N: tl.constexpr,  # rows of E per tile
    BLOCK_M: tl.constexpr,  # candidates per program
    BLOCK_D: tl.constexpr,  # features per tl.dot step
    DOT_MODE: tl.constexpr,  # see _sim_tile
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    n_splits = tl.num_programs(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < m_rows
    gain = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_start = pid_s * n_per_split
    n_stop = tl.minimum(n_start + n_per_split, n_rows)
    for i0 in tl.range(n_start, n_stop, BLOCK_N):
        offs_n = i0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < n_stop
        sim = _sim_tile(
            e_ptr, c_ptr, offs_n, offs_m, n_ok, m_ok, dim, stride_e, stride_c, BLOCK_N, BLOCK_M, BLOCK_D, DOT_MODE
        )
        cur = tl.load(cur_ptr + offs_n, mask=n_ok, other=0.0)
        # Rows past the split add nothing (their sim is 0, and 0 - cur could be > 0): masked explicitly.
        gain += tl.sum(tl.where(n_ok[:, None], tl.maximum(sim - cur[:, None], 0.0), 0.0), axis=0)
    tl.store(part_ptr + offs_m * n_splits + pid_s, gain, mask=m_ok)


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------
def _common_dtype(e: torch.Tensor, c: torch.Tensor) -> torch.dtype:
    """The dtype both operands run in: theirs if equal and 16/32-bit, else float32 (float64 is computed in float32)."""
    if e.dtype == c.dtype and e.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return e.dtype
    return torch.float32


def _operands(e: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same dtype, unit inner stride (a row stride is fine: the kernels take it)."""
    dtype = _common_dtype(e, c)
    e, c = e.to(dtype), c.to(dtype)
    if e.stride(1) != 1:
        e = e.contiguous()
    if c.stride(1) != 1:
        c = c.contiguous()
    return e, c


def _sms(t: torch.Tensor) -> int:
    return torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 1


def _split(n_blocks_parallel: int, n_blocks_reduced: int, block: int, num_splits: int | None, sms: int):
    """(rows per split, splits) of the reduced axis: enough programs to fill the GPU (4 per SM hide load latency, as in
    xent's split-K), every split a whole number of tiles holding >= 1 valid row."""
    if num_splits is None:
        num_splits = max(1, min(n_blocks_reduced, triton.cdiv(4 * sms, n_blocks_parallel)))
    per_split = triton.cdiv(n_blocks_reduced, max(1, num_splits)) * block
    return per_split, triton.cdiv(n_blocks_reduced * block, per_split)


@torch.no_grad()
def rowmax_sim_triton(
    E: torch.Tensor,
    C: torch.Tensor,
    *,
    block_n: int = 64,
    block_m: int = 128,
    block_d: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vals float32 (n,), idx int64 (n,)) with the Triton kernel; tensors on one device (CUDA, or CPU under the
    interpreter). Memory: two (n, S) partials, S = ``num_splits`` (default: enough programs for 4 per SM; 1 at
    n = 200,000 on an H200, whose 3,125 row blocks already fill its 132 SMs).

    Block sizes default to GPU tiles (64 x 128 x 64); under ``TRITON_INTERPRET=1`` each (program x loop iteration) costs
    ~1.4 ms, so tests pass large blocks.
    """
    e, c = _operands(E, C)
    n, dim = e.shape
    m = c.shape[0]
    if n == 0 or m == 0:
        return torch.full((n,), -math.inf, device=e.device), torch.full((n,), -1, dtype=torch.int64, device=e.device)
    block_d = block_d or min(64, max(16, triton.next_power_of_2(dim)))
    n_blocks = triton.cdiv(n, block_n)
    m_per_split, splits = _split(n_blocks, triton.cdiv(m, block_m), block_m, num_splits, _sms(e))
    part_val = torch.empty((n, splits), dtype=torch.float32, device=e.device)
    part_idx = torch.empty((n, splits), dtype=torch.int64, device=e.device)
    _rowmax_sim_kernel[(n_blocks, splits)](
        e,
        c,
        part_val,
        part_idx,
        n,
        m,
        dim,
        e.stride(0),
        c.stride(0),
        m_per_split,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        DOT_MODE=dot_mode(e.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if splits == 1:
        return part_val[:, 0].contiguous(), part_idx[:, 0].contiguous()
    # argmax returns the first maximal split: splits are ordered by j, so ties still go to the lowest j.
    s = part_val.argmax(dim=1, keepdim=True)
    return part_val.gather(1, s).squeeze(1), part_idx.gather(1, s).squeeze(1)


@torch.no_grad()
def facility_gains_triton(
    E: torch.Tensor,
    C: torch.Tensor,
    cur: torch.Tensor,
    *,
    block_n: int = 64,
    block_m: int = 128,
    block_d: int | None = None,
    num_splits: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """float32 (m,) gains with the Triton kernel; tensors on one device. Memory: an (m, S) float32 partial, summed in
    float64 (S = ``num_splits`` splits of E's rows; default: enough programs for 4 per SM, so 2,000 candidates = 16
    blocks of 128 split E 33 ways on an H200)."""
    e, c = _operands(E, C)
    n, dim = e.shape
    m = c.shape[0]
    if n == 0 or m == 0:
        return torch.zeros(m, dtype=torch.float32, device=e.device)
    cur = cur.reshape(-1).to(device=e.device, dtype=torch.float32).contiguous()
    block_d = block_d or min(64, max(16, triton.next_power_of_2(dim)))
    m_blocks = triton.cdiv(m, block_m)
    n_per_split, splits = _split(m_blocks, triton.cdiv(n, block_n), block_n, num_splits, _sms(e))
    part = torch.empty((m, splits), dtype=torch.float32, device=e.device)
    _facility_gains_kernel[(m_blocks, splits)](
        e,
        c,
        cur,
        part,
        n,
        m,
        dim,
        e.stride(0),
        c.stride(0),
        n_per_split,
        BLOCK_N=block_n,
        BLOCK_M=block_m,
        BLOCK_D=block_d,
        DOT_MODE=dot_mode(e.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return part[:, 0].contiguous() if splits == 1 else part.sum(dim=1, dtype=torch.float64).to(torch.float32)


# ---------------------------------------------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------------------------------------------
def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    return np.asarray(x)


def rowmax_sim_reference(E, C, dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """The naive path: the full ``n x m`` product in ``dtype`` (float64 by default; float32 is what a user would write),
    then ``max`` and ``argmax`` (numpy's argmax returns the first maximum: the lowest j). numpy (vals ``dtype``, idx
    int64), whatever the input kind. Memory: n x m x 8 B (float64)."""
    e, c = _np(E).astype(dtype, copy=False), _np(C).astype(dtype, copy=False)
    n = e.shape[0]
    if c.shape[0] == 0:
        return np.full(n, -np.inf, dtype=dtype), np.full(n, -1, dtype=np.int64)
    sim = e @ c.T
    idx = sim.argmax(axis=1)
    return sim[np.arange(n), idx], idx.astype(np.int64)


def facility_gains_reference(E, C, cur, dtype=np.float64) -> np.ndarray:
    """The naive path: ``max(0, E @ C^T - cur[:, None]).sum(axis=0)`` on the full product, in ``dtype``; numpy."""
    e, c = _np(E).astype(dtype, copy=False), _np(C).astype(dtype, copy=False)
    cur = _np(cur).astype(dtype, copy=False).reshape(-1)
    return np.maximum(e @ c.T - cur[:, None], 0).sum(axis=0)


# ---------------------------------------------------------------------------------------------------------------
# Blocked torch paths (the CPU path; the fallback on a GPU whose check failed)
# ---------------------------------------------------------------------------------------------------------------
# 4 Mi float32 elements = 16 MiB per tile (2,097 x 2,000 at m = 2,000). Measured on the 2-core machine, n = 50,000,
# m = 2,000, d = 384: 1,024 / 2,048 / 4,194 / 8,192-row tiles all ran in 0.9-1.1 s (BLAS-bound at any of them). Peak
# extra RSS at n = 200,000: 29 / 44 / 143 / 120 MiB for 1,024 / 2,097 / 4,194 / 8,192 rows: tiles over glibc's 32 MiB
# mmap ceiling are mapped and unmapped each time instead of reused from the heap. The naive path: 1,868 MiB.
TILE_ELEMS = 4 << 20
BLOCK_COLS = 16384


def _blocks(n: int, m: int, block_rows: int | None, block_cols: int | None) -> tuple[int, int]:
    bc = max(1, min(m, block_cols or BLOCK_COLS))
    br = block_rows or max(16, TILE_ELEMS // bc)
    return max(1, min(n, br)), bc


@torch.no_grad()
def rowmax_sim_blocked(
    E: torch.Tensor, C: torch.Tensor, *, block_rows: int | None = None, block_cols: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(vals float32 (n,), idx int64 (n,)) by ``block_rows x block_cols`` float32 tiles of ``E @ C^T`` on E's device,
    with the kernel's running max (strictly greater wins, so ties keep the lowest j). Memory: one tile (16 MiB by
    default: ``block_rows = 4 Mi / min(m, block_cols)``), one float32 block of E rows, a float32 copy of C."""
    n, m = E.shape[0], C.shape[0]
    vals = torch.full((n,), -math.inf, dtype=torch.float32, device=E.device)
    idx = torch.full((n,), -1, dtype=torch.int64, device=E.device)
    if n == 0 or m == 0:
        return vals, idx
    br, bc = _blocks(n, m, block_rows, block_cols)
    c32 = C.to(device=E.device, dtype=torch.float32)
    for i0 in range(0, n, br):
        e = E[i0 : i0 + br].float()
        best, best_j = vals[i0 : i0 + br], idx[i0 : i0 + br]  # views: updated in place
        for j0 in range(0, m, bc):
            # torch.max(dim) returns the first maximal index (documented), i.e. the lowest j within the tile.
            v, j = (e @ c32[j0 : j0 + bc].T).max(dim=1)
            better = v > best
            best_j.copy_(torch.where(better, j + j0, best_j))
            best.copy_(torch.where(better, v, best))
    return vals, idx


@torch.no_grad()
def facility_gains_blocked(
    E: torch.Tensor,
    C: torch.Tensor,
    cur: torch.Tensor,
    *,
    block_rows: int | None = None,
    block_cols: int | None = None,
) -> torch.Tensor:
    """float32 (m,) gains by float32 tiles of ``E @ C^T`` on E's device: ``max(0, tile - cur)`` in place, summed over
    the tile's rows in float32 (torch's CPU sum is a cascade sum), the tiles' sums added in float64. Memory as
    ``rowmax_sim_blocked``."""
    n, m = E.shape[0], C.shape[0]
    total = torch.zeros(m, dtype=torch.float64, device=E.device)
    if n == 0 or m == 0:
        return total.float()
    br, bc = _blocks(n, m, block_rows, block_cols)
    c32 = C.to(device=E.device, dtype=torch.float32)
    cur = cur.reshape(-1).to(device=E.device, dtype=torch.float32)
    for i0 in range(0, n, br):
        e = E[i0 : i0 + br].float()
        cover = cur[i0 : i0 + br, None]
        for j0 in range(0, m, bc):
            tile = e @ c32[j0 : j0 + bc].T
            total[j0 : j0 + bc] += tile.sub_(cover).clamp_(min=0).sum(dim=0)
    return total.float()


# ---------------------------------------------------------------------------------------------------------------
# Self-check of the Triton path on the device it runs on
# ---------------------------------------------------------------------------------------------------------------
DISPATCH = Dispatch("kernels.similarity", "torch-blocked", "the blocked torch path on the same device")
PATH_BLOCKED = DISPATCH.fallback  # the blocked torch path: the CPU path, or forced by set_path_override
PATH_FALLBACK = DISPATCH.failed  # the check failed (or raised): the blocked path on the same device
PATHS = DISPATCH.paths  # PATH_TRITON, PATH_UNCHECKED (device="triton" or set_path_override("triton")) as in dispatch

# (n, m, d) of the fixed problem. With the default 64 x 128 x 64 tiles: n = 150 is two full row blocks and a ragged
# one (22 rows), m = 300 two full candidate tiles and a ragged one (44), d = 80 a full feature step and a ragged one
# (16). Under the interpreter (1 "SM") rowmax splits C two ways and the gains split E two ways, so the split combines
# run too; ~30 launches' worth of tile iterations, 0.1-0.3 s per op on the 2-core machine. On an H200 both split more.
# It checks the algorithm and its lowering on this device, not every specialisation Triton compiles (d = 384, a
# multiple of 16, compiles another variant): bench/gpu_check.sh covers the production shape.
CHECK_SHAPE = (150, 300, 80)
CHECK_SEED = 300
# Rows are L2-normalised (as embeddings are), so sims lie in [-1, 1] with std ~1/sqrt(80) = 0.11; the reference is
# float64 on the same dtype-rounded values, so the kernel's only error is float32 accumulation of 80 products (~1e-7)
# and, for the gains, of 150 relu terms (sums ~2-5). ATOL = 1e-5 is ~100x that noise; a wrong mask, index or
# combine moves a max by ~0.1 and a gain by >= 1 relu term (~0.05), far outside it (both planted in the tests).
CHECK_ATOL = 1e-5
CHECK_RTOL = 1e-5
TIE_COLS = (7, 200)  # candidates tied exactly for the last row's maximum (see _check_problem)


@dataclass(frozen=True)
class SimilarityCheck:
    """The outcome of ``check_triton`` for one op on one device key."""

    op: str  # "rowmax_sim" or "facility_gains"
    key: str  # the device key the verdict is cached under (without the op)
    ok: bool  # every value within atol + rtol * |reference|, every idx a maximiser (the lowest on exact ties), no raise
    max_abs_err: float  # max |got - reference| over the values (inf for NaN/inf, or when the launch raised)
    bad_idx: int = 0  # rowmax_sim: rows whose idx is not a maximiser of the reference, or not the lowest on a tie
    error: str | None = None  # "ExceptionType: message" when the implementation raised, else None

    def describe(self) -> str:
        n, m, d = CHECK_SHAPE
        what = f"on a fixed {n} x {m} x {d} problem, atol {CHECK_ATOL:g}, rtol {CHECK_RTOL:g}"
        if self.error is not None:
            return f"{self.op} {self.key}: the launch raised {self.error} ({what})"
        verdict = "matches" if self.ok else "DIFFERS from"
        idx = f", {self.bad_idx} rows with a wrong argmax" if self.bad_idx else ""
        return (
            f"{self.op} {self.key}: Triton {verdict} the float64 reference (max abs err {self.max_abs_err:.3g}{idx}; "
            f"{what})"
        )


def _check_problem(device: torch.device, dtype: torch.dtype):
    """The fixed, seeded problem (E, C, cur), drawn on the CPU (the same values on every device), then moved."""
    n, m, d = CHECK_SHAPE
    g = torch.Generator().manual_seed(CHECK_SEED)
    e = torch.randn(n, d, generator=g)
    c = torch.randn(m, d, generator=g)
    e, c = e / e.norm(dim=1, keepdim=True), c / c.norm(dim=1, keepdim=True)
    c[m - 1] = e[0]  # row 0's maximiser is the last candidate, in the ragged last tile
    # An exact tie in two different tiles: row n - 1 (ragged last row block) equals candidates 7 and 200, a unit vector
    # of four +-0.5 entries. Every product and sum of its self-dot is exact in fp16 and float32 whatever the summation
    # order, so the tie is exact on any device, and 1.0 beats its dot with any other unit row: the answer must be 7.
    # (Ties between duplicate candidates and a row of arbitrary floats are not exact under the interpreter: numpy's
    # float32 GEMM rounded the two dots differently in 9 of 150 rows when the tied pair was the rows' maximiser.)
    tie = torch.zeros(d)
    tie[torch.randperm(d, generator=g)[:4]] = torch.tensor([0.5, -0.5, 0.5, 0.5])
    e[n - 1], c[TIE_COLS[0]], c[TIE_COLS[1]] = tie, tie, tie
    cur = (torch.rand(n, generator=g) - 0.5) * 0.4  # [-0.2, 0.2]: about half the relu terms are active
    return e.to(dtype).to(device), c.to(dtype).to(device), cur.to(device)


def _argmax_errors(got_idx: np.ndarray, e: torch.Tensor, c: torch.Tensor) -> int:
    """Rows whose idx is not a maximiser of the float64 product (within CHECK_ATOL), plus 1 if the planted exact tie
    (last row) did not go to the lower candidate."""
    sim = e.double().cpu().numpy() @ c.double().cpu().numpy().T
    top = sim.max(axis=1)
    ok_range = (got_idx >= 0) & (got_idx < sim.shape[1])
    picked = sim[np.arange(sim.shape[0]), np.clip(got_idx, 0, sim.shape[1] - 1)]
    near = ok_range & (picked >= top - CHECK_ATOL)
    return int((~near).sum()) + int(got_idx[-1] != TIE_COLS[0])


@torch.no_grad()
def check_triton(op: str, device: torch.device | str, impl=None, *, dtype: torch.dtype = torch.float16):
    """Run ``impl`` (default the op's Triton launcher, its default launch, as the dispatcher calls it) and the float64
    reference on the fixed problem on ``device``; compare. Never raises for the implementation's sake: an exception
    from ``impl`` is a failed check."""
    if op not in OPS:
        raise ValueError(f"check_triton: op must be one of {OPS}, got {op!r}")
    device = torch.device(device)
    impl = impl or (rowmax_sim_triton if op == "rowmax_sim" else facility_gains_triton)
    key = device_key(device, dtype)
    e, c, cur = _check_problem(device, dtype)
    try:
        if op == "rowmax_sim":
            want = rowmax_sim_reference(e, c)[0]
            got, got_idx = impl(e, c)
            got_idx = got_idx.detach().to("cpu", torch.int64).reshape(-1).numpy()
        else:
            want = facility_gains_reference(e, c, cur)
            got = impl(e, c, cur)
        got = got.detach().to("cpu", torch.float64).reshape(-1).numpy()
        if got.shape != want.shape:
            raise ValueError(f"returned {got.size} values for {want.size}")
    except Exception as ex:  # noqa: BLE001 - any failure of the checked path means: do not use it
        return SimilarityCheck(op, key, False, math.inf, error=f"{type(ex).__name__}: {str(ex)[:300]}")
    err = np.nan_to_num(np.abs(got - want), nan=math.inf)
    within = bool((err <= CHECK_ATOL + CHECK_RTOL * np.abs(want)).all())
    bad_idx = _argmax_errors(got_idx, e, c) if op == "rowmax_sim" else 0
    return SimilarityCheck(op, key, within and bad_idx == 0, float(err.max()), bad_idx)


# ---------------------------------------------------------------------------------------------------------------
# Dispatchers
# ---------------------------------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "cuda", "triton")
cuda_available = DISPATCH.cuda_available
set_cuda_override = DISPATCH.set_cuda_override
set_path_override = DISPATCH.set_path_override
similarity_paths_used = (
    DISPATCH.paths_used
)  # "<op> <device key>" -> path, e.g. "rowmax_sim cuda:0 NVIDIA H200 float16"


def _gpu_device(e: torch.Tensor) -> torch.device:
    """Where the GPU branch runs: E's GPU, else the current one; under ``TRITON_INTERPRET=1`` with no real GPU (tests,
    ``set_cuda_override(True)`` or ``device="triton"``) the interpreter's host."""
    if e.is_cuda:
        return e.device
    if _interpreting() and not cuda_probe():
        return torch.device("cpu")
    return torch.device("cuda")


def _gpu_branch_path(op: str, dev: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(key, path) for the GPU branch: the override, else the cached self-check verdict (running the check once)."""
    key = f"{op} {device_key(dev, dtype)}"
    return key, DISPATCH.gpu_branch_path(key, lambda: check_triton(op, dev, dtype=dtype), stacklevel=5)


def _no_gpu_error(what: str) -> RuntimeError:
    return Dispatch.no_gpu_error(
        what,
        "Use device='auto' or device='cpu' for the blocked CPU path, install a CUDA build of torch on a machine with "
        "a GPU, or (tests) set TRITON_INTERPRET=1 before importing kernels.similarity.",
    )


def _route(op: str, device: str, e: torch.Tensor, c: torch.Tensor) -> tuple[str, str, torch.device]:
    """(key, path, device to run on) for one call."""
    if device not in DEVICES:
        raise ValueError(f"{op}: device must be one of {DEVICES}, got {device!r}")
    dtype = _common_dtype(e, c)
    if device == "triton":
        if not (cuda_probe() or _interpreting()):
            raise _no_gpu_error(f"{op}(device='triton')")
        dev = _gpu_device(e)
        return f"{op} {device_key(dev, dtype)}", PATH_UNCHECKED, dev
    if device == "cuda" and not cuda_available():
        raise _no_gpu_error(f"{op}(device='cuda')")
    if device == "cuda" or (device == "auto" and cuda_available()):
        dev = _gpu_device(e)
        return (*_gpu_branch_path(op, dev, dtype), dev)
    dev = torch.device("cpu")
    return f"{op} {device_key(dev, dtype, triton_path=False)}", PATH_BLOCKED, dev


def _as_tensor(x, name: str, op: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind != "f":
            raise TypeError(f"{op}: {name} must be a float16 or float32 array, got dtype {x.dtype}")
        return torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"{op}: {name} must be a float16, bfloat16 or float32 tensor, got {x.dtype}")
        return x.detach()
    raise TypeError(f"{op}: {name} must be a numpy array or a torch tensor, got {type(x).__name__}")


def _inputs(op: str, E, C):
    e, c = _as_tensor(E, "E", op), _as_tensor(C, "C", op)
    if e.dim() != 2 or c.dim() != 2 or e.shape[1] != c.shape[1]:
        raise ValueError(
            f"{op}: E must be (n, d) and C (m, d) with the same d; got {tuple(e.shape)} and {tuple(c.shape)}"
        )
    return e, c


@torch.no_grad()
def rowmax_sim(E, C, *, device: str = "auto", block_rows: int | None = None, block_cols: int | None = None):
    """``(vals float32 (n,), idx int64 (n,))``: ``vals[i] = max_j <E_i, C_j>``, ``idx[i]`` the lowest maximiser;
    ``m = 0`` gives ``-inf`` and ``-1``. E (n, d), C (m, d): float16/bfloat16/float32, numpy or torch; numpy in ->
    numpy out, torch in -> torch out on E's device. Never holds the n x m product: see the module docstring for
    memory. ``block_rows`` / ``block_cols`` size the blocked path's tiles (default 16 MiB); ``device`` as in the module
    docstring; ``similarity_paths_used()`` says which path ran."""
    as_numpy = isinstance(E, np.ndarray)
    e, c = _inputs("rowmax_sim", E, C)
    home = e.device
    n, m = e.shape[0], c.shape[0]
    if n == 0 or m == 0:
        vals, idx = torch.full((n,), -math.inf), torch.full((n,), -1, dtype=torch.int64)
    else:
        key, path, dev = _route("rowmax_sim", device, e, c)
        if path in (PATH_TRITON, PATH_UNCHECKED):
            vals, idx = rowmax_sim_triton(e.to(dev), c.to(dev))
        else:
            vals, idx = rowmax_sim_blocked(e.to(dev), c.to(dev), block_rows=block_rows, block_cols=block_cols)
        DISPATCH.record(key, path)
    if as_numpy:
        return vals.cpu().numpy(), idx.cpu().numpy()
    return vals.to(home), idx.to(home)


@torch.no_grad()
def facility_gains(E, C, cur, *, device: str = "auto", block_rows: int | None = None, block_cols: int | None = None):
    """float32 (m,): ``gains[c] = sum_i max(0, <E_i, C_c> - cur[i])``, facility location's marginal gain of each
    candidate row of C given the coverage ``cur`` (n,) of the rows of E. Kinds, devices and memory as ``rowmax_sim``."""
    as_numpy = isinstance(E, np.ndarray)
    e, c = _inputs("facility_gains", E, C)
    if isinstance(cur, torch.Tensor):
        cur_t = _as_tensor(cur, "cur", "facility_gains").reshape(-1)
    else:
        cur_t = torch.from_numpy(np.asarray(cur, dtype=np.float32).reshape(-1))
    n, m = e.shape[0], c.shape[0]
    if cur_t.numel() != n:
        raise ValueError(f"facility_gains: cur has {cur_t.numel()} entries for {n} rows of E")
    home = e.device
    if n == 0 or m == 0:
        gains = torch.zeros(m, dtype=torch.float32)
    else:
        key, path, dev = _route("facility_gains", device, e, c)
        e, c, cur_t = e.to(dev), c.to(dev), cur_t.to(dev)
        if path in (PATH_TRITON, PATH_UNCHECKED):
            gains = facility_gains_triton(e, c, cur_t)
        else:
            gains = facility_gains_blocked(e, c, cur_t, block_rows=block_rows, block_cols=block_cols)
        DISPATCH.record(key, path)
    return gains.cpu().numpy() if as_numpy else gains.to(home)
