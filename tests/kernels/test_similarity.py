"""kernels/similarity.py: the Triton kernels (under TRITON_INTERPRET=1, set in conftest) and the blocked CPU path
against the float64 full-product reference on irregular shapes; the argmax tie rule on exact integer data; empty
inputs; the dispatcher's kinds, devices, self-check and fallback.

The interpreter costs ~50 ms per (program x loop iteration) on the shared 2-core machine (KNOWN.md's 1.4 ms is an
idle machine), so the Triton cases use big blocks and small grids: the largest runs 2 row blocks x 2 candidate
tiles x 2 feature steps = 8 iterations.
"""

import warnings

import numpy as np
import pytest
import torch

from kernels import similarity as S


def assert_verbose_allclose(got, want, rtol: float, atol: float, what: str = ""):
    """Like np.testing.assert_allclose, but says where and by how much (Liger-Kernel's helper)."""
    got = np.asarray(got.cpu() if isinstance(got, torch.Tensor) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want)
    bad = ~(err <= atol + rtol * np.abs(want))  # NaN counts as bad
    if bad.any():
        idx = np.nonzero(bad)[0][:5]
        detail = ", ".join(f"[{i}] got {got[i]:.8g} want {want[i]:.8g}" for i in idx)
        raise AssertionError(f"{what}: {int(bad.sum())} of {got.size} differ (max abs err {err.max():.3g}): {detail}")


def _unit_rows(n: int, d: int, seed: int, dtype=np.float32) -> np.ndarray:
    """L2-normalised Gaussian rows, as embeddings are: dots lie in [-1, 1]."""
    x = np.random.default_rng(seed).standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(dtype)


def _int_rows(n: int, d: int, seed: int, dtype=np.float32) -> np.ndarray:
    """Entries in {-1, 0, 1}: every dot is a small integer, exact in any dtype and summation order, so ties are
    exact (d = 7 gives 15 possible values, so most rows tie between several candidates)."""
    return np.random.default_rng(seed).integers(-1, 2, (n, d)).astype(dtype)


def assert_rowmax_ok(vals, idx, E, C, atol: float, what: str):
    """vals within atol of the float64 maxima, and each idx a maximiser (within atol: a float32 near-tie may pick
    either of two candidates that differ by less than the rounding)."""
    vals = vals.cpu().numpy() if isinstance(vals, torch.Tensor) else vals
    idx = idx.cpu().numpy() if isinstance(idx, torch.Tensor) else idx
    assert vals.dtype == np.float32 and idx.dtype == np.int64, f"{what}: dtypes {vals.dtype}, {idx.dtype}"
    want, _ = S.rowmax_sim_reference(E, C)
    assert_verbose_allclose(vals, want, 0.0, atol, f"{what} vals")
    sim = S._np(E).astype(np.float64) @ S._np(C).astype(np.float64).T
    assert ((idx >= 0) & (idx < sim.shape[1])).all(), f"{what}: idx out of range"
    picked = sim[np.arange(sim.shape[0]), idx]
    bad = np.nonzero(picked < want - atol)[0]
    assert bad.size == 0, f"{what}: {bad.size} rows pick a non-maximiser, e.g. row {bad[:3]} idx {idx[bad[:3]]}"


@pytest.fixture
def fresh_dispatch(monkeypatch):
    """Empty verdict and used-path caches, no overrides; restored afterwards."""
    monkeypatch.setattr(S.DISPATCH, "verdicts", {})
    monkeypatch.setattr(S.DISPATCH, "used", {})
    monkeypatch.setattr(S.DISPATCH, "cuda_override", None)
    monkeypatch.setattr(S.DISPATCH, "path_override", None)


@pytest.fixture
def gpu_branch(fresh_dispatch, monkeypatch):
    """The GPU branch on CPU tensors: the interpreter is the "GPU" (conftest sets TRITON_INTERPRET=1)."""
    assert S._interpreting()
    monkeypatch.setattr(S.DISPATCH, "cuda_override", True)


