"""Property tests over random shapes and values (hypothesis), including large means with small
variance, where the one-pass E[x²] − E[x]² would lose every digit."""

import hypothesis.strategies as st
import numpy as np
import torch
from hypothesis import given, settings, HealthCheck

from bnlab import definition as D
from bnlab import functional as BF
from bnlab.kernels import dispatch

shapes = st.tuples(st.integers(2, 9), st.integers(1, 5), st.integers(1, 4), st.integers(1, 3)).map(
    lambda t: t[: 2 + (t[2] % 3)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes, scale=st.floats(1e-3, 1e3), shift=st.floats(-1e3, 1e3), seed=st.integers(0, 2**31 - 1))
def test_matches_float64_numpy_definition(shape, scale, shift, seed):
    rng = np.random.default_rng(seed)
    x64 = rng.standard_normal(shape) * scale + shift
    x = torch.tensor(x64, dtype=torch.float32)
    y = BF.batch_norm(x, None, None, training=True, eps=1e-5)
    dims = (0,) + tuple(range(2, len(shape)))
    xq = x.double().numpy()                     # the float32 input, exactly, in float64
    mean = xq.mean(axis=dims, keepdims=True)
    var = ((xq - mean) ** 2).mean(axis=dims, keepdims=True)
    expected = (xq - mean) / np.sqrt(var + 1e-5)
    # float32 error budget: a few ulps of |x|/σ (the input's own quantization), see affine_
    ratio = (np.abs(xq).max(axis=dims, keepdims=True) + 1e-30) / np.sqrt(var + 1e-5)
    tol = 1e-5 + 8 * np.finfo(np.float32).eps * ratio
    assert np.all(np.abs(y.numpy() - expected) <= tol)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 300), c=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_large_mean_small_variance_keeps_the_variance(n, c, seed):
    """mean 1e4, std 1e-1: μ²/σ² = 1e10 — one-pass variance in float32 returns noise or < 0."""
    g = torch.Generator().manual_seed(seed)
    x = 1e4 + 0.1 * torch.randn(n, c, generator=g)
    mean, var = D.batch_moments(x)
    y, mean_p, var_p, _ = dispatch.forward_train(x, None, None, 1e-300)
    exact = x.double().var(0, unbiased=False)
    # Two-pass error is second order in the rounding of the mean: Σ(x − μ − δ)² = Σ(x − μ)² + mδ²
    # with |δ| ≲ eps·|μ|. The one-pass formula's error is first order, eps·μ² (≈ 12 here vs σ² = 0.01).
    atol = (2 * torch.finfo(torch.float32).eps * 1e4) ** 2
    for v in (var, var_p):
        assert torch.all(v >= 0)
        torch.testing.assert_close(v.double(), exact, rtol=1e-3, atol=atol)


def test_one_pass_formula_would_fail_here():
    """The oracle above can fail: the naive formula does fail on the same kind of data."""
    x = 1e4 + 0.1 * torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    naive = (x * x).mean(0) - x.mean(0) ** 2
    exact = x.double().var(0, unbiased=False)
    atol = (2 * torch.finfo(torch.float32).eps * 1e4) ** 2
    assert not torch.allclose(naive.double(), exact, rtol=1e-3, atol=atol)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_gradient_sums_vanish(shape, seed):
    """Σ dx = 0 per channel for any upstream gradient (the mean is removed)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    y = BF.batch_norm(x, None, None, training=True)
    y.backward(torch.randn(*shape, generator=g, dtype=torch.float64))
    dims = (0,) + tuple(range(2, len(shape)))
    assert torch.allclose(x.grad.sum(dims), torch.zeros(shape[1], dtype=torch.float64), atol=1e-9)
