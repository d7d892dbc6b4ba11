"""bnlab.definition — the math that runs. Its closed-form backward equals what autograd derives
from its own forward lines (the derivation checked, not only the code); its statistics merge
exactly however the data are split; its momentum conventions are the documented ones."""

import math

import pytest
import torch

from bnlab import definition as D

SHAPES = [(6, 4), (5, 3, 7), (4, 3, 5, 2), (3, 2, 3, 4, 2)]


def _inputs(shape, dtype=torch.float64):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    C = shape[1]
    return x, (torch.rand(C, dtype=dtype) + 0.5).requires_grad_(), torch.randn(C, dtype=dtype).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_closed_form_backward_equals_autograd_of_the_forward(shape, training):
    x, w, b = _inputs(shape)
    C = shape[1]
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    y = D.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.1, 1e-3)
    dy = torch.randn_like(y)
    autograd = torch.autograd.grad(y, (x, w, b), dy)
    mean, var = D.batch_moments(x.detach()) if training else (rm, rv)
    closed = D.batch_norm_backward(dy, x.detach(), mean, torch.rsqrt(var + 1e-3), w.detach(), training)
    for g, g_ref in zip(closed, autograd):
        torch.testing.assert_close(g, g_ref, atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_closed_form_backward_is_itself_differentiable(shape):
    """batch_norm_backward is written with differentiable operations: its gradient is the
    Hessian-vector product of the forward (what the probes and double backward rely on)."""
    x, w, _ = _inputs(shape)
    dy = torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    def dx_of(x, w, dy):
        mean, var = D.batch_moments(x)
        return D.batch_norm_backward(dy, x, mean, torch.rsqrt(var + 1e-3), w, True)[0]

    assert torch.autograd.gradcheck(dx_of, (x, w, dy))


def test_statistics_are_two_pass_and_survive_a_large_mean():
    """mean 1e4, std 1e-1 in float32: the one-pass E[x²] − E[x]² would lose every digit."""
    x = 1e4 + 0.1 * torch.randn(300, 4, generator=torch.Generator().manual_seed(0))
    _, var = D.batch_moments(x)
    exact = x.double().var(0, unbiased=False)
    torch.testing.assert_close(var.double(), exact, rtol=1e-3, atol=(2 * torch.finfo(torch.float32).eps * 1e4) ** 2)
    naive = (x * x).mean(0) - x.mean(0) ** 2
    assert not torch.allclose(naive.double(), exact, rtol=1e-3, atol=(2 * torch.finfo(torch.float32).eps * 1e4) ** 2)


@pytest.mark.parametrize("splits", [[7, 1, 12], [2, 2, 2, 2, 12], [20]])
def test_moments_merge_exactly_whatever_the_split(splits):
    x = torch.randn(20, 3, 4, dtype=torch.float64) * 5 + 3
    merged = D.Moments.empty(3)
    for part in x.split(splits):
        merged = merged.merge(D.Moments.of_batch(part))
    direct = D.Moments.of_batch(x)
    torch.testing.assert_close(merged.mean, direct.mean, atol=1e-13, rtol=0)
    torch.testing.assert_close(merged.m2, direct.m2, atol=1e-11, rtol=1e-13)
    assert merged.count.item() == 80
    torch.testing.assert_close(merged.var("unbiased"), x.transpose(0, 1).reshape(3, -1).var(1), rtol=1e-12, atol=0)


def test_merge_moments_ignores_empty_parts():
    n, mu, m2 = D.merge_moments(torch.tensor([[0.0], [4.0]]), torch.tensor([[9.0], [2.0]]),
                                torch.tensor([[0.0], [3.0]]))
    assert n.item() == 4 and mu.item() == 2.0 and m2.item() == 3.0


def test_running_update_is_pytorchs_ema_of_the_unbiased_variance():
    rm, rv = torch.zeros(2), torch.ones(2)
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    D.update_running_stats(rm, rv, mean, var, count=4, momentum=0.1)
    torch.testing.assert_close(rm, 0.1 * mean)
    torch.testing.assert_close(rv, 0.9 + 0.1 * var * 4 / 3)
    rv2 = torch.ones(2)
    D.update_running_stats(None, rv2, mean, var, count=4, momentum=0.1, correction="biased")
    torch.testing.assert_close(rv2, 0.9 + 0.1 * var)
    with pytest.raises(ValueError, match="running_var_correction"):
        D.update_running_stats(rm, rv, mean, var, 4, 0.1, correction="bessel")


def test_momentum_conventions():
    assert D.momentum_at("pytorch", 0.1, 7) == 0.1
    assert D.momentum_at("cumulative", 0.1, 4) == 0.25 and D.momentum_at("pytorch", None, 5) == 0.2
    # debiased: the EMA of a constant equals the constant from the first step on
    d = [D.momentum_at("debiased", 0.1, t) for t in range(1, 6)]
    r = 0.0
    for m in d:
        r = (1 - m) * r + m * 3.0
        assert math.isclose(r, 3.0, rel_tol=1e-12)
    with pytest.raises(ValueError):
        D.momentum_at("pytorch", 0.1, 0)
    with pytest.raises(ValueError, match="ema must be"):
        D.momentum_at("keras", 0.1, 1)