INTERP = "cpu:triton-interpreter"

# ---------------------------------------------------------------------------------------------------------------
# Triton kernels against the reference
# ---------------------------------------------------------------------------------------------------------------
# (n, m, d, block_n, block_m, block_d, num_splits): n, m, d not multiples of the blocks (300 = 256 + 44, 257 = 256 + 1,
# 384 = 256 + 128), a single row, a single candidate, d = 7 (one masked 16-wide feature step), a split reduced axis.
SHAPES = [
    (300, 257, 384, 256, 256, 256, 1),
    (1, 257, 384, 16, 128, 512, 2),
    (77, 1, 7, 128, 16, 16, None),
    (300, 257, 7, 256, 256, 16, 2),
]
# float32 and float16 inputs, the reference float64 on the same rounded values: only float32 accumulation differs
# (observed <= 1.2e-7 on unit rows at d = 384).
DTYPES = [np.float32, np.float16]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}xm{s[1]}xd{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_rowmax_triton_matches_reference(shape, dtype):
    n, m, d, bn, bm, bd, ns = shape
    E, C = _unit_rows(n, d, seed=n + d, dtype=dtype), _unit_rows(m, d, seed=m, dtype=dtype)
    if m > 1:
        C[m - 1] = E[0]  # row 0's maximiser is the last candidate, alone in the ragged last tile
    vals, idx = S.rowmax_sim_triton(
        torch.from_numpy(E), torch.from_numpy(C), block_n=bn, block_m=bm, block_d=bd, num_splits=ns
    )
    assert vals.shape == (n,) and idx.shape == (n,)
    assert_rowmax_ok(vals, idx, E, C, 1e-5, f"triton rowmax {shape} {np.dtype(dtype).name}")
    if m > 1:
        assert int(idx[0]) == m - 1


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"n{s[0]}xm{s[1]}xd{s[2]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_facility_gains_triton_matches_reference(shape, dtype):
    n, m, d, bn, bm, bd, ns = shape
    E, C = _unit_rows(n, d, seed=n + d, dtype=dtype), _unit_rows(m, d, seed=m, dtype=dtype)
    # Coverage around the dots' spread (std 1/sqrt(d)): about half the relu terms are active, half clipped.
    scale = 1.0 / np.sqrt(d)
    cur = np.random.default_rng(n).uniform(-scale, scale, n).astype(np.float32)
    want = S.facility_gains_reference(E, C, cur)
    assert want.dtype == np.float64 and (want > 0).any()
    got = S.facility_gains_triton(
        torch.from_numpy(E),
        torch.from_numpy(C),
        torch.from_numpy(cur),
        block_n=bn,
        block_m=bm,
        block_d=bd,
        num_splits=ns,
    )
    assert got.dtype == torch.float32 and got.shape == (m,)
    assert_verbose_allclose(got, want, 1e-5, 1e-6, f"triton gains {shape} {np.dtype(dtype).name}")


def test_triton_default_blocks_and_splits():
    # The launchers' own defaults (64 x 128 x 64 tiles, splits for 4 programs per "SM"), as the dispatcher calls them.
    E, C = _unit_rows(70, 80, seed=1), _unit_rows(200, 80, seed=2)
    vals, idx = S.rowmax_sim_triton(torch.from_numpy(E), torch.from_numpy(C))
    assert_rowmax_ok(vals, idx, E, C, 1e-5, "triton rowmax defaults")
    cur = np.zeros(70, dtype=np.float32)
    got = S.facility_gains_triton(torch.from_numpy(E), torch.from_numpy(C), torch.from_numpy(cur))
    assert_verbose_allclose(got, S.facility_gains_reference(E, C, cur), 1e-5, 1e-6, "triton gains defaults")


# ---------------------------------------------------------------------------------------------------------------
# Blocked CPU path against the reference
# ---------------------------------------------------------------------------------------------------------------
# (n, m, d, block_rows, block_cols): tiles that split both axes raggedly, one tile, a single row / candidate.
CPU_SHAPES = [
    (1823, 781, 384, 500, 300),
    (1823, 781, 384, None, None),
    (1, 781, 7, 64, 100),
    (500, 1, 7, 64, 100),
]


@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: f"n{s[0]}xm{s[1]}xd{s[2]}-b{s[3]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16"])
def test_cpu_path_matches_reference(fresh_dispatch, shape, dtype):
    n, m, d, br, bc = shape
    E, C = _unit_rows(n, d, seed=n, dtype=dtype), _unit_rows(m, d, seed=m + 1, dtype=dtype)
    vals, idx = S.rowmax_sim(E, C, device="cpu", block_rows=br, block_cols=bc)
    assert isinstance(vals, np.ndarray) and isinstance(idx, np.ndarray)
    assert_rowmax_ok(vals, idx, E, C, 1e-5, f"cpu rowmax {shape}")
    cur = np.random.default_rng(3).uniform(-0.05, 0.05, n).astype(np.float32)
    gains = S.facility_gains(E, C, cur, device="cpu", block_rows=br, block_cols=bc)
    assert isinstance(gains, np.ndarray) and gains.dtype == np.float32 and gains.shape == (m,)
    assert_verbose_allclose(gains, S.facility_gains_reference(E, C, cur), 1e-5, 1e-6, f"cpu gains {shape}")
    assert S.similarity_paths_used() == {
        f"rowmax_sim cpu {np.dtype(dtype).name}": S.PATH_BLOCKED,
        f"facility_gains cpu {np.dtype(dtype).name}": S.PATH_BLOCKED,
    }


