"""Whitening (ZCA, PCA, IterNorm), Batch Renorm, Ghost BN, FrozenBatchNorm: mechanisms,
float64 gradcheck, eval semantics, state_dict round trips, conversion targets."""

import copy

import pytest
import torch
from torch import nn

import bnlab
from bnlab.variants.ghost import ghost_splits
from bnlab.variants.renorm import renorm_limits
from bnlab.variants.whitening import group_covariance, inv_sqrtm, whitening_matrix

DT = torch.float64


def _correlated(n=128, c=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(c, dtype=DT) + 0.5 * torch.randn(c, c, generator=g, dtype=DT)   # moderate conditioning
    return torch.randn(n, c, generator=g, dtype=DT) @ mix + 3.0


def _block_cov_error(y, groups):
    c = (y - y.mean(0)).T @ (y - y.mean(0)) / len(y)
    G = y.shape[1] // groups
    eye = torch.eye(G, dtype=y.dtype)
    return max((c[i * G:(i + 1) * G, i * G:(i + 1) * G] - eye).abs().max().item() for i in range(groups))


# -- whitening ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["zca", "pca"])
def test_whitened_batch_has_identity_covariance_per_group(method):
    x = _correlated()
    layer = bnlab.DecorrelatedBatchNorm(12, groups=3, whitening=method, eps=1e-10, affine=False).double()
    assert _block_cov_error(layer(x), 3) < 1e-8


def test_pca_swaps_axes_between_batches_while_zca_barely_moves():
    """The axis-swap metric (E11): ‖W₁ − W₂‖/‖W₁‖ for two batches of the same data."""
    g = torch.Generator().manual_seed(1)
    scales = torch.tensor([1.0, 1.05, 1.1, 1.15, 2.0, 2.05], dtype=DT)        # near-equal eigenvalues
    data = torch.randn(20_000, 6, generator=g, dtype=DT) * scales
    swaps = {}
    for method in ("zca", "pca"):
        ws = []
        for k in range(2):
            batch = data[k * 256:(k + 1) * 256, :, None]
            _, _, sigma = group_covariance(batch, 1, 1e-5)
            ws.append(whitening_matrix(sigma, method)[0])
        swaps[method] = ((ws[0] - ws[1]).norm() / ws[0].norm()).item()
    assert swaps["pca"] > 10 * swaps["zca"]


def test_inv_sqrtm_backward_is_stable_with_equal_eigenvalues():
    """Daleckii–Krein: finite at repeated eigenvalues, where eigenvector gradients blow up."""
    sigma = torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.5], dtype=DT)).requires_grad_()
    out = inv_sqrtm(sigma)
    out.sum().backward()
    assert torch.isfinite(sigma.grad).all()
    # matches a finite difference along a symmetric direction
    E = torch.randn(4, 4, dtype=DT)
    E = E + E.T
    h = 1e-6
    with torch.no_grad():
        fd = ((inv_sqrtm(sigma + h * E) - inv_sqrtm(sigma - h * E)).sum() / (2 * h)).item()
    assert (sigma.grad * E).sum().item() == pytest.approx(fd, rel=1e-6)


def test_inv_sqrtm_gradcheck():
    a = torch.randn(2, 5, 5, dtype=DT)
    spd = (a @ a.transpose(1, 2) + 0.5 * torch.eye(5, dtype=DT)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: inv_sqrtm(0.5 * (s + s.transpose(1, 2))), (spd,))


