"""kernels/embed_pool.py: Numba and Triton (interpreted on CPU) against the float64 reference."""

import numpy as np
import pytest
import torch

from kernels.embed_pool import embed_pool, embed_pool_numba, embed_pool_reference, embed_pool_triton


def _case(v, d, n, max_len, seed):
    rng = np.random.default_rng(seed)
    table = rng.normal(size=(v, d)).astype(np.float32)
    weights = rng.uniform(0, 1, v).astype(np.float32)
    weights[rng.choice(v, max(1, v // 10), replace=False)] = 0.0  # [unused]-style zero-weight tokens
    counts = rng.integers(0, max_len + 1, n).astype(np.int64)
    counts[0] = 0  # an empty row -> zero vector
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    ids = rng.integers(0, v, int(counts.sum())).astype(np.int32)
    return table, weights, ids, starts, counts


def assert_verbose_allclose(got, ref, atol, rtol=0.0):
    bad = ~np.isclose(got, ref, atol=atol, rtol=rtol)
    if bad.any():
        i = np.argwhere(bad)[:5]
        raise AssertionError(f"{bad.sum()} mismatches, first at {i.tolist()}: {got[bad][:5]} vs {ref[bad][:5]}")


@pytest.mark.parametrize("v,d,n,max_len", [(50, 8, 7, 5), (1823, 781, 13, 40), (30522, 256, 64, 300), (7, 3, 1, 1)])
def test_numba_matches_reference(v, d, n, max_len):
    args = _case(v, d, n, max_len, seed=v + d)
    ref = embed_pool_reference(*args)
    got = embed_pool_numba(*args)
    assert_verbose_allclose(got, ref, atol=2e-5)
    assert np.all(got[0] == 0)
    norms = np.linalg.norm(got[1:], axis=1)
    nz = args[4][1:] > 0
    assert np.allclose(norms[nz & (norms > 0)], 1.0, atol=1e-5)


@pytest.mark.parametrize("v,d,n,max_len", [(40, 5, 4, 3), (97, 33, 3, 4)])
def test_triton_interpreted_matches_reference(v, d, n, max_len):
    args = _case(v, d, n, max_len, seed=3)
    ref = embed_pool_reference(*args)
    got = embed_pool_triton(*(torch.as_tensor(a) for a in args)).numpy()
    assert_verbose_allclose(got, ref, atol=2e-5)


def test_dispatcher_cpu_and_cuda_error():
    args = _case(30, 4, 3, 3, seed=1)
    assert_verbose_allclose(embed_pool(*args, device="cpu"), embed_pool_reference(*args), atol=2e-5)
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            embed_pool(*args, device="cuda")
