"""kernels/xent.py: the Triton kernel (under TRITON_INTERPRET=1, set in conftest) and the chunked CPU fallback
against a float64 reference, on irregular shapes; the segment reduction; the dispatcher's device errors.

The interpreter costs ~1.4 ms per (program x loop iteration), so the Triton cases use big blocks and small grids:
the V = 49,152 case runs 3 token blocks x 2 splits x 3 vocabulary tiles = 18 iterations.
"""

import warnings

import pytest
import torch

from kernels import xent as X


def assert_verbose_allclose(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float, what: str = ""):
    """Like torch.testing.assert_close, but says where and by how much (Liger-Kernel's helper)."""
    got, want = got.double().cpu(), want.double().cpu()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = (got - want).abs()
    bad = err > atol + rtol * want.abs()
    if bad.any():
        idx = bad.nonzero().squeeze(1)[:5].tolist()
        detail = ", ".join(f"[{i}] got {got[i].item():.7g} want {want[i].item():.7g}" for i in idx)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} differ (max abs err {err.max():.3g}): {detail}"
        )


def _case(t, h, v, seed, masked=0.3, ignored=7, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    # Head scale 0.3 gives logits with std ~ 0.3 * sqrt(h) ~ 2.4 at h = 64: a realistic, peaked softmax.
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    target = torch.randint(0, v, (t,), generator=g)
    mask = torch.rand(t, generator=g) >= masked
    if ignored:
        target[::ignored] = X.IGNORE_INDEX
    return hidden, weight, target, mask


# (T, H, V, block_t, block_v, block_h, num_splits): T not a multiple of block_t, V = 49,152 (SmolLM2) and primes,
# H not a multiple of block_h (two masked hidden tiles), a single row.
SHAPES = [
    (300, 64, 49152, 128, 8192, 64, 2),
    (77, 72, 5003, 32, 2048, 32, None),
    (1, 48, 997, 16, 512, 64, 3),
]
# float32 inputs: the kernel's exact fp32 dot + float32 logsumexp vs float64; observed max abs error ~1.2e-6 on
# NLLs up to ~17. bf16 inputs: the same bf16 values upcast to float64 in the reference, so only accumulation differs.
DTYPES = [(torch.float32, 1e-5, 2e-5), (torch.bfloat16, 1e-5, 2e-5)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[0]}xH{s[1]}xV{s[2]}")
@pytest.mark.parametrize("dtype,rtol,atol", DTYPES, ids=["fp32", "bf16"])
def test_triton_matches_float64_reference(shape, dtype, rtol, atol):
    t, h, v, bt, bv, bh, ns = shape
    hidden, weight, target, mask = _case(t, h, v, seed=t + v, masked=0.3 if t > 1 else 0.0, dtype=dtype)
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    assert want.dtype == torch.float64
    for compact in (True, False):
        got = X.xent_triton(
            hidden, weight, target, mask, block_t=bt, block_v=bv, block_h=bh, num_splits=ns, compact=compact
        )
        assert got.dtype == torch.float32
        assert_verbose_allclose(got, want, rtol, atol, f"triton compact={compact} {shape} {dtype}")
    scored = mask & (target != X.IGNORE_INDEX)
    assert (got[~scored] == 0).all()
    assert (got[scored] > 0).all()


def test_triton_single_scored_row_is_the_exact_nll():
    # One row, one target: nll = logsumexp(logits) - logits[target], computed here by hand in float64.
    hidden, weight, _, _ = _case(1, 32, 1000, seed=5, masked=0.0, ignored=0)
    target = torch.tensor([417])
    logits = hidden.double() @ weight.double().T
    want = torch.logsumexp(logits, dim=1) - logits[:, 417]
    got = X.xent_triton(hidden, weight, target, block_t=16, block_v=512, block_h=32, num_splits=1)
    assert_verbose_allclose(got, want, 1e-6, 1e-6, "single row")


def test_triton_all_masked_returns_zeros():
    hidden, weight, target, _ = _case(20, 32, 300, seed=1, ignored=0)
    got = X.xent_triton(hidden, weight, target, torch.zeros(20, dtype=torch.bool), block_t=32, block_v=512)
    assert torch.equal(got, torch.zeros(20))


@pytest.mark.parametrize("shape", [(300, 64, 49152), (77, 72, 5003), (1, 48, 997), (1823, 40, 781)])
def test_chunked_matches_float64_reference(shape):
    t, h, v = shape
    hidden, weight, target, mask = _case(t, h, v, seed=t * 3 + v, masked=0.3 if t > 1 else 0.0)
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    # Small odd chunks so that token and vocabulary tiles both end ragged.
    got = X.xent_chunked(hidden, weight, target, mask, chunk_tokens=97, chunk_vocab=3001)
    assert_verbose_allclose(got, want, 1e-5, 2e-5, f"chunked {shape}")
    default = X.xent_chunked(hidden, weight, target, mask)
    assert_verbose_allclose(default, want, 1e-5, 2e-5, f"chunked default tiles {shape}")


def test_chunked_bf16_head_matches_upcast_reference():
    hidden, weight, target, mask = _case(64, 48, 2000, seed=9, dtype=torch.bfloat16)
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    assert_verbose_allclose(X.xent_chunked(hidden, weight, target, mask, chunk_vocab=700), want, 1e-5, 2e-5, "bf16")


def test_reference_equals_torch_cross_entropy_on_full_logits():
    hidden, weight, target, _ = _case(50, 16, 300, seed=2, ignored=5)
    logits = hidden.double() @ weight.double().T
    want = torch.nn.functional.cross_entropy(logits, target, reduction="none", ignore_index=X.IGNORE_INDEX)
    assert torch.allclose(X.xent_reference(hidden.double(), weight.double(), target), want, rtol=0, atol=1e-12)


def test_segment_sums_planted():
    nll = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    seg = torch.tensor([2, 0, 2, 2, 0, 1])
    mask = torch.tensor([True, True, False, True, True, True])
    sums, counts = X.segment_sums(nll, seg, 4, mask)
    assert sums.dtype == torch.float64 and counts.dtype == torch.int64
    assert sums.tolist() == [7.0, 6.0, 5.0, 0.0]
    assert counts.tolist() == [2, 1, 2, 0]
    with pytest.raises(ValueError, match="segment ids"):
        X.segment_sums(nll, seg, 2)


def test_dispatcher_per_sample_sums_match_reference():
    hidden, weight, target, mask = _case(120, 32, 777, seed=4)
    seg = torch.arange(120) // 17
    sums, counts = X.xent(hidden, weight, target, mask, segment_ids=seg, num_segments=8, device="cpu")
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    scored = mask & (target != X.IGNORE_INDEX)
    for k in range(8):
        sel = (seg == k) & scored
        assert int(counts[k]) == int(sel.sum())
        assert abs(float(sums[k]) - float(want[sel].sum())) <= 1e-5 * max(1.0, float(want[sel].sum()))
    per_token = X.xent(hidden, weight, target, mask)  # auto on CPU tensors = chunked fallback
    assert_verbose_allclose(per_token, want, 1e-5, 2e-5, "auto")


def test_dispatcher_cuda_without_gpu_raises_clearly():
    hidden, weight, target, _ = _case(4, 16, 50, seed=3)
    X.set_cuda_override(False)
    try:
        with pytest.raises(RuntimeError, match="needs a CUDA GPU.*device='auto' or device='cpu'"):
            X.xent(hidden, weight, target, device="cuda")
    finally:
        X.set_cuda_override(None)
    with pytest.raises(ValueError, match="device must be"):
        X.xent(hidden, weight, target, device="tpu")


def test_bad_inputs_name_the_problem():
    hidden, weight, target, _ = _case(4, 16, 50, seed=3, ignored=0)
    with pytest.raises(ValueError, match=r"target\[2\] = 50 is outside the vocabulary"):
        X.xent(hidden, weight, torch.tensor([1, 2, 50, 3]))
    with pytest.raises(ValueError, match="same H"):
        X.xent(hidden, weight[:, :8], target)
    with pytest.raises(ValueError, match="3 targets for 4"):
        X.xent(hidden, weight, target[:3])


# ---------------------------------------------------------------------------------------------------------------
# The GPU path's self-check, run here with the real kernel under the interpreter (CPU tensors) and with planted bugs
# ---------------------------------------------------------------------------------------------------------------
INTERP_KEY = "cpu:triton-interpreter float32"


@pytest.fixture
def gpu_branch(monkeypatch):
    """Fresh verdicts and used-path record; a pretend GPU, so that xent(device="cuda") on CPU tensors takes the
    Triton branch under TRITON_INTERPRET=1. monkeypatch restores all three afterwards."""
    monkeypatch.setattr(X.DISPATCH, "verdicts", {})
    monkeypatch.setattr(X.DISPATCH, "used", {})
    monkeypatch.setattr(X.DISPATCH, "cuda_override", True)
    monkeypatch.setattr(X.DISPATCH, "path_override", None)


def _counting(monkeypatch, name, fn=None):
    """Replace X.<name> by a wrapper around ``fn`` (default: the real one) that records each call's first argument
    (its shape for a tensor)."""
    real = getattr(X, name) if fn is None else fn
    calls = []

    def wrapper(*a, **k):
        calls.append(getattr(a[0], "shape", a[0]))
        return real(*a, **k)

    monkeypatch.setattr(X, name, wrapper)
    return calls


def _drop_last_three_ids(hidden, weight, target, mask):
    """A ragged-tile bug: the logsumexp misses the last 3 vocabulary ids (the last 128-wide tile of V = 1,283)."""
    h, w, t, keep = X._prepare(hidden, weight, target, mask, X.IGNORE_INDEX)
    logits = h.double() @ w.double().T
    picked = logits.gather(1, torch.where(keep, t, 0)[:, None]).squeeze(1)
    return torch.where(keep, torch.logsumexp(logits[:, :-3], dim=1) - picked, 0.0).float()


def _ids_past_vocab_as_zero(hidden, weight, target, mask):
    """A missing vocabulary mask: the padding ids of the last tile (V rounded up to 128) count as logit 0."""
    h, w, t, keep = X._prepare(hidden, weight, target, mask, X.IGNORE_INDEX)
    logits = h.double() @ w.double().T
    logits = torch.cat([logits, logits.new_zeros(logits.shape[0], -w.shape[0] % 128)], dim=1)
    picked = logits.gather(1, torch.where(keep, t, 0)[:, None]).squeeze(1)
    return torch.where(keep, torch.logsumexp(logits, dim=1) - picked, 0.0).float()


def _unscored_not_zero(hidden, weight, target, mask):
    """Right where scored, 1e-6 (inside atol) where not: breaks the "0 where not scored" contract alone."""
    nll = X.xent_reference(hidden, weight, target, mask).float()
    return torch.where(nll == 0, 1e-6, nll)


def _raises(*a, **k):
    raise RuntimeError("boom: out of resources")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_self_check_passes_the_real_kernel_under_the_interpreter(dtype):
    check = X.check_triton("cpu", X.xent_triton, dtype=dtype)
    assert check.ok, check.describe()
    assert check.error is None and check.unscored_nonzero == 0
    assert check.key == f"cpu:triton-interpreter {str(dtype).removeprefix('torch.')}"
    # Measured 0.9e-7 to 1.5e-7: well inside the tolerance, so a correct kernel is never rejected by noise.
    assert 0 < check.max_rel_err < X.CHECK_RTOL / 100
    assert "matches" in check.describe()


@pytest.mark.parametrize(
    "impl,what",
    [
        (lambda *a, **k: X.xent_triton(*a, **k) + 1.0, "max abs err 1"),  # also nonzero at unscored positions
        (_drop_last_three_ids, "DIFFERS"),  # ~2e-4 relative: caught by rtol 1e-4, mostly missed by 1e-3
        (_ids_past_vocab_as_zero, "DIFFERS"),
        (lambda *a, **k: X.xent_reference(*a, **k).float() * (1 + 5e-4), "max rel err 0.0005"),  # pins rtol < 5e-4
        (_unscored_not_zero, "45 unscored positions not 0"),
        (lambda *a, **k: X.xent_triton(*a, **k) * float("nan"), "max abs err inf"),
        (lambda *a, **k: X.xent_reference(*a, **k).float()[:-1], "ValueError: returned 149 values for 150"),
        (_raises, "raised RuntimeError: boom"),
    ],
    ids=["plus-one", "drop-3-ids", "ids-past-V-as-0", "scaled-5e-4", "unscored-not-0", "nan", "short", "raises"],
)
def test_self_check_catches_planted_bugs(impl, what):
    check = X.check_triton(torch.device("cpu"), impl)
    assert not check.ok, check.describe()
    assert what in check.describe()


def test_self_check_accepts_an_independent_correct_implementation():
    # The chunked torch path is correct and computed differently (float32 tiles of 3,001 ids): it must pass, so the
    # check is not merely "anything but the reference fails".
    check = X.check_triton("cpu", X.xent_chunked)
    assert check.ok, check.describe()


def test_dispatcher_runs_triton_after_it_passes_its_check(gpu_branch, monkeypatch):
    checks = _counting(monkeypatch, "check_triton")
    launches = _counting(monkeypatch, "xent_triton")
    chunked = _counting(monkeypatch, "xent_chunked")
    hidden, weight, target, mask = _case(40, 32, 300, seed=11)
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    for _ in range(2):
        assert_verbose_allclose(X.xent(hidden, weight, target, mask, device="cuda"), want, 1e-5, 2e-5, "triton")
    assert checks == [torch.device("cpu")]  # the verdict is cached per device key
    assert launches[0] == (150, 80)  # the check's own launch on the fixed batch
    assert launches[1:] == [(40, 32), (40, 32)]  # then the real batches: the kernel, not the fallback
    assert chunked == []
    assert X.xent_paths_used() == {INTERP_KEY: X.PATH_TRITON}
    X.xent(hidden, weight, target, mask, device="cpu")
    assert X.xent_paths_used() == {INTERP_KEY: X.PATH_TRITON, "cpu float32": X.PATH_CHUNKED}


def _plus_one(*a, **k):
    return _REAL_TRITON(*a, **k) + 1.0


_REAL_TRITON = X.xent_triton  # bound at import: the tests below replace X.xent_triton by wrappers


@pytest.mark.parametrize(
    "bad,what",
    [
        (_plus_one, r"DIFFERS from the float64 reference \(max abs err 1"),
        (_raises, "raised RuntimeError: boom"),
    ],
    ids=["plus-one", "raises"],
)
def test_dispatcher_falls_back_warns_and_records_when_the_kernel_is_wrong(gpu_branch, monkeypatch, bad, what):
    launches = _counting(monkeypatch, "xent_triton", bad)
    hidden, weight, target, mask = _case(40, 32, 300, seed=12)
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    with pytest.warns(RuntimeWarning, match=f"failed its self-check: {INTERP_KEY}: .*{what}.*Using torch-chunked"):
        got = X.xent(hidden, weight, target, mask, device="cuda")
    assert_verbose_allclose(got, want, 1e-5, 2e-5, "fallback")
    assert X.xent_paths_used() == {INTERP_KEY: X.PATH_FALLBACK}
    assert X.xent_path("cpu") == X.PATH_CHUNKED
    # Later calls reuse the verdict: no second warning, no second launch of the bad kernel.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = X.xent(hidden, weight, target, mask, device="cuda", segment_ids=torch.arange(40) // 9)
    assert len(launches) == 1
    assert abs(float(again[0].sum()) - float(want.sum())) <= 1e-5 * float(want.sum())


def test_path_override_forces_a_path_without_a_check(gpu_branch, monkeypatch):
    monkeypatch.setattr(X, "check_triton", _raises)  # any check would fail the test
    launches = _counting(monkeypatch, "xent_triton", lambda *a, **k: torch.full((a[0].shape[0],), 7.0))
    hidden, weight, target, mask = _case(10, 16, 100, seed=13)
    X.set_path_override("torch-chunked")
    want = X.xent_reference(hidden.double(), weight.double(), target, mask)
    assert_verbose_allclose(X.xent(hidden, weight, target, mask, device="cuda"), want, 1e-5, 2e-5, "forced chunked")
    assert X.xent_paths_used() == {INTERP_KEY: X.PATH_CHUNKED}
    assert launches == []
    X.set_path_override("triton")  # trusted unchecked: the (here fake) kernel runs
    assert torch.equal(X.xent(hidden, weight, target, mask, device="cuda"), torch.full((10,), 7.0))
    assert X.xent_paths_used() == {INTERP_KEY: X.PATH_UNCHECKED}
    X.set_path_override(None)
    with pytest.raises(ValueError, match="path must be None, 'triton' or 'torch-chunked'"):
        X.set_path_override("cuda")


def test_xent_path_names_the_path_and_needs_a_gpu_for_cuda(monkeypatch):
    assert X.xent_path("cpu", torch.bfloat16) == X.PATH_CHUNKED
    monkeypatch.setattr(X.DISPATCH, "cuda_override", False)
    with pytest.raises(RuntimeError, match=r"xent_path\('cuda:1'\) needs a CUDA GPU"):
        X.xent_path("cuda:1")
    with pytest.raises(ValueError, match="CPU or CUDA device"):
        X.xent_path("meta")
    assert set(X.PATHS) == {"triton", "torch-chunked", "triton-failed-check->torch-chunked", "triton-unchecked"}