def test_gains_of_selected_candidates_are_zero_given_their_coverage():
    # Facility location's invariant: once C[sel] is selected and cur = rowmax_sim(E, C[sel]), adding a selected
    # candidate again gains nothing (up to float32 rounding of the two paths' dots), and every other gain is >= 0.
    E, C = _unit_rows(400, 48, seed=4), _unit_rows(90, 48, seed=5)
    sel = np.array([3, 17, 64, 89])
    cur, _ = S.rowmax_sim(E, C[sel], device="cpu", block_rows=128)
    gains = S.facility_gains(E, C, cur, device="cpu", block_rows=128, block_cols=32)
    assert np.abs(gains[sel]).max() <= 1e-5
    assert (gains >= 0).all() and (np.delete(gains, sel) > 1e-3).sum() >= 80
    g_tri = S.facility_gains_triton(
        torch.from_numpy(E), torch.from_numpy(C), torch.from_numpy(cur), block_n=512, block_m=128, block_d=64
    )
    assert float(g_tri[sel].abs().max()) <= 1e-5


# ---------------------------------------------------------------------------------------------------------------
# Tie rule: lowest j, on data whose dots are exact integers
# ---------------------------------------------------------------------------------------------------------------
def test_argmax_ties_go_to_lowest_j_in_every_path(fresh_dispatch):
    n, m, d = 300, 257, 7
    E, C = _int_rows(n, d, seed=6), _int_rows(m, d, seed=7)
    # Plant the same candidate in three tiles / splits: all 2s, against row 0 all 1s, a dot of 14 where any other
    # candidate reaches at most 7. Row 0's answer is then 40, and a path that breaks ties by tile or split order shows.
    E[0], C[[40, 140, 250]] = 1.0, 2.0
    sim = E.astype(np.float64) @ C.astype(np.float64).T
    want = sim.argmax(axis=1)  # numpy: the first maximum
    ties = (sim == sim.max(axis=1, keepdims=True)).sum(axis=1)
    assert (ties > 1).mean() > 0.5 and want[0] == 40  # the data really ties, often
    for dtype in (np.float32, np.float16):
        e, c = E.astype(dtype), C.astype(dtype)
        got = {
            "cpu tiles": S.rowmax_sim(e, c, device="cpu", block_rows=128, block_cols=100)[1],
            "cpu one tile": S.rowmax_sim(e, c, device="cpu")[1],
            "triton 2 splits": S.rowmax_sim_triton(
                torch.from_numpy(e), torch.from_numpy(c), block_n=256, block_m=128, block_d=16, num_splits=2
            )[1].numpy(),
            "triton 1 split": S.rowmax_sim_triton(
                torch.from_numpy(e), torch.from_numpy(c), block_n=256, block_m=128, block_d=16, num_splits=1
            )[1].numpy(),
        }
        for what, idx in got.items():
            wrong = np.nonzero(idx != want)[0]
            assert wrong.size == 0, (
                f"{what} {np.dtype(dtype).name}: {wrong.size} rows, e.g. {wrong[:3]}: {idx[wrong[:3]]}"
            )


