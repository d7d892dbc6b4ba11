"""DetachedNorm, NoisyBatchNorm, LpNorm: mechanism, gradcheck, train/eval, state_dict."""

import math

import pytest
import torch
from torch import nn

import bnlab
from bnlab.variants import detached_norm
from bnlab.variants.lp import lp_norm


# -- DetachedNorm ---------------------------------------------------------------------------------

def test_detached_forward_equals_bn_but_gradient_skips_the_statistics():
    x = torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    det = bnlab.DetachedNorm(4, scale=True, affine=True).double()
    bn = bnlab.BatchNorm1d(4).double()
    with torch.no_grad():
        det.weight.uniform_(0.5, 2)
    bn.load_state_dict(det.state_dict(), strict=False)
    y_det, y_bn = det(x), bn(x)
    torch.testing.assert_close(y_det, y_bn)
    dy = torch.randn_like(y_det)
    (gx,) = torch.autograd.grad(y_det, x, dy)
    invstd = torch.rsqrt(x.var(0, unbiased=False) + det.eps)
    torch.testing.assert_close(gx, dy * det.weight.detach() * invstd)       # no projection terms
    (gx_bn,) = torch.autograd.grad(y_bn, x, dy)
    assert not torch.allclose(gx, gx_bn)


def test_detached_mean_passes_the_gradient_straight_through():
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    y = bnlab.DetachedNorm(3).double()(x)
    torch.testing.assert_close(y, x - x.mean(0))
    dy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close(gx, dy)                                      # Σ dx ≠ 0: b gets a gradient


def test_detached_gradcheck_with_the_statistics_as_constants():
    x = torch.randn(6, 3, 2, dtype=torch.float64, requires_grad=True)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: detached_norm(x, mean, var, w, b, 1e-5), (x, w, b))


def test_detached_eval_uses_running_statistics_and_2d_form():
    m = bnlab.DetachedNorm2d(3, scale=True)
    for _ in range(3):
        m(torch.randn(4, 3, 5, 5) * 2 + 1)
    m.eval()
    x = torch.randn(2, 3, 5, 5)
    expected = (x - m.running_mean.view(1, 3, 1, 1)) / torch.sqrt(m.running_var.view(1, 3, 1, 1) + m.eps)
    torch.testing.assert_close(m(x), expected)


# -- NoisyBatchNorm -------------------------------------------------------------------------------

def test_noise_is_reproducible_and_leaves_the_global_rng_alone():
    x = torch.randn(16, 5)
    a, b = bnlab.NoisyBatchNorm1d(5, noise_seed=3), bnlab.NoisyBatchNorm1d(5, noise_seed=3)
    torch.manual_seed(0)
    expected = torch.rand(2)
    torch.manual_seed(0)
    ya = a(x)
    assert torch.equal(torch.rand(2), expected)
    torch.testing.assert_close(ya, b(x), atol=0, rtol=0)
    assert not torch.equal(a(x), ya)                                         # non-stationary: new draw
    a.eval()
    torch.testing.assert_close(a(x), bnlab.BatchNorm1d(5).eval()(x) * 0 + a(x))  # deterministic


def test_noise_statistics_follow_the_algorithm():
    """With BN output ≡ 0 (γ = 0, β = 0), a ← s·0 + m: m ~ U(μ_t ± r_μ), μ_t ~ U(±n_μ)."""
    layer = bnlab.NoisyBatchNorm1d(2000, noise_seed=1)
    with torch.no_grad():
        layer.weight.zero_()
    out = layer(torch.randn(50, 2000)).detach()
    per_unit = out.mean(0)                                                   # ≈ μ_t per unit
    assert per_unit.abs().max() <= 0.5 + 0.1 + 1e-6
    assert (out - per_unit).abs().max() <= 0.2 + 1e-6                        # |m − μ_t| ≤ r_μ (±)
    assert per_unit.std().item() == pytest.approx(1.0 / math.sqrt(3) * 0.5, rel=0.1)   # U(−½, ½) spread
    layer2 = bnlab.NoisyBatchNorm1d(4000, noise_seed=1, batchnorm=False)
    ones = torch.ones(64, 4000)
    scale = layer2(ones).detach()                                            # s + m
    assert 0.4 < scale.mean().item() < 1.7


def test_noisy_gradcheck_with_the_noise_held_fixed():
    layer = bnlab.NoisyBatchNorm2d(3, noise_seed=7).double()
    x = torch.randn(3, 3, 2, 2, dtype=torch.float64, requires_grad=True)

    def f(x):
        layer.reseed()
        return layer(x)
    assert torch.autograd.gradcheck(f, (x,))


def test_noisy_state_dict_carries_the_noise_stream_and_loads_plain_bn():
    a = bnlab.NoisyBatchNorm1d(4, noise_seed=2)
    a(torch.randn(8, 4))
    b = bnlab.NoisyBatchNorm1d(4, noise_seed=99)
    b.load_state_dict(a.state_dict())
    x = torch.randn(8, 4)
    torch.testing.assert_close(a(x), b(x))
    c = bnlab.NoisyBatchNorm1d(4)
    c.load_state_dict(nn.BatchNorm1d(4).state_dict())                        # strict, without extra state


# -- LpNorm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_lp_against_a_direct_computation(p):
    x = torch.randn(10, 6, dtype=torch.float64) * 3 + 2
    layer = bnlab.LpNorm1d(6, p=p, eps=1e-300).double()
    y = layer(x)
    xc = x - x.mean(0)
    if p == 1:
        d = xc.abs().mean(1).mean()
    elif p == 2:
        d = xc.square().mean(1).sqrt().mean()
    else:
        d = xc.abs().max(1).values.mean()
    torch.testing.assert_close(y, xc / d)


def test_lp2_is_not_batchnorm_features_keep_their_relative_scale():
    x = torch.randn(64, 2, dtype=torch.float64) * torch.tensor([1.0, 10.0], dtype=torch.float64)
    y = bnlab.LpNorm1d(2, p=2).double()(x).detach()
    ratio = (y[:, 1].std() / y[:, 0].std()).item()
    assert ratio == pytest.approx((x[:, 1].std() / x[:, 0].std()).item(), rel=1e-6)


def test_lp_groups_are_independent():
    x = torch.randn(8, 6, dtype=torch.float64)
    whole = bnlab.LpNorm1d(6, groups=2).double()(x)
    parts = torch.cat([bnlab.LpNorm1d(3).double()(x[:, :3]), bnlab.LpNorm1d(3).double()(x[:, 3:])], 1)
    torch.testing.assert_close(whole, parts)


@pytest.mark.parametrize("cls,shape", [(bnlab.LpNorm1d, (6, 4)), (bnlab.LpNorm2d, (3, 2, 3, 3))])
@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_lp_gradcheck(cls, shape, p):
    layer = cls(shape[1], p=p).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_lp_eval_uses_running_statistics_and_state_dict_round_trip():
    layer = bnlab.LpNorm2d(3, p=1)
    for _ in range(5):
        layer(torch.randn(4, 3, 4, 4) * 2 + 1)
    layer.eval()
    x = torch.randn(2, 3, 4, 4)
    expected = lp_norm(x, layer.running_mean, layer.running_scale, layer.weight, layer.bias, layer.eps, 1)
    torch.testing.assert_close(layer(x), expected)
    copy = bnlab.LpNorm2d(3, p=1)
    copy.load_state_dict(layer.state_dict())
    torch.testing.assert_close(copy.eval()(x), layer(x))
    with pytest.raises(ValueError):
        bnlab.LpNorm1d(4, p=3)
