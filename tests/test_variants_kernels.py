"""Ghost BN, Batch Renorm and Detached normalization on BN's compiled kernels (variants._grouped)
against their readable definitions (the same layers with the kernels switched off): outputs,
every gradient and the running statistics, over layouts, dtypes, virtual-batch splits (with a
remainder) and both running-statistics modes; float64 gradcheck and gradgradcheck of the
kernel path itself."""

import copy

import pytest
import torch

import bnlab
from bnlab import kernels
from bnlab.variants._grouped import kernels_for

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="no compiled CPU kernels on this machine")

SHAPES = [((11, 6), None), ((11, 6, 5), None), ((11, 6, 4, 3), None), ((11, 6, 4, 3), torch.channels_last)]


def _layers(dims: int, C: int = 6):
    """(name, constructor) pairs for a layer of the given input rank."""
    ghost = bnlab.GhostBatchNorm2d if dims == 4 else bnlab.GhostBatchNorm1d
    renorm = bnlab.BatchRenorm2d if dims == 4 else bnlab.BatchRenorm1d
    detached = bnlab.DetachedNorm2d if dims == 4 else bnlab.DetachedNorm
    return [("ghost-batch", lambda: ghost(C, virtual_batch_size=4)),
            ("ghost-virtual", lambda: ghost(C, virtual_batch_size=3, running_stats="virtual")),
            ("renorm", lambda: renorm(C, rmax=1.5, dmax=0.3, warmup=False)),
            ("renorm-virtual", lambda: renorm(C, rmax=1.5, dmax=0.3, warmup=False, virtual_batch_size=4)),
            ("detached-center", lambda: detached(C, affine=True)),
            ("detached-scale", lambda: detached(C, affine=True, scale=True))]


def _prepare(layer, x):
    """γ, β and running statistics away from their defaults (so r, d clip and every term shows)."""
    g = torch.Generator().manual_seed(3)
    C = layer.num_features
    with torch.no_grad():
        if layer.weight is not None:
            layer.weight.copy_(torch.rand(C, generator=g) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=g))
        layer.running_mean.copy_(torch.randn(C, generator=g) * 0.5)
        layer.running_var.copy_(torch.rand(C, generator=g) + 0.5)
    return layer.to(x.dtype)


def _step(layer, x, dy):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y.backward(dy)
    return y.detach(), x.grad, layer.weight.grad, layer.bias.grad


def _step_on_threads(layer, x, dy, threads: int):
    """_step with torch's thread count set to ``threads`` for the call."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _step(layer, x, dy)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=["2d", "3d", "nchw", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)], ids=["f64", "f32"])
def test_kernel_path_equals_the_definition(shape, fmt, dtype, tol):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g) * 2 + 1).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(*shape, generator=g).to(dtype)
    for name, make in _layers(len(shape)):
        fast = _prepare(make(), x)
        slow = copy.deepcopy(fast)
        assert kernels_for(x) is not None
        got = _step(fast, x, dy)
        with kernels.disabled():
            want = _step(slow, x, dy)
        for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
            torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=f"{name}: {what}")
        if fmt is not None:
            assert got[0].is_contiguous(memory_format=fmt), name
        for buf in ("running_mean", "running_var", "num_batches_tracked"):
            torch.testing.assert_close(getattr(fast, buf), getattr(slow, buf), atol=tol, rtol=tol,
                                       msg=f"{name}: {buf}")


@pytest.mark.parametrize("shape,fmt,dtype,tol", [((13, 32, 4, 3), torch.channels_last, torch.float32, 1e-4),
                                                  ((13, 16, 4, 3), torch.channels_last, torch.float64, 1e-10),
                                                  ((150, 48), None, torch.float32, 1e-4)],
                         ids=["channels_last-f32", "channels_last-f64", "2d-f32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_group_step_on_register_tiles_equals_the_definition(shape, fmt, dtype, tol, threads):
    """C a multiple of the vector width: each group's statistics and gradient sums run on the
    register-tile reductions (small groups in parallel with each other on two threads). Against
    the float64 definition, errors relative to each output's largest value: BN over virtual
    batches of 3 rows amplifies float32 rounding in dx (the definition in float32 is off by as
    much)."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
    if fmt is not None:
        x64 = x64.contiguous(memory_format=fmt)
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    for name, make in _layers(len(shape), shape[1]):
        fast = _prepare(make(), x64.to(dtype))
        slow = copy.deepcopy(fast).double()
        got = _step_on_threads(fast, x64.to(dtype), dy64.to(dtype), threads)
        with kernels.disabled():
            want = _step(slow, x64, dy64)
        if fmt is not None:
            assert got[0].is_contiguous(memory_format=fmt), name
        for what, a, b in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"),
                              got + (fast.running_mean, fast.running_var),
                              want + (slow.running_mean, slow.running_var)):
            torch.testing.assert_close(a.double(), b, atol=tol * b.abs().max().item(), rtol=tol, msg=f"{name}: {what}")


# gradcheck compares with the forward's true derivative: Detached normalization's gradient drops
# the statistics' terms by design, and Batch Renorm's treats r and d as constants (its forward
# equals the inference transform wherever they do not clip), so those are held to their
# definitions above; Renorm is gradchecked where its gradient is the true one (r = 1, d = 0).
GRADCHECKED = {"ghost-batch": lambda: bnlab.GhostBatchNorm2d(6, virtual_batch_size=4),
               "ghost-virtual": lambda: bnlab.GhostBatchNorm2d(6, virtual_batch_size=3, running_stats="virtual"),
               "renorm-bn": lambda: bnlab.BatchRenorm2d(6, rmax=1.0, dmax=0.0, warmup=False, virtual_batch_size=4)}