# ---------------------------------------------------------------------------------------------------------------
# Empty inputs, kinds, errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", ["cpu", "triton", "auto"])
def test_empty_candidates_and_rows(fresh_dispatch, device):
    E = _unit_rows(5, 8, seed=8, dtype=np.float16)
    C0 = np.zeros((0, 8), dtype=np.float16)
    vals, idx = S.rowmax_sim(E, C0, device=device)
    assert vals.dtype == np.float32 and idx.dtype == np.int64
    assert np.array_equal(vals, np.full(5, -np.inf, dtype=np.float32)) and np.array_equal(idx, np.full(5, -1))
    ref_v, ref_i = S.rowmax_sim_reference(E, C0)
    assert np.isneginf(ref_v).all() and (ref_i == -1).all()
    v_t, i_t = S.rowmax_sim(torch.from_numpy(E), torch.from_numpy(C0), device=device)
    assert isinstance(v_t, torch.Tensor) and torch.isneginf(v_t).all() and (i_t == -1).all()
    assert S.facility_gains(E, C0, np.zeros(5), device=device).shape == (0,)
    # n = 0: nothing to cover, every gain is 0.
    E0 = np.zeros((0, 8), dtype=np.float16)
    vals, idx = S.rowmax_sim(E0, E, device=device)
    assert vals.shape == (0,) and idx.shape == (0,)
    gains = S.facility_gains(E0, E, np.zeros(0, dtype=np.float32), device=device)
    assert gains.dtype == np.float32 and np.array_equal(gains, np.zeros(5, dtype=np.float32))
    assert S.similarity_paths_used() == {}  # nothing ran


def test_kinds_numpy_in_numpy_out_torch_in_torch_out(fresh_dispatch):
    E, C = _unit_rows(50, 16, seed=9, dtype=np.float16), _unit_rows(20, 16, seed=10, dtype=np.float16)
    v_np, i_np = S.rowmax_sim(E, C)
    assert isinstance(v_np, np.ndarray) and isinstance(i_np, np.ndarray)
    v_t, i_t = S.rowmax_sim(torch.from_numpy(E), torch.from_numpy(C))
    assert isinstance(v_t, torch.Tensor) and v_t.dtype == torch.float32 and i_t.dtype == torch.int64
    assert np.array_equal(v_t.numpy(), v_np) and np.array_equal(i_t.numpy(), i_np)
    # Mixed dtypes run in float32; a non-contiguous (strided) E is fine; cur may be a list.
    v_mix, i_mix = S.rowmax_sim(E.astype(np.float32)[::2], C)
    assert_rowmax_ok(v_mix, i_mix, E.astype(np.float32)[::2], C, 1e-5, "mixed dtypes")
    g = S.facility_gains(torch.from_numpy(E), torch.from_numpy(C), [0.0] * 50)
    assert isinstance(g, torch.Tensor)
    assert_verbose_allclose(g, S.facility_gains_reference(E, C, np.zeros(50)), 1e-5, 1e-6, "list cur")
    # On this CPU-only machine "auto" is the blocked CPU path.
    assert set(S.similarity_paths_used().values()) == {S.PATH_BLOCKED}