def test_iternorm_approaches_zca_as_t_grows():
    x = _correlated()
    zca = bnlab.DecorrelatedBatchNorm(12, groups=2, whitening="zca", affine=False).double()(x)
    errors = [(bnlab.IterNorm(12, groups=2, T=T, affine=False).double()(x) - zca).abs().max().item()
              for T in (1, 3, 5, 8, 10)]       # beyond ~10-15 the uncoupled iteration amplifies round-off
    assert all(b < a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-6


@pytest.mark.parametrize("make", [
    lambda: bnlab.DecorrelatedBatchNorm(6, groups=2, whitening="zca"),
    lambda: bnlab.DecorrelatedBatchNorm(6, groups=2, whitening="pca"),
    lambda: bnlab.IterNorm(6, groups=3, T=4)])
@pytest.mark.parametrize("shape", [(16, 6), (4, 6, 2, 3)])
def test_whitening_gradcheck(make, shape):
    layer = make().double()
    x = (torch.randn(*shape, dtype=DT) @ torch.eye(shape[-1], dtype=DT) if len(shape) == 2
         else torch.randn(*shape, dtype=DT)).requires_grad_()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


def test_whitening_eval_uses_running_matrices_and_round_trips():
    layer = bnlab.DecorrelatedBatchNorm(8, group_size=4)
    for _ in range(4):
        layer(torch.randn(32, 8) * 2 + 1)
    layer.eval()
    x = torch.randn(5, 8)
    X = x.T.reshape(2, 4, 5)
    expected = (layer.running_whitening @ (X - layer.running_mean.view(2, 4, 1))).reshape(8, 5).T
    torch.testing.assert_close(layer(x), expected * layer.weight + layer.bias)
    clone = bnlab.DecorrelatedBatchNorm(8, group_size=4)
    clone.load_state_dict(layer.state_dict())
    torch.testing.assert_close(clone.eval()(x), layer(x))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    layer(torch.randn(5, 8))
    assert all(torch.equal(v, before[k]) for k, v in layer.state_dict().items())


# -- Batch Renorm --------------------------------------------------------------------------------

def test_renorm_with_rmax_1_dmax_0_equals_bn_in_training():
    ref = bnlab.BatchNorm2d(3).double()
    ren = bnlab.BatchRenorm2d(3, rmax=1.0, dmax=0.0, warmup=False).double()
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    ren.load_state_dict(ref.state_dict())
    with torch.no_grad():
        ren.running_mean.fill_(5.0)                    # far from the batch: r, d would matter
    x = torch.randn(4, 3, 5, 5, dtype=DT, requires_grad=True)
    y_ref, y_ren = ref(x), ren(x)
    torch.testing.assert_close(y_ren, y_ref)
    dy = torch.randn_like(y_ref)
    torch.testing.assert_close(torch.autograd.grad(y_ren, x, dy)[0], torch.autograd.grad(y_ref, x, dy)[0])


def test_renorm_corrects_towards_the_moving_averages():
    ren = bnlab.BatchRenorm1d(2, rmax=100.0, dmax=100.0, warmup=False, affine=False).double()
    with torch.no_grad():
        ren.running_mean.copy_(torch.tensor([1.0, -1.0]))
        ren.running_var.copy_(torch.tensor([4.0, 0.25]) - ren.eps)
    x = torch.randn(64, 2, dtype=DT) * torch.tensor([2.0, 0.5], dtype=DT) + torch.tensor([1.0, -1.0], dtype=DT)
    y = ren(x)
    # unclipped r, d: x̂ = (x − μ_B)/σ_B·(σ_B/σ) + (μ_B − μ)/σ = (x − μ)/σ, the inference transform
    torch.testing.assert_close(y, (x - torch.tensor([1.0, -1.0], dtype=DT)) / torch.tensor([2.0, 0.5], dtype=DT))


def test_renorm_gradcheck_with_fixed_corrections_and_eval():
    ren = bnlab.BatchRenorm1d(3, rmax=1.0, dmax=0.0, warmup=False).double()
    x = torch.randn(8, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ren(x), (x,))
    ren.eval()
    out = ren(x)
    torch.testing.assert_close(out, (x - ren.running_mean) / torch.sqrt(ren.running_var + ren.eps)
                               * ren.weight + ren.bias)


def test_renorm_warmup_schedule():
    assert renorm_limits(100, 3, 5, True, 5000, 40000, 25000) == (1.0, 0.0)
    r, d = renorm_limits(15000, 3, 5, True, 5000, 40000, 25000)
    assert r == pytest.approx(1 + 2 * 10000 / 35000) and d == pytest.approx(5 * 10000 / 20000)
    assert renorm_limits(50000, 3, 5, True, 5000, 40000, 25000) == (3, 5)
    assert renorm_limits(1, 3, 5, False, 5000, 40000, 25000) == (3, 5)


def test_renorm_loads_a_bn_checkpoint_and_keeps_sigma_semantics():
    bn = nn.BatchNorm1d(4)
    for _ in range(3):
        bn(torch.randn(16, 4) * 3)
    ren = bnlab.BatchRenorm1d(4)
    ren.load_state_dict(bn.state_dict())
    x = torch.randn(6, 4)
    torch.testing.assert_close(ren.eval()(x), bn.eval()(x))


# -- Ghost BN ------------------------------------------------------------------------------------

def test_ghost_with_one_virtual_batch_equals_bn():
    ref, ghost = bnlab.BatchNorm1d(5).double(), bnlab.GhostBatchNorm1d(5, virtual_batch_size=16).double()
    x = torch.randn(16, 5, dtype=DT)
    torch.testing.assert_close(ghost(x), ref(x))
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(ghost.state_dict()[k], v)


def test_ghost_normalizes_each_virtual_batch_and_tracks_the_full_batch():
    ghost = bnlab.GhostBatchNorm2d(3, virtual_batch_size=4, momentum=1.0).double()
    x = torch.randn(10, 3, 2, 2, dtype=DT) + torch.arange(10, dtype=DT).view(10, 1, 1, 1)
    y = ghost(x)
    assert ghost_splits(10, 4) == [4, 6] or ghost_splits(10, 4) == [4, 4, 2]
    start = 0
    for size in ghost_splits(10, 4):
        chunk = y[start:start + size]
        torch.testing.assert_close(chunk.mean((0, 2, 3)), torch.zeros(3, dtype=DT), atol=1e-10, rtol=0)
        start += size
    torch.testing.assert_close(ghost.running_mean, x.mean((0, 2, 3)))           # the whole batch
    ghost.eval()
    torch.testing.assert_close(ghost(x[:1]), (x[:1] - x.mean((0, 2, 3)).view(1, 3, 1, 1)) /
                               torch.sqrt(x.var((0, 2, 3)).view(1, 3, 1, 1) + ghost.eps))   # plain BN


def test_ghost_splits_never_leave_a_single_example():
    assert ghost_splits(9, 4) == [4, 5]
    assert ghost_splits(8, 4) == [4, 4]
    assert ghost_splits(7, 4) == [4, 3]


def test_ghost_gradcheck():
    ghost = bnlab.GhostBatchNorm1d(3, virtual_batch_size=3).double()
    x = torch.randn(9, 3, dtype=DT, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: ghost(x), (x,))


# -- FrozenBatchNorm and conversion ---------------------------------------------------------------

def test_convert_to_frozen_renorm_ghost_keeps_the_state():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(12, 4),
                          nn.BatchNorm1d(4, affine=False))
    for _ in range(3):
        model(torch.randn(6, 2, 4, 4))
    model.eval()
    x = torch.randn(5, 2, 4, 4)
    y = model(x)
    for target, kwargs in (("frozen", {}), ("renorm", {}), ("ghost", {"virtual_batch_size": 2})):
        converted = bnlab.convert(copy.deepcopy(model), to=target, **kwargs)
        torch.testing.assert_close(converted(x), y)
    frozen = bnlab.convert(copy.deepcopy(model), to="frozen").train()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    frozen(torch.randn(5, 2, 4, 4))
    assert all(torch.equal(v, before[k]) for k, v in frozen.state_dict().items())
    assert not any(p.requires_grad for m in frozen.modules() if isinstance(m, bnlab.FrozenBatchNorm)
                   for p in m.parameters())