@pytest.mark.parametrize("name", list(GRADCHECKED))
def test_kernel_path_gradcheck_and_gradgradcheck(name):
    make = GRADCHECKED[name]
    x = torch.randn(9, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    layer = _prepare(make(), x)
    assert kernels_for(x) is not None

    def f(x, w, b):
        state = copy.deepcopy(layer)                  # every evaluation from the same running statistics
        return torch.func.functional_call(state, {"weight": w, "bias": b}, (x,))

    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_renorm_corrections_clip_on_the_kernel_path_as_in_the_definition():
    """With running statistics far from the batch's, r and d clip: the output equals
    γ·(x̂·r + d) + β with the clipped values (the readable formula written out here)."""
    layer = bnlab.BatchRenorm1d(4, rmax=2.0, dmax=0.5, warmup=False).double()
    with torch.no_grad():
        layer.running_mean.fill_(5.0)
        layer.running_var.fill_(100.0)
    x = torch.randn(16, 4, dtype=torch.float64)
    y = layer(x)
    mean, var = x.mean(0), x.var(0, unbiased=False)
    std, rstd = (var + layer.eps).sqrt(), torch.tensor(100.0 + layer.eps, dtype=torch.float64).sqrt()
    r = (std / rstd).clamp(0.5, 2.0)
    d = ((mean - 5.0) / rstd).clamp(-0.5, 0.5)
    torch.testing.assert_close(y, (x - mean) / std * r + d)


@pytest.mark.parametrize("name", [n for n, _ in _layers(4)])
def test_kernel_path_double_backward_equals_the_definitions(name):
    """create_graph=True through the compiled node (it calls its registered graph backward) against
    the readable layer: the gradient of a function of the gradient — also where the gradient is
    not the forward's derivative (Detached, Renorm with clipped r and d)."""
    make = dict(_layers(4))[name]
    g = torch.Generator().manual_seed(4)
    x0 = (torch.randn(9, 6, 3, 2, generator=g) * 2 + 1).double()
    dy = torch.randn(9, 6, 3, 2, generator=g).double()

    def run(layer):
        x = x0.clone().requires_grad_()
        gx, gw = torch.autograd.grad((layer(x) * dy).sum(), (x, layer.weight), create_graph=True)
        (gx.square().sum() + gw.square().sum()).backward()
        return gx.detach(), gw.detach(), x.grad, layer.weight.grad

    fast = _prepare(make(), x0)
    slow = copy.deepcopy(fast)
    got = run(fast)
    with kernels.disabled():
        want = run(slow)
    for what, a, b in zip(("dx", "dgamma", "d²/dx", "d²/dγ"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=f"{name}: {what}")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("v", [16, 3], ids=["large-groups", "small-groups"])
def test_group_orders_equal_the_definition(threads, v):
    """Groups of ≥ 2¹⁶ values run one after another, each pass parallel; smaller groups run in
    parallel with each other, each pass serial: both against the definition, at 1 and 2 threads,
    and the C++ node's closed-form backward is what ran."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(40, 8, 32, 32, generator=g) * 2 + 1 if v == 16 else torch.randn(40, 8, 3, 3, generator=g)
    dy = torch.randn(x.shape, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for make in (lambda: bnlab.GhostBatchNorm2d(8, virtual_batch_size=v),
                     lambda: bnlab.BatchRenorm2d(8, rmax=1.5, dmax=0.3, warmup=False, virtual_batch_size=v)):
            fast = make()
            with torch.no_grad():
                fast.weight.uniform_(0.5, 1.5, generator=g)
                fast.running_var.fill_(2.0)
            slow = copy.deepcopy(fast)
            calls = kernels.load().control.group_node_calls()
            got = _step(fast, x, dy)
            assert kernels.load().control.group_node_calls() == calls + 1
            with kernels.disabled():
                want = _step(slow, x, dy)
            for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=what)
            for buf in ("running_mean", "running_var"):
                torch.testing.assert_close(getattr(fast, buf), getattr(slow, buf), atol=1e-5, rtol=1e-5)
    finally:
        torch.set_num_threads(before)


LP = [(p, g) for p in (1, 2, "inf") for g in (1, 3)]


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=["2d", "3d", "nchw", "channels_last"])
@pytest.mark.parametrize("p,groups", LP, ids=[f"p{p}-g{g}" for p, g in LP])
def test_lp_kernels_equal_the_definition(shape, fmt, p, groups):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g) * 2 + 1).double()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(*shape, generator=g).double()
    make = bnlab.LpNorm2d if len(shape) == 4 else bnlab.LpNorm1d
    fast = make(6, p=p, groups=groups).double()
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5, generator=g)
        fast.bias.uniform_(-1, 1, generator=g)
    slow = copy.deepcopy(fast)
    assert kernels_for(x) is not None
    calls = kernels.load().control.lp_node_calls()
    got = _step(fast, x, dy)
    assert kernels.load().control.lp_node_calls() == calls + 1          # the C++ node's backward ran
    with kernels.disabled():
        want = _step(slow, x, dy)
    for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=what)
    for buf in ("running_mean", "running_scale", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast, buf), getattr(slow, buf), atol=1e-12, rtol=1e-10, msg=buf)


@pytest.mark.parametrize("p", [1, 2, "inf"])
@pytest.mark.parametrize("groups", [1, 3, 4])
@pytest.mark.parametrize("data", ["normal", "integers"])
def test_lp_register_tiles_equal_the_definition(p, groups, data):
    """channels_last images with C a multiple of the vector width take the register-tile passes
    (per-channel means, the backward's sums); groups of 8 and of 6 channels (one straddling two
    vectors); integer data puts values at the mean and ties at the maximum."""
    g = torch.Generator().manual_seed(4)
    shape = (9, 24, 4, 3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1
    if data == "integers":
        x = torch.randint(-2, 3, shape, generator=g).double()
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64)
    fast = bnlab.LpNorm2d(24, p=p, groups=groups).double()
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5, generator=g)
        fast.bias.uniform_(-1, 1, generator=g)
    slow = copy.deepcopy(fast)
    got = _step(fast, x, dy)
    with kernels.disabled():
        want = _step(slow, x, dy)
    for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=what)


@pytest.mark.parametrize("shape,dtype,tol", [((5, 144, 9, 10), torch.float32, 2e-4),
                                             ((3, 72, 9, 10), torch.float64, 1e-10)], ids=["f32", "f64"])
@pytest.mark.parametrize("p", [1, 2, "inf"])
@pytest.mark.parametrize("threads", [1, 2])
def test_lp_register_tiles_on_wide_rows_and_long_samples(shape, dtype, tol, p, threads):
    """Rows of several tiles (a full tile and a partial one: the blocked, prefetched walk) and
    samples of 90 rows (two chunks each), integer data (ties at the maximum), groups of 48 / 24
    channels, on one and two threads; against the float64 definition."""
    g = torch.Generator().manual_seed(6)
    x64 = torch.randint(-3, 4, shape, generator=g).double().contiguous(memory_format=torch.channels_last)
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    fast = bnlab.LpNorm2d(shape[1], p=p, groups=3)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5, generator=g)
        fast.bias.uniform_(-1, 1, generator=g)
    slow = copy.deepcopy(fast).double()
    fast = fast.to(dtype)
    got = _step_on_threads(fast, x64.to(dtype), dy64.to(dtype), threads)
    with kernels.disabled():
        want = _step(slow, x64, dy64)
    for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        torch.testing.assert_close(a.double(), b, atol=tol, rtol=tol, msg=what)


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_lp_bfloat16_on_register_tiles_equals_the_float64_definition(p):
    """bfloat16 channels_last: the tiles load bfloat16 (means, norms, the backward's sums) and
    accumulate in float; the dx pass stays scalar (its stores round to bfloat16)."""
    g = torch.Generator().manual_seed(7)
    shape = (6, 32, 5, 6)
    x64 = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).bfloat16().double()
    x64 = x64.contiguous(memory_format=torch.channels_last)
    dy64 = torch.randn(*shape, generator=g, dtype=torch.float64).bfloat16().double()
    fast = bnlab.LpNorm2d(32, p=p, groups=2)
    slow = copy.deepcopy(fast).double()
    got = _step(fast.bfloat16(), x64.bfloat16(), dy64.bfloat16())
    with kernels.disabled():
        want = _step(slow, x64, dy64)
    for what, a, b in zip(("y", "dx"), got, want):
        torch.testing.assert_close(a.double(), b, atol=5e-2, rtol=2e-2, msg=what)


def test_lp_infinity_splits_the_gradient_among_ties_as_torch_does():
    """Two values at a sample's maximum |z| share its gradient, as torch.amax's backward splits it."""
    x = torch.tensor([[3.0, -3.0, 0.5], [-1.0, 1.0, 0.0], [0.0, 0.0, -0.5], [-2.0, 2.0, 0.0]], dtype=torch.float64)
    dy = torch.randn(4, 3, dtype=torch.float64)
    fast, slow = bnlab.LpNorm1d(3, p="inf").double(), bnlab.LpNorm1d(3, p="inf").double()
    got = _step(fast, x, dy)
    with kernels.disabled():
        want = _step(slow, x, dy)
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize("shape,fmt", [((130, 70), None), ((33, 40, 7, 9), None),
                                       ((33, 40, 7, 9), torch.channels_last), ((21, 48, 9, 10), torch.channels_last)],
                         ids=["2d", "nchw", "channels_last", "channels_last tiles"])
@pytest.mark.parametrize("p", [1, 2, "inf"])
@pytest.mark.parametrize("data", ["normal", "integers"])
def test_lp_float32_kernels_on_long_rows_match_the_float64_definition(shape, fmt, p, data):
    """float32 at sizes where the kernels' vectorized loops and their tails run; integer-valued
    inputs put many values exactly at the mean (z = 0, where sign's subgradient is 0) and at
    each sample's maximum (ties for p = ∞)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g) * 2 + 1
    if data == "integers":
        x = torch.randint(-2, 3, shape, generator=g).float()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(*shape, generator=g)
    make = bnlab.LpNorm2d if len(shape) == 4 else bnlab.LpNorm1d
    fast = make(shape[1], p=p, groups=2)
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5, generator=g)
        fast.bias.uniform_(-1, 1, generator=g)
    slow = copy.deepcopy(fast).double()
    assert kernels_for(x) is not None
    got = _step(fast, x, dy)
    with kernels.disabled():
        want = _step(slow, x.double(), dy.double())
    for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        torch.testing.assert_close(a.double(), b, atol=2e-4, rtol=2e-4, msg=what)


@pytest.mark.parametrize("p", [1, 2, "inf"])
def test_lp_kernel_path_gradcheck_and_gradgradcheck(p):
    x = torch.randn(7, 6, 3, 2, dtype=torch.float64, requires_grad=True)
    layer = bnlab.LpNorm2d(6, p=p, groups=2).double()
    w = torch.rand(6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(copy.deepcopy(layer), {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


WHITENERS = {"zca": lambda C: bnlab.DecorrelatedBatchNorm(C, group_size=4),
             "pca": lambda C: bnlab.DecorrelatedBatchNorm(C, group_size=4, whitening="pca"),
             "pca_stablegrad": lambda C: bnlab.DecorrelatedBatchNorm(C, group_size=4, whitening="pca_stablegrad"),
             "iternorm": lambda C: bnlab.IterNorm(C, group_size=4)}


@pytest.mark.parametrize("shape,fmt", [((32, 12), None), ((16, 12, 5), None), ((16, 12, 4, 3), None),
                                       ((16, 12, 4, 3), torch.channels_last)],
                         ids=["2d", "3d", "nchw", "channels_last"])
@pytest.mark.parametrize("name", list(WHITENERS))
@pytest.mark.parametrize("products,running", [("kernels", 0.0), ("kernels", 1e4), ("torch", 0.0)],
                         ids=["kernels-shifted", "kernels-shift-rejected", "torch"])
def test_whitening_batched_products_equal_the_definition(shape, fmt, name, products, running, monkeypatch):
    """The batched-product path (variants.whitening._WhitenFn) — on the compiled whitening entries
    (whiten_moments, whiten_apply, whiten_grad_sums, whiten_grad_x), or on torch's batched
    products where the kernels are absent — against the
    readable path (forced by declaring no layout it takes). The kernels' one-pass covariance
    shifted by the running mean (0, near the batch's mean of ≈ 1) and the second pass that
    replaces it when the running mean is far off (1e4)."""
    from bnlab.variants import whitening
    if products == "torch":
        monkeypatch.setattr(whitening, "_kernels", lambda x: None)
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(*shape, generator=g) * 2 + 1).double()
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(*shape, generator=g).double()
    fast = WHITENERS[name](12).double()
    with torch.no_grad():
        fast.weight.uniform_(0.5, 1.5, generator=g)
        fast.bias.uniform_(-1, 1, generator=g)
        fast.running_mean.fill_(running)
    slow = copy.deepcopy(fast)
    got = _step(fast, x, dy)
    monkeypatch.setattr(whitening, "_viewable", lambda x: False)
    want = _step(slow, x, dy)
    for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-8, msg=what)
    for buf in ("running_mean", "running_whitening", "num_batches_tracked"):
        torch.testing.assert_close(getattr(fast, buf), getattr(slow, buf), atol=1e-12, rtol=1e-10, msg=buf)
    if fmt is not None:
        assert got[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", ["zca", "iternorm"])
@pytest.mark.parametrize("shape,fmt", [((70, 32), None), ((24, 32, 3, 3), None), ((24, 32, 3, 3), torch.channels_last)],
                         ids=["2d", "nchw", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("track", [True, False], ids=["running", "no-running"])
def test_whitening_on_the_vector_tiles_equals_torch_products(name, shape, fmt, dtype, tol, track, monkeypatch):
    """Groups of 16 (one 64-byte vector in float32, two in float64) through the module: the
    compiled step — Σ exactly symmetric, the shift by the running mean or (without running
    statistics) by 0, rejected for a mean of 3σ — and the compiled eval, against torch's products."""
    from bnlab.variants import whitening
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(*shape, generator=g) + torch.linspace(-1, 3, shape[1]).view(1, -1, *([1] * (len(shape) - 2))))
    x = x.to(dtype)
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    dy = torch.randn(*shape, generator=g).to(dtype)
    k = kernels.load()
    mean, sigma, finite = k.whiten_moments(x, None, 16, 1e-5)
    assert finite and torch.equal(sigma, sigma.transpose(1, 2))
    results = []
    for products in ("kernels", "torch"):
        if products == "torch":
            monkeypatch.setattr(whitening, "_kernels", lambda t: None)
        layer = (bnlab.IterNorm if name == "iternorm" else bnlab.DecorrelatedBatchNorm)(
            32, group_size=16, track_running_stats=track).to(dtype)
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            layer.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
        got = list(_step(layer, x, dy))
        if track:
            got += [layer.running_mean.clone(), layer.running_whitening.clone()]
            with torch.no_grad():
                got.append(layer.eval()(x))
        results.append(got)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    if fmt is not None:
        assert results[0][0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", ["zca", "iternorm"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("wants", ["all", "x only", "params only"])
def test_whitening_kernel_step_equals_torch_products(name, fmt, dtype, tol, wants, monkeypatch):
    """The compiled step against torch's batched products where the first test does not go:
    affine=False, float32, and a backward wanting only dx or only dγ, dβ (and a mean of 3σ, so
    the first step's shift by the zero running mean is rejected)."""
    from bnlab.variants import whitening
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(16, 12, 4, 3, generator=g) + 3).to(dtype)
    x = x.contiguous(memory_format=fmt) if fmt is not None else x
    dy = torch.randn(16, 12, 4, 3, generator=g).to(dtype)
    results = []
    for products in ("kernels", "torch"):
        if products == "torch":
            monkeypatch.setattr(whitening, "_kernels", lambda t: None)
        for affine in (False, True):
            layer = WHITENERS[name](12).to(dtype)
            if not affine:
                layer.weight, layer.bias = None, None
            else:
                with torch.no_grad():
                    layer.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
                    layer.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))
            xi = x.detach().clone().requires_grad_(wants != "params only")
            if affine and wants == "x only":
                layer.weight.requires_grad_(False), layer.bias.requires_grad_(False)
            y = layer(xi)
            if y.requires_grad:                         # (params only without γ, β: nothing to differentiate)
                y.backward(dy)
            grads = [xi.grad] + ([layer.weight.grad, layer.bias.grad] if affine else [])
            results.append([y.detach(), layer.running_mean.clone(), layer.running_whitening.clone()] + grads)
    half = len(results) // 2
    for got, want in zip(results[:half], results[half:]):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, atol=tol, rtol=tol)



@pytest.mark.parametrize("name", ["zca", "iternorm"])
def test_whitening_batched_products_gradcheck_and_gradgradcheck(name):
    x = torch.randn(10, 8, 3, 2, dtype=torch.float64, requires_grad=True)
    layer = WHITENERS[name](8).double()
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(8, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return torch.func.functional_call(copy.deepcopy(layer), {"weight": w, "bias": b}, (x,))

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_lp_and_detached_eval_on_bn_kernel_equal_their_readable_definitions(fmt):
    from bnlab.variants.detached import detached_norm
    from bnlab.variants.lp import lp_norm
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(9, 6, 5, 4, generator=g) * 3 + 1).double()
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    lp = bnlab.LpNorm2d(6, p=1, groups=3).double()
    layers = [lp] + [bnlab.DetachedNorm2d(6, affine=True, center=c, scale=s).double()
                     for c, s in ((True, True), (True, False), (False, True), (False, False))]
    for layer in layers:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5, generator=g)
            layer.bias.uniform_(-1, 1, generator=g)
        layer.train()(x)
        layer.eval()
        xr = x.clone().requires_grad_()
        got = layer(xr)
        got.backward(torch.ones_like(got))
        xd = x.clone().requires_grad_()
        if layer is lp:
            want = lp_norm(xd, lp.running_mean, lp.running_scale, lp.weight, lp.bias, lp.eps, 3)
        else:
            mean = layer.running_mean if layer.center else torch.zeros(6, dtype=x.dtype)
            want = detached_norm(xd, mean, layer.running_var if layer.scale else None, layer.weight, layer.bias,
                                 layer.eps)
        want.backward(torch.ones_like(want))
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(xr.grad, xd.grad, atol=1e-12, rtol=1e-10)
        with torch.no_grad():                    # no graph wanted: the one-call kernel entry (scaled_eval)
            torch.testing.assert_close(layer(x), want.detach(), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("shape,fmt", SHAPES, ids=["2d", "3d", "nchw", "channels_last"])
@pytest.mark.parametrize("make", [lambda: bnlab.DecorrelatedBatchNorm(6, group_size=3),
                                  lambda: bnlab.IterNorm(6, group_size=2)], ids=["zca", "iternorm"])
def test_whitening_eval_equals_running_matrix_applied_per_group(shape, fmt, make):
    """Eval: y_c = γ_c · Σ_j W_g[c, j] (x_j − μ_j) + β_c within each group, by hand."""
    g = torch.Generator().manual_seed(6)
    layer = make().double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5, generator=g)
        layer.bias.uniform_(-1, 1, generator=g)
    x = (torch.randn(*shape, generator=g) * 2 + 1).double()
    layer.train()(x)
    layer(x * 0.5 + 1)
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    xr = x.clone().requires_grad_()
    got = layer.eval()(xr)
    groups, G = layer.groups, 6 // layer.groups
    xd = x.clone().requires_grad_()
    xc = xd - layer.running_mean.view(1, 6, *([1] * (x.dim() - 2)))
    blocks = [torch.einsum("ij,nj...->ni...", layer.running_whitening[k], xc[:, k * G:(k + 1) * G])
              for k in range(groups)]
    want = torch.cat(blocks, 1) * layer.weight.view(1, 6, *([1] * (x.dim() - 2))) \
        + layer.bias.view(1, 6, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    dy = torch.randn(got.shape, generator=g, dtype=got.dtype)
    got.backward(dy)
    want.backward(dy)
    torch.testing.assert_close(xr.grad, xd.grad, atol=1e-12, rtol=1e-10)
    with torch.no_grad():                        # no graph wanted: one whiten_apply call
        nograd = layer(x)
    torch.testing.assert_close(nograd, want.detach(), atol=1e-12, rtol=1e-10)
    if fmt is not None:
        assert nograd.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("name", list(WHITENERS))
def test_whitening_backward_twice_with_retained_graph_doubles_the_gradient(name):
    """The backward reuses the forward's small matrix-function graph (one eigendecomposition a
    step): a retained graph must give the same gradient on a second backward."""
    x = torch.randn(16, 12, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(16, 12, dtype=torch.float64)
    y = WHITENERS[name](12).double()(x)
    y.backward(dy, retain_graph=True)
    first = x.grad.clone()
    y.backward(dy)
    torch.testing.assert_close(x.grad, 2 * first)


def _per_group(t, G):
    """t (N, C, *) → (g, G, m) float64 with the samples of each channel along the last axis."""
    C = t.shape[1]
    return t.transpose(0, 1).reshape(C, -1).double().view(C // G, G, -1)


@pytest.mark.parametrize("shape,fmt", [((37, 48), None), ((5, 48, 29), None), ((3, 48, 7, 11), None),
                                       ((3, 48, 7, 11), torch.channels_last)],
                         ids=["2d", "3d", "nchw", "channels_last"])
@pytest.mark.parametrize("G", [1, 3, 8, 16, 48])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_group_cross_and_apply_equal_float64_products(shape, fmt, G, dtype, tol, threads):
    """The whitening kernels against float64 products of the per-group matrices: every layout,
    group sizes the vector tiles take (16, 48) and those they leave to plain loops (1, 3, 8),
    lengths with a tail (29, 77 values per channel), a large mean (centering), 1 and 2 threads."""
    _check_group_kernels(shape, fmt, G, dtype, tol, threads)


@pytest.mark.parametrize("shape,fmt", [((37, 64), None), ((3, 64, 5, 7), torch.channels_last)], ids=["2d", "channels_last"])
@pytest.mark.parametrize("G", [32, 64])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-6)], ids=["f64", "f32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_group_kernels_on_groups_of_several_vectors(shape, fmt, G, dtype, tol, threads):
    """The rows layout's tiles of two and four 64-byte vectors a group (G = 32, 64 in float32;
    32 in float64) and the plain loops beyond (64 in float64), rows a multiple of no tile height."""
    _check_group_kernels(shape, fmt, G, dtype, tol, threads)


def _check_group_kernels(shape, fmt, G, dtype, tol, threads):
    k = kernels.load()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(G)
        a = (torch.randn(*shape, generator=g) * 2 + 50).to(dtype)
        b = torch.randn(*shape, generator=g).to(dtype)
        if fmt is not None:
            a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
        dims = [0] + list(range(2, a.dim()))
        mu = a.double().mean(dims)
        A, B = _per_group(a, G) - mu.view(-1, G, 1), _per_group(b, G)
        P, S = k.group_cross(a, mu, None, mu, G)                      # the Gram of a, centered
        want = A @ A.transpose(1, 2)
        torch.testing.assert_close(P, want, atol=tol * want.abs().max().item(), rtol=0)
        assert torch.equal(P, P.transpose(1, 2))
        P2, S2 = k.group_cross(b, None, a, mu, G)                     # Σ b (a − μ)ᵀ and Σ b
        want2 = B @ A.transpose(1, 2)
        torch.testing.assert_close(P2, want2, atol=tol * 50 * want2.abs().max().item(), rtol=0)
        torch.testing.assert_close(S2, b.double().sum(dims), atol=tol * 50 * b.numel() ** 0.5, rtol=0)
        C = shape[1]
        Wa = torch.randn(C // G, G, G, generator=g, dtype=torch.float64)
        Wb = torch.randn(C // G, G, G, generator=g, dtype=torch.float64)
        c = torch.randn(C, generator=g, dtype=torch.float64)
        for two in (False, True):
            out = k.group_apply(a, Wa, b if two else None, Wb if two else None, c)
            Y = Wa @ _per_group(a, G) + c.view(-1, G, 1) + (Wb @ B if two else 0)
            want3 = Y.reshape(C, shape[0], *shape[2:]).transpose(0, 1)
            assert out.dtype == dtype and out.stride() == a.stride()
            torch.testing.assert_close(out.double(), want3, atol=tol * 50 * want3.abs().max().item(), rtol=0)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("shape,fmt,G", [((37, 48), None, 16), ((37, 48), None, 48), ((5, 48, 4, 8), None, 16),
                                         ((5, 48, 4, 8), None, 48), ((3, 64, 5, 7), torch.channels_last, 16),
                                         ((3, 64, 5, 7), torch.channels_last, 32)],
                         ids=["2d-16", "2d-48", "nchw-16", "nchw-48", "channels_last-16", "channels_last-32"])
@pytest.mark.parametrize("threads", [1, 2])
def test_group_apply_streamed_stores_equal_cached_stores(shape, fmt, G, threads):
    """The output pass's streaming stores (taken when the pass's bytes pass the threshold, here
    forced to 0) write exactly what its normal stores write: every row tile, the rows' remainder
    (37 rows), NCHW rows on whole lines (L = 32), one and two operands, 1 and 2 threads."""
    k = kernels.load()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(G + threads)
        a, b = torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)
        if fmt is not None:
            a, b = a.contiguous(memory_format=fmt), b.contiguous(memory_format=fmt)
        C = shape[1]
        A, B = (torch.randn(C // G, G, G, generator=g, dtype=torch.float64) for _ in range(2))
        c = torch.randn(C, generator=g, dtype=torch.float64)
        for two in (False, True):
            args = (a, A, b if two else None, B if two else None, c)
            old = k.control.set_stream_threshold(-1)
            try:
                cached = k.group_apply(*args)
                k.control.set_stream_threshold(0)
                streamed = k.group_apply(*args)
            finally:
                k.control.set_stream_threshold(old)
            assert torch.equal(streamed, cached)
            Y = A @ _per_group(a, G) + c.view(-1, G, 1) + (B @ _per_group(b, G) if two else 0)
            want = Y.reshape(C, shape[0], *shape[2:]).transpose(0, 1)
            torch.testing.assert_close(streamed.double(), want, atol=1e-4 * want.abs().max().item(), rtol=0)
    finally:
        torch.set_num_threads(before)


def test_group_kernels_reject_what_they_do_not_take():
    k = kernels.load()
    x = torch.randn(4, 6, 3, 3)
    mu = x.mean([0, 2, 3]).double()
    with pytest.raises(RuntimeError, match="groups of 4"):
        k.group_cross(x, mu, None, mu, 4)
    with pytest.raises(RuntimeError, match="shape, strides and dtype"):
        k.group_cross(x, None, x.contiguous(memory_format=torch.channels_last), mu, 3)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        k.group_apply(x.half(), torch.eye(3).repeat(2, 1, 1), None, None, torch.zeros(6))
    with pytest.raises(RuntimeError, match="go together"):
        k.group_apply(x, torch.eye(3).repeat(2, 1, 1), x, None, torch.zeros(6))


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_whitening_kernels_take_an_incoming_gradient_of_any_layout(fmt, monkeypatch):
    """dy in another layout than x (contiguous against channels_last, a permuted view) is brought
    to x's layout before the kernels read it: the gradients equal torch's batched products'."""
    from bnlab.variants import whitening
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 12, 5, 4, generator=g, dtype=torch.float64)
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    dys = [torch.randn(8, 12, 5, 4, generator=g, dtype=torch.float64),
           torch.randn(4, 12, 5, 8, generator=g, dtype=torch.float64).permute(3, 1, 2, 0)]
    for dy in dys:
        fast = bnlab.DecorrelatedBatchNorm(12, group_size=4).double()
        slow = copy.deepcopy(fast)
        got = _step(fast, x, dy)
        with monkeypatch.context() as m:
            m.setattr(whitening, "_kernels", lambda t: None)
            want = _step(slow, x, dy)
        for what, a, b in zip(("y", "dx", "dgamma", "dbeta"), got, want):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=what)


@pytest.mark.parametrize("G,dtype,tol", [(3, torch.float64, 1e-12), (8, torch.float64, 1e-12), (16, torch.float64, 1e-12),
                                         (20, torch.float64, 1e-12), (24, torch.float64, 1e-12),
                                         (32, torch.float64, 1e-12), (64, torch.float64, 1e-11),
                                         (16, torch.float32, 2e-5), (32, torch.float32, 2e-5),
                                         (48, torch.float32, 5e-5), (64, torch.float32, 5e-5)])
@pytest.mark.parametrize("T", [1, 5])
@pytest.mark.parametrize("threads", [1, 2])
def test_newton_kernel_equals_the_iterations(G, dtype, tol, T, threads):
    """IterNorm's small-matrix work on the kernels (newton_inv_sqrt and its backward: register
    rows for G a multiple of a vector's lanes, plain loops otherwise) against iternorm_matrix's
    torch iterations and autograd's vector-Jacobian product through them."""
    from bnlab.variants import whitening
    g = torch.Generator().manual_seed(G + T)
    A = torch.randn(5, G, 3 * G, generator=g, dtype=torch.float64)
    sigma = (A @ A.transpose(1, 2) / (3 * G) + 1e-3 * torch.eye(G, dtype=torch.float64)).to(dtype)
    dW = torch.randn(5, G, G, generator=g, dtype=torch.float64).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        s1, s2 = sigma.clone().requires_grad_(), sigma.clone().requires_grad_()
        W1, W2 = whitening.iternorm_matrix(s1, T), whitening._newton(s2, T)
        assert W2.grad_fn is not None and "Newton" in type(W2.grad_fn).__name__      # the kernel ran
        (d1,), (d2,) = torch.autograd.grad(W1, s1, dW), torch.autograd.grad(W2, s2, dW)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(W2, W1, atol=tol * W1.abs().max().item(), rtol=0)
    torch.testing.assert_close(d2, d1, atol=tol * d1.abs().max().item(), rtol=0)


def test_newton_kernel_gradcheck_gradgradcheck_and_bad_input():
    from bnlab.variants import whitening
    A = torch.randn(2, 4, 8, dtype=torch.float64)
    s = (A @ A.transpose(1, 2) / 8 + 0.1 * torch.eye(4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: whitening._newton(s, 3), (s,))
    assert torch.autograd.gradgradcheck(lambda s: whitening._newton(s, 3), (s,))
    k = kernels.load()
    with pytest.raises(RuntimeError, match="sigma must be"):
        k.newton_inv_sqrt(torch.randn(2, 3, 4), 5)
    with pytest.raises(RuntimeError, match="T ≥ 1"):
        k.newton_inv_sqrt(torch.randn(2, 3, 3), 0)
    with pytest.raises(RuntimeError, match="float32 or float64"):
        k.newton_inv_sqrt(torch.randn(2, 3, 3).half(), 5)
    W, P = k.newton_inv_sqrt(torch.eye(3).expand(2, 3, 3).contiguous(), 4)
    with pytest.raises(RuntimeError, match="do not match"):
        k.newton_inv_sqrt_backward(torch.randn(2, 3, 3), torch.eye(3).expand(2, 3, 3).contiguous(), P[:, :1])


def _spectra(G, g, gen):
    """(g, G, G) float64 SPD test matrices: Wishart + εI, a multiple of I (one eigenvalue G times),
    repeated eigenvalues in a rotated basis, eigenvalues from 1e-6 to 1e2, a large scale, rank G/2 + ε."""
    A = torch.randn(g, G, 3 * G, generator=gen, dtype=torch.float64)
    out = [A @ A.transpose(1, 2) / (3 * G) + 1e-5 * torch.eye(G, dtype=torch.float64)]
    Q, _ = torch.linalg.qr(torch.randn(g, G, G, generator=gen, dtype=torch.float64))
    for lam in (torch.full((G,), 2.5, dtype=torch.float64),
                torch.tensor([1.0, 1.0, 3.0, 3.0] * G, dtype=torch.float64)[:G],
                torch.logspace(-6, 2, G, dtype=torch.float64),
                torch.linspace(1, 4, G, dtype=torch.float64) * 1e6):
        out.append(Q @ torch.diag_embed(lam.expand(g, G)) @ Q.transpose(1, 2))
    B = torch.randn(g, G, max(1, G // 2), generator=gen, dtype=torch.float64)
    out.append(B @ B.transpose(1, 2) + 1e-5 * torch.eye(G, dtype=torch.float64))
    return out


@pytest.mark.parametrize("G,g", [(1, 3), (3, 9), (16, 8), (16, 37), (17, 5), (64, 2)])
@pytest.mark.parametrize("threads", [1, 2])
def test_zca_kernel_equals_the_eigendecomposition(G, g, threads):
    """ZCA's Σ^(−½) on the kernels (Jacobi, eight matrices a vector) against _InvSqrtm on LAPACK's
    eigh and its autograd product, on spectra that stress an eigensolver (equal, repeated, spread
    over eight decades, large, rank-deficient + ε), group counts that fill no whole set of eight;
    and the closed forms: W·Σ·W = I, W exactly symmetric, D orthonormal, Σ = D·diag(s²)·Dᵀ."""
    from bnlab.variants.whitening import inv_sqrtm
    k = kernels.load()
    gen = torch.Generator().manual_seed(G * 100 + g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for sigma in _spectra(G, g, gen):
            eye = torch.eye(G, dtype=torch.float64)
            W, Dm, s = k.zca_inv_sqrt(sigma)
            cond = (s.max(-1).values / s.min(-1).values).square().max().item()
            s1 = sigma.clone().requires_grad_()
            want = inv_sqrtm(s1)
            scale = want.abs().max().item()
            torch.testing.assert_close(W, want.detach(), atol=1e-13 * cond * scale, rtol=0)
            assert torch.equal(W, W.transpose(1, 2))
            torch.testing.assert_close(W @ sigma @ W, eye.expand(g, G, G), atol=1e-12 * cond, rtol=0)
            torch.testing.assert_close(Dm.transpose(1, 2) @ Dm, eye.expand(g, G, G), atol=1e-13, rtol=0)
            torch.testing.assert_close(Dm @ torch.diag_embed(s.square()) @ Dm.transpose(1, 2), sigma,
                                       atol=1e-13 * sigma.abs().max().item(), rtol=0)
            dW = torch.randn(g, G, G, generator=gen, dtype=torch.float64)
            d_want, = torch.autograd.grad(want, s1, dW)
            d_got = k.zca_inv_sqrt_backward(dW, Dm, s)
            torch.testing.assert_close(d_got, d_want, atol=1e-12 * cond * d_want.abs().max().item(), rtol=0)
            W32, _, _ = k.zca_inv_sqrt(sigma.float())
            assert W32.dtype == torch.float32
            if cond < 1e4:
                torch.testing.assert_close(W32.double(), want.detach(), atol=1e-5 * scale, rtol=0)
    finally:
        torch.set_num_threads(before)


def test_zca_kernel_gradcheck_module_path_and_bad_input():
    """The hand-written backward by gradcheck in float64; groups over 16 keep torch's eigh; NaN
    comes out NaN (no endless sweeps); bad input is refused."""
    k = kernels.load()
    gen = torch.Generator().manual_seed(3)
    A = torch.randn(3, 5, 12, generator=gen, dtype=torch.float64)
    sigma = (A @ A.transpose(1, 2) / 12 + 0.1 * torch.eye(5, dtype=torch.float64)).requires_grad_()

    class Zca(torch.autograd.Function):
        @staticmethod
        def forward(ctx, s):
            W, Dm, sv = k.zca_inv_sqrt(s)
            ctx.save_for_backward(Dm, sv)
            return W

        @staticmethod
        def backward(ctx, dW):
            return k.zca_inv_sqrt_backward(dW, *ctx.saved_tensors)

    # perturbations of a symmetric input are not symmetric: gradcheck on the symmetrized input
    assert torch.autograd.gradcheck(lambda s: Zca.apply(0.5 * (s + s.transpose(1, 2))), (sigma,))
    from bnlab.variants.whitening import inv_sqrtm
    B = torch.randn(2, 32, 64, generator=gen, dtype=torch.float64)
    big = B @ B.transpose(1, 2) / 64 + 0.1 * torch.eye(32, dtype=torch.float64)
    W32, _ = bnlab.DecorrelatedBatchNorm(64, group_size=32).double()._matrix_vjp(big)   # G > 16: LAPACK's eigh
    assert torch.equal(W32, inv_sqrtm(big))
    nan = sigma.detach().clone()
    nan[1, 2, 3] = nan[1, 3, 2] = float("nan")
    Wn, _, _ = k.zca_inv_sqrt(nan)
    assert torch.isnan(Wn[1]).any() and torch.isfinite(Wn[0]).all() and torch.isfinite(Wn[2]).all()
    with pytest.raises(RuntimeError, match="sigma must be"):
        k.zca_inv_sqrt(torch.randn(2, 3, 4))
    with pytest.raises(RuntimeError, match="float32 or float64"):
        k.zca_inv_sqrt(torch.eye(3).expand(2, 3, 3).half())
    _, Dm, sv = k.zca_inv_sqrt(torch.eye(3).expand(2, 3, 3).contiguous())
    with pytest.raises(RuntimeError, match="do not match"):
        k.zca_inv_sqrt_backward(torch.randn(2, 3, 3), Dm[:1], sv)


@pytest.mark.parametrize("shape,fmt", [((37, 32), None), ((6, 32, 5, 3), None), ((6, 32, 5, 3), torch.channels_last)],
                         ids=["2d", "nchw", "channels_last"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)], ids=["f64", "f32"])
@pytest.mark.parametrize("affine", [True, False])
def test_whitening_node_equals_the_python_step(shape, fmt, dtype, tol, affine):
    """ZCA (G ≤ 16), IterNorm and PCA train through the compiled node (whiten_train) — ZCA with
    G = 32 and the PCA controls do not — and the node's output, gradients and running statistics
    equal the Python step (_WhitenFn on the same kernels) it replaces; PCA's exactly (the same
    eigh and autograd through it: its training is chaotic, so the lab's PCA arms stay the same);
    eval afterwards reads the same buffers."""
    from bnlab.variants import whitening as Wh
    k = kernels.load()
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(*shape, generator=g) * 2 + 1).to(dtype)
    x = x if fmt is None else x.contiguous(memory_format=fmt)
    dy = torch.randn(*shape, generator=g).to(dtype)
    for make, node in ((lambda: bnlab.DecorrelatedBatchNorm(32, group_size=16, affine=affine), True),
                       (lambda: bnlab.IterNorm(32, group_size=8, T=4, affine=affine), True),
                       (lambda: bnlab.DecorrelatedBatchNorm(32, group_size=16, whitening="pca", affine=affine), True),
                       (lambda: bnlab.DecorrelatedBatchNorm(32, group_size=32, whitening="pca", affine=affine), True),
                       (lambda: bnlab.DecorrelatedBatchNorm(32, group_size=16, whitening="pca_aligned",
                                                            affine=affine), False),
                       (lambda: bnlab.DecorrelatedBatchNorm(32, group_size=32, affine=affine), False)):
        a = make().to(dtype)
        if affine:
            with torch.no_grad():
                a.weight.uniform_(0.5, 1.5, generator=g)
                a.bias.uniform_(-1, 1, generator=g)
        b = copy.deepcopy(a)
        b._node = lambda: None                                  # the Python step
        outs = []
        for layer in (a, b):
            xr = x.clone().requires_grad_()
            calls = k.control.whiten_node_calls()
            for _ in range(2):                                  # the second step reads the updated buffers
                xr.grad = None
                y = layer(xr)
                y.backward(dy)
            ran = k.control.whiten_node_calls() - calls
            outs.append((y.detach(), xr.grad, [p.grad for p in layer.parameters()], ran))
        assert outs[0][3] == (2 if node else 0) and outs[1][3] == 0
        if getattr(a, "whitening", None) == "pca":
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
            assert all(torch.equal(p, q) for p, q in zip(outs[0][2], outs[1][2]))
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=tol, rtol=tol)
        assert outs[0][0].stride() == x.stride()
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=tol, rtol=tol)
        for p, q in zip(outs[0][2], outs[1][2]):
            torch.testing.assert_close(p, q, atol=tol, rtol=tol)
        for name in ("running_mean", "running_whitening", "num_batches_tracked"):
            torch.testing.assert_close(getattr(a, name), getattr(b, name), atol=tol, rtol=tol)
        a.eval(), b.eval()
        torch.testing.assert_close(a(x), b(x), atol=tol, rtol=tol)


def test_whitening_node_refuses_non_finite_input_and_keeps_its_statistics():
    from bnlab.errors import NonFiniteError
    for layer in (bnlab.DecorrelatedBatchNorm(32, group_size=16), bnlab.IterNorm(32, group_size=16)):
        x = torch.randn(20, 32)
        x[3, 5] = float("inf")
        before = {n: b.clone() for n, b in layer.named_buffers()}
        with pytest.raises(NonFiniteError, match="NaN/Inf"):
            layer(x.requires_grad_())
        for n, b in layer.named_buffers():
            assert torch.equal(b, before[n]), n


@pytest.mark.parametrize("scale", [1e-160, 1e-30, 1e30, 1e160, 1e300])
def test_zca_kernel_at_any_scale_of_sigma(scale):
    """Σ^(−½) scales as scale^(−½): the Jacobi sweeps work on each matrix scaled by a power of two,
    so their sums of squares neither overflow nor underflow (unscaled, Σ ~ 1e160 stopped before
    any rotation and returned the diagonal alone)."""
    from bnlab.variants.whitening import inv_sqrtm
    k = kernels.load()
    gen = torch.Generator().manual_seed(1)
    A = torch.randn(9, 16, 40, generator=gen, dtype=torch.float64)
    sigma = A @ A.transpose(1, 2) / 40 + 0.1 * torch.eye(16, dtype=torch.float64)
    W1, _, s1 = k.zca_inv_sqrt(sigma)
    W, _, s = k.zca_inv_sqrt(sigma * scale)
    torch.testing.assert_close(W * scale ** 0.5, W1, atol=1e-12 * W1.abs().max().item(), rtol=0)
    torch.testing.assert_close(s / scale ** 0.5, s1, atol=0, rtol=1e-13)
    torch.testing.assert_close(W1, inv_sqrtm(sigma), atol=1e-12, rtol=0)


def test_group_cross_gram_centres_each_side_on_its_own_mean_in_every_layout():
    """group_cross(a, μ_a, None, μ_b): Σ (a − μ_a)(a − μ_b)ᵀ per group, the same on the rows layout
    (its centred-chunk Gram) and on (N, C, L)."""
    k = kernels.load()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(70, 32, generator=g, dtype=torch.float64) * 3 + 5
    mu_a, mu_b = x.mean(0), x.mean(0) + torch.linspace(-1, 1, 32, dtype=torch.float64)
    P_rows, _ = k.group_cross(x, mu_a, None, mu_b, 16)
    P_ncl, _ = k.group_cross(x.unsqueeze(-1).repeat(1, 1, 2).contiguous(), mu_a, None, mu_b, 16)
    X = x.T.reshape(2, 16, 70)
    want = (X - mu_a.view(2, 16, 1)) @ (X - mu_b.view(2, 16, 1)).transpose(1, 2)
    torch.testing.assert_close(P_rows, want, atol=1e-9, rtol=1e-12)
    torch.testing.assert_close(P_ncl, 2 * want, atol=1e-9, rtol=1e-12)


def test_newton_kernel_backward_refuses_iterates_without_their_powers():
    k = kernels.load()
    S = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()
    W, P = k.newton_inv_sqrt(S, 3)
    assert P.shape == (3, 4, 2, 3, 3)
    with pytest.raises(RuntimeError, match="do not match"):
        k.newton_inv_sqrt_backward(torch.ones_like(S), S, P[0].contiguous())      # the iterates alone