def test_errors_say_what_to_do(fresh_dispatch, monkeypatch):
    E, C = np.zeros((4, 8), np.float32), np.zeros((3, 8), np.float32)
    with pytest.raises(
        ValueError, match=r"E must be \(n, d\) and C \(m, d\) with the same d; got \(4, 8\) and \(3, 7\)"
    ):
        S.rowmax_sim(E, C[:, :7])
    with pytest.raises(ValueError, match="cur has 3 entries for 4 rows of E"):
        S.facility_gains(E, C, np.zeros(3))
    with pytest.raises(TypeError, match="must be a float16 or float32 array, got dtype int64"):
        S.rowmax_sim(E.astype(np.int64), C)
    with pytest.raises(ValueError, match="device must be one of"):
        S.rowmax_sim(E, C, device="gpu")
    monkeypatch.setattr(S.DISPATCH, "cuda_override", False)
    with pytest.raises(RuntimeError, match=r"rowmax_sim\(device='cuda'\) needs a CUDA GPU.*device='cpu'"):
        S.rowmax_sim(E, C, device="cuda")
    monkeypatch.setattr(S, "_interpreting", lambda: False)
    with pytest.raises(RuntimeError, match=r"facility_gains\(device='triton'\) needs a CUDA GPU.*TRITON_INTERPRET"):
        S.facility_gains(E, C, np.zeros(4), device="triton")
    with pytest.raises(ValueError, match="path must be None"):
        S.set_path_override("cuda")


# ---------------------------------------------------------------------------------------------------------------
# Dispatcher: the GPU branch under the interpreter, its self-check, the fallback
# ---------------------------------------------------------------------------------------------------------------
def test_device_triton_forces_the_kernel_unchecked(fresh_dispatch, monkeypatch):
    monkeypatch.setattr(S, "check_triton", lambda *a, **k: pytest.fail("device='triton' must not self-check"))
    E, C = _unit_rows(40, 24, seed=11, dtype=np.float16), _unit_rows(30, 24, seed=12, dtype=np.float16)
    vals, idx = S.rowmax_sim(E, C, device="triton")
    assert_rowmax_ok(vals, idx, E, C, 1e-5, "device=triton")
    cur = np.full(40, 0.05, np.float32)
    g = S.facility_gains(E, C, cur, device="triton")
    assert_verbose_allclose(g, S.facility_gains_reference(E, C, cur), 1e-5, 1e-6, "device=triton gains")
    assert S.similarity_paths_used() == {
        f"rowmax_sim {INTERP} float16": S.PATH_UNCHECKED,
        f"facility_gains {INTERP} float16": S.PATH_UNCHECKED,
    }


