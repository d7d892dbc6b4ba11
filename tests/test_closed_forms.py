"""Closed-form expectations (docs/batchnorm.md): one EMA step by hand, the cumulative average, identity
recovery, scale invariance, and the unbiased/biased running-variance option."""

import pytest
import torch

import bnlab


def test_one_ema_step_by_hand():
    bn = bnlab.BatchNorm1d(3, momentum=0.1).double()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -2.0, 0.5]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.0]))
    x = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.5, -1.0], [5.0, 0.0, 4.0], [-1.0, 1.5, 2.0]],
                     dtype=torch.float64)
    m = 4
    batch_mean = x.sum(0) / m
    biased_var = ((x - batch_mean) ** 2).sum(0) / m
    unbiased_var = biased_var * m / (m - 1)
    expected_mean = 0.9 * torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 0.1 * batch_mean
    expected_var = 0.9 * torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64) + 0.1 * unbiased_var
    y = bn(x)
    torch.testing.assert_close(bn.running_mean, expected_mean, atol=1e-14, rtol=1e-14)
    torch.testing.assert_close(bn.running_var, expected_var, atol=1e-14, rtol=1e-14)
    assert bn.num_batches_tracked.item() == 1
    # training normalizes with the *biased* variance
    torch.testing.assert_close(y, (x - batch_mean) / torch.sqrt(biased_var + 1e-5), atol=1e-14, rtol=1e-14)


def test_biased_running_variance_option():
    bn = bnlab.BatchNorm1d(2, momentum=1.0, running_var_correction="biased").double()
    x = torch.randn(5, 2, dtype=torch.float64)
    bn(x)
    torch.testing.assert_close(bn.running_var, x.var(0, unbiased=False))
    bn_u = bnlab.BatchNorm1d(2, momentum=1.0).double()
    bn_u(x)
    torch.testing.assert_close(bn_u.running_var, x.var(0, unbiased=True))


def test_momentum_none_is_the_cumulative_average():
    bn = bnlab.BatchNorm2d(2, momentum=None).double()
    batches = [torch.randn(3, 2, 2, 2, dtype=torch.float64) * (k + 1) + k for k in range(5)]
    for x in batches:
        bn(x)
    means = torch.stack([x.mean((0, 2, 3)) for x in batches])
    vars_ = torch.stack([x.var((0, 2, 3), unbiased=True) for x in batches])
    torch.testing.assert_close(bn.running_mean, means.mean(0), atol=1e-13, rtol=1e-13)
    torch.testing.assert_close(bn.running_var, vars_.mean(0), atol=1e-13, rtol=1e-13)
    assert bn.num_batches_tracked.item() == 5


def test_identity_recovery():
    """γ = √(σ²_B + ε), β = μ_B makes BN the identity on that batch (Ioffe §3)."""
    x = torch.randn(16, 4, 3, dtype=torch.float64) * 5 + 2
    mean = x.mean((0, 2))
    var = x.var((0, 2), unbiased=False)
    bn = bnlab.BatchNorm1d(4, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.sqrt(var + 1e-3))
        bn.bias.copy_(mean)
    torch.testing.assert_close(bn(x), x, atol=1e-12, rtol=1e-12)


# The closed forms below hold exactly at ε = 0, which training refuses (as torch.nn does); 1e-300 is
# below float64's resolution of any variance here, so σ² + ε == σ² bit for bit.
TINY_EPS = 1e-300


@pytest.mark.parametrize("a", [0.01, 3.0, 250.0])
def test_scale_invariance(a):
    """BN((aW)u) = BN(Wu) and ∂ℓ/∂(aW) = (1/a)·∂ℓ/∂W (Ioffe §3.3)."""
    u = torch.randn(32, 6, dtype=torch.float64)
    W = torch.randn(5, 6, dtype=torch.float64)
    target = torch.randn(32, 5, dtype=torch.float64)
    bn = bnlab.BatchNorm1d(5, eps=TINY_EPS).double()

    def loss_and_grad(weight):
        weight = weight.clone().requires_grad_()
        y = bn(u @ weight.t())
        loss = ((y - target) ** 2).sum()
        loss.backward()
        return y.detach(), weight.grad

    y1, g1 = loss_and_grad(W)
    y2, g2 = loss_and_grad(a * W)
    torch.testing.assert_close(y2, y1, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(g2, g1 / a, atol=1e-10, rtol=1e-10)


def test_bn_output_has_zero_mean_unit_variance_per_channel():
    x = torch.randn(64, 8, 4, 4, dtype=torch.float64) * 7 - 3
    y = bnlab.BatchNorm2d(8, eps=TINY_EPS).double()(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(8, dtype=torch.float64),
                               atol=1e-12, rtol=0)


def test_input_gradient_is_orthogonal_to_mean_and_x_hat():
    """The closed form projects out the mean and x_hat directions: Σ dx = 0 and, with ε = 0
    (so that x_hat has unit batch variance), Σ dx·x_hat = 0."""
    x = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    bn = bnlab.BatchNorm1d(3, affine=False, eps=TINY_EPS).double()
    y = bn(x)
    y.backward(torch.randn_like(y))
    x_hat = y.detach()
    torch.testing.assert_close(x.grad.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close((x.grad * x_hat).sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