def test_frozen_loads_a_bn_state_dict_and_gradchecks():
    bn = nn.BatchNorm1d(3, affine=False)
    bn(torch.randn(8, 3))
    fz = bnlab.FrozenBatchNorm(3)
    fz.load_state_dict(bn.state_dict())
    x = torch.randn(4, 3, dtype=DT, requires_grad=True)
    fz = fz.double()
    assert torch.autograd.gradcheck(lambda x: fz(x), (x,))


@pytest.mark.parametrize("make", [
    lambda **kw: bnlab.GhostBatchNorm1d(4, virtual_batch_size=8, **kw),
    lambda **kw: bnlab.DetachedNorm(4, scale=True, **kw),
    lambda **kw: bnlab.NoisyBatchNorm1d(4, **kw),
])
def test_every_variant_honours_the_ema_options_as_batchnorm_does(make):
    """One momentum helper for every layer: with ema="debiased" the first running mean is the
    batch's own (m_1 = 1), with momentum=None the running mean is the cumulative average. Ghost
    BN's own copy of the momentum logic once ignored ema="debiased"."""
    x1, x2 = torch.randn(32, 4) + 3, torch.randn(32, 4) - 1
    layer = make(ema="debiased", momentum=0.1)
    layer(x1)
    torch.testing.assert_close(layer.running_mean, x1.mean(0))
    layer = make(momentum=None)
    layer(x1)
    layer(x2)
    torch.testing.assert_close(layer.running_mean, (x1.mean(0) + x2.mean(0)) / 2)
    assert int(layer.num_batches_tracked) == 2