def test_gpu_branch_self_checks_once_then_runs_triton(gpu_branch, monkeypatch):
    checks, launches = [], []
    real_check, real_launch = S.check_triton, S.rowmax_sim_triton
    monkeypatch.setattr(S, "check_triton", lambda *a, **k: checks.append(a[0]) or real_check(*a, **k))
    monkeypatch.setattr(S, "rowmax_sim_triton", lambda *a, **k: launches.append(1) or real_launch(*a, **k))
    E, C = _unit_rows(60, 24, seed=13, dtype=np.float16), _unit_rows(50, 24, seed=14, dtype=np.float16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            vals, idx = S.rowmax_sim(E, C)  # "auto" with a (pretend) GPU: the GPU branch
            assert_rowmax_ok(vals, idx, E, C, 1e-5, "gpu branch")
    assert checks == ["rowmax_sim"]  # one check per (op, device key), then cached
    assert len(launches) == 3  # the check's launch and the two calls'
    assert S.similarity_paths_used() == {f"rowmax_sim {INTERP} float16": S.PATH_TRITON}


@pytest.mark.parametrize("op", S.OPS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
def test_self_check_passes_the_real_kernels(op, dtype):
    check = S.check_triton(op, "cpu", dtype=dtype)
    assert check.ok, check.describe()
    assert check.key == f"{INTERP} {str(dtype).removeprefix('torch.')}" and check.max_abs_err < 1e-5


def _rowmax_drops_ragged_tile(e, c):
    return S.rowmax_sim_triton(e, c[:256])  # the check problem's last 44 candidates, where row 0's maximiser is


def _rowmax_highest_on_ties(e, c):
    vals, idx = S.rowmax_sim_triton(e, c.flip(0))
    return vals, c.shape[0] - 1 - idx


def _gains_drops_ragged_rows(e, c, cur):
    return S.facility_gains_triton(e[:128], c, cur[:128])


@pytest.mark.parametrize(
    "op,bad,what",
    [
        ("rowmax_sim", _rowmax_drops_ragged_tile, "rows with a wrong argmax"),
        ("rowmax_sim", _rowmax_highest_on_ties, ", 1 rows with a wrong argmax"),
        ("facility_gains", _gains_drops_ragged_rows, "max abs err"),
        ("facility_gains", lambda e, c, cur: 1 / 0, "the launch raised ZeroDivisionError"),
    ],
    ids=["ragged-tile", "tie-rule", "ragged-rows", "raises"],
)
def test_self_check_catches_planted_bugs(op, bad, what):
    check = S.check_triton(op, "cpu", bad)
    assert not check.ok
    assert what in check.describe(), check.describe()


def test_failed_check_warns_and_falls_back(gpu_branch, monkeypatch):
    launches = []
    real = S.facility_gains_triton

    def bad(e, c, cur):
        launches.append(1)
        return real(e[:128], c, cur[:128])

    monkeypatch.setattr(S, "facility_gains_triton", bad)
    E, C = _unit_rows(90, 24, seed=15, dtype=np.float16), _unit_rows(40, 24, seed=16, dtype=np.float16)
    cur = np.zeros(90, np.float32)
    want = S.facility_gains_reference(E, C, cur)
    with pytest.warns(
        RuntimeWarning, match=f"failed its self-check: facility_gains {INTERP} float16: .*torch-blocked"
    ):
        got = S.facility_gains(E, C, cur, device="cuda")
    assert_verbose_allclose(got, want, 1e-5, 1e-6, "fallback")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = S.facility_gains(E, C, cur, device="cuda")  # the verdict is cached: no second warning or launch
    assert np.array_equal(again, got) and len(launches) == 1
    assert S.similarity_paths_used() == {f"facility_gains {INTERP} float16": S.PATH_FALLBACK}
    # The other op on the same device has its own verdict: its kernel is fine.
    vals, idx = S.rowmax_sim(E, C, device="cuda")
    assert_rowmax_ok(vals, idx, E, C, 1e-5, "rowmax after gains fallback")
    assert S.similarity_paths_used()[f"rowmax_sim {INTERP} float16"] == S.PATH_TRITON


def test_path_override(gpu_branch, monkeypatch):
    monkeypatch.setattr(S, "check_triton", lambda *a, **k: pytest.fail("an override must not self-check"))
    E, C = _unit_rows(30, 16, seed=17), _unit_rows(20, 16, seed=18)
    S.set_path_override("torch-blocked")
    assert_rowmax_ok(*S.rowmax_sim(E, C), E, C, 1e-5, "forced blocked")
    assert S.similarity_paths_used() == {f"rowmax_sim {INTERP} float32": S.PATH_BLOCKED}
    S.set_path_override("triton")
    assert_rowmax_ok(*S.rowmax_sim(E, C), E, C, 1e-5, "forced triton")
    assert S.similarity_paths_used() == {f"rowmax_sim {INTERP} float32": S.PATH_UNCHECKED}
    S.set_path_override(None)
