"""The compiled CPU fast path equals the readable definition, is really taken when it should be,
and BatchNormAct2d's memory-efficient backward equals BN + activation."""

import itertools
import platform

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import bnlab
from conftest import TOLERANCES
from bnlab import definition as D
from bnlab import functional as BF
from bnlab import kernels
from bnlab.kernels import dispatch, torch_ops

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="the CPU kernels are built for Linux")


def test_kernels_are_available_here():
    """A missing compiler must not silently turn the fast path off on the machines we support."""
    assert kernels.available(), f"CPU kernels failed to build: {kernels.failure()}"


SHAPES = [((7, 5), None), ((13, 3, 17), None), ((5, 6, 7, 9), None), ((5, 6, 7, 9), torch.channels_last),
          ((3, 4, 5, 6, 7), None), ((3, 4, 5, 6, 7), torch.channels_last_3d), ((33, 129), None),
          ((2, 70, 3, 3), torch.channels_last),
          # several row chunks per thread: the rows layout's shifted one-pass chunks run
          ((3001, 37), None), ((9, 16, 11, 13), torch.channels_last),
          ((1500, 1), None), ((41, 600), None),                      # one channel; C above the wide-row width
          # C a multiple of the vector width, rows of ≤ 1 KiB of accumulators: register tiles (float
          # 16 lanes, double 8, tiles of 8 vectors); 144 (float) and 72 (double) are a full tile and a
          # partial one, walked in prefetched blocks of rows; 272 is past the tiles' width
          ((600, 144), None), ((500, 72), None), ((7, 48, 9, 11), torch.channels_last), ((300, 8), None),
          ((200, 272), None)]
TOL = {dtype: tol["out"][0] for dtype, tol in TOLERANCES.items()}


def _both(fn):
    """fn() with the fast path and with the readable path; asserts the fast path ran."""
    before = sum(kernels.calls.values())
    fast = fn()
    assert sum(kernels.calls.values()) > before, "the fast path was not taken"
    with kernels.disabled():
        ref = fn()
    return fast, ref


@pytest.mark.parametrize("shape,fmt", [((6, 4), None), ((5, 3, 7), None), ((17, 5, 3, 3), None),
                                       ((17, 5, 3, 3), torch.channels_last)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_torch_ops_backend_equals_the_definition(shape, fmt, dtype):
    """The memory-planned torch-ops backend (no compiler, other devices, float16 on the CPU)."""
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    w, b = torch.rand(C, generator=g) + 0.5, torch.randn(C, generator=g)
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y, mean, var, invstd = torch_ops.forward_train(x, w, b, 1e-5, 0, 0.0, rm, rv, 0.1, True)
    y_ref = D.batch_norm(x, rm_ref, rv_ref, w, b, True, 0.1, 1e-5)
    tol = TOLERANCES[dtype]["out"]
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, atol=tol[0], rtol=tol[1])
    torch.testing.assert_close((rm, rv), (rm_ref, rv_ref), atol=1e-6, rtol=1e-6)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    planned = torch_ops.backward_train(dy, x, mean, invstd, w)
    definition = D.batch_norm_backward(dy, x, mean, invstd, w, True)
    tol = TOLERANCES[dtype]["grad"]
    for got, ref in zip(planned, definition):
        torch.testing.assert_close(got.double(), ref.double(), atol=tol[0], rtol=tol[1])
    y_eval = torch_ops.forward_eval(x, rm, rv, w, b, 1e-5)
    torch.testing.assert_close(y_eval, D.batch_norm(x, rm, rv, w, b, False, 0.0, 1e-5),
                               atol=TOLERANCES[dtype]["out"][0], rtol=TOLERANCES[dtype]["out"][1])


@pytest.fixture(params=["cached", "streamed"])
def store_mode(request):
    """Run float32 outputs through the normal stores and through the non-temporal (streaming)
    stores that large outputs use (threshold forced to 0 bytes)."""
    module = kernels.load()
    old = module.control.set_stream_threshold(0 if request.param == "streamed" else -1)
    yield request.param
    module.control.set_stream_threshold(old)


@pytest.mark.parametrize("shape,fmt", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_fast_path_equals_the_definition(shape, fmt, dtype, store_mode):
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    C = shape[1]
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(torch.float32 if dtype == torch.bfloat16 else dtype)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(w.dtype)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if fmt is not None:
        dy = dy.contiguous(memory_format=fmt)
    tol = TOL[dtype]

    def train():
        rm, rv = torch.zeros(C, dtype=w.dtype), torch.ones(C, dtype=w.dtype)
        xx = x.clone().requires_grad_()
        y = BF.batch_norm(xx, rm, rv, w.clone().requires_grad_(), b.clone().requires_grad_(), True, 0.3, 1e-3)
        y.backward(dy)
        return y.detach(), xx.grad, rm, rv

    (y, dx, rm, rv), (y_r, dx_r, rm_r, rv_r) = _both(train)
    for a, r in ((y, y_r), (dx, dx_r), (rm, rm_r), (rv, rv_r)):
        torch.testing.assert_close(a.double(), r.double(), atol=tol, rtol=tol)
    if fmt is not None:
        assert y.is_contiguous(memory_format=fmt) and dx.is_contiguous(memory_format=fmt)

    def evaluate():
        with torch.no_grad():
            return BF.batch_norm(x, torch.randn(C, generator=torch.Generator().manual_seed(1)).to(w.dtype),
                                 torch.rand(C, generator=torch.Generator().manual_seed(2)).to(w.dtype) + 0.5,
                                 w, b, False, 0.1, 1e-5)
    e, e_r = _both(evaluate)
    torch.testing.assert_close(e.double(), e_r.double(), atol=tol, rtol=tol)


def _hard_columns(M: int) -> dict[str, torch.Tensor]:
    """(M, 4) float64 columns that break naive or badly shifted one-pass variance algorithms."""
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(M, 4, generator=g, dtype=torch.float64)
    outlier = noise.clone()
    outlier[:40] += 1e5                                                       # the first chunk far away
    late = noise.clone()
    late[-40:] -= 1e4                                                         # the last chunk far away
    return {"sorted": noise.sort(0).values, "sorted descending": noise.sort(0, descending=True).values,
            "mean 1e4, sd 1e-2": 1e4 + 1e-2 * noise, "first rows outliers": outlier, "last rows outliers": late,
            "two levels": torch.where(torch.arange(M)[:, None] < M // 2, noise, noise + 1e3),
            "ramp": torch.arange(M, dtype=torch.float64)[:, None].repeat(1, 4)}


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("M,C", [(60007, 4), (20011, 16), (6007, 144)])
def test_rows_statistics_stay_accurate_on_hard_data(threads, M, C):
    """The rows layout reduces chunks after the first in one pass, shifted by the running mean;
    the variance must stay within a few float32 roundings of the float64 truth on data where
    the shift is far from the chunk (sorted, outliers first or last, large offset). C = 4: wide
    rows (8 chunks of 8192 rows); C = 16, 144: register tiles (chunks of 64 rows)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, x64 in _hard_columns(M).items():
            x = x64.repeat(1, C // 4).float()
            ref_mean = x.double().mean(0)
            ref_var = x.double().var(0, unbiased=False)
            _, mean, var, _ = kernels.load().forward_train(x, None, None, 0.0)
            torch.testing.assert_close(var.double(), ref_var, rtol=1e-5, atol=0, msg=name)
            torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6 * ref_var.sqrt().max().item(),
                                       msg=name)
    finally:
        torch.set_num_threads(previous)


def test_non_contiguous_input_falls_back_and_is_still_correct():
    x = torch.randn(8, 5, 6, 7, dtype=torch.float64).transpose(2, 3)           # neither layout
    before = sum(kernels.calls.values())
    y = BF.batch_norm(x, None, None, training=True)
    assert sum(kernels.calls.values()) == before
    torch.testing.assert_close(y, D.batch_norm(x, None, None, None, None, True, 0.0, 1e-5))


def test_modules_take_the_fast_path():
    bn = bnlab.BatchNorm2d(4)
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    before = dict(kernels.calls)
    bn(x).sum().backward()
    bn.eval()(x)
    for key in ("forward_train", "backward_train", "forward_eval"):
        assert kernels.calls[key] > before.get(key, 0), key


def test_large_outputs_reuse_pooled_memory():
    x = torch.randn(1 << 19, 4)                                                 # 8 MiB: pooled
    with torch.no_grad():
        first = BF.batch_norm(x, None, None, training=True)
        ptr = first.data_ptr()
        del first
        again = BF.batch_norm(x, None, None, training=True)
    assert again.data_ptr() == ptr                                              # same region, no new faults
    assert kernels.cache_info()["cap"] > 0
    del again
    assert kernels.empty_cache() > 0 and kernels.cache_info()["bytes"] == 0


def test_double_backward_uses_the_differentiable_definition():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x, w: BF.batch_norm(x, None, None, w, None, True), (x, w))


# -- BatchNormAct2d -------------------------------------------------------------------------------

@pytest.mark.parametrize("act,fmt", list(itertools.product(["identity", "leaky_relu", "relu"],
                                                      [torch.contiguous_format, torch.channels_last])))
@pytest.mark.parametrize("shape", [(5, 3, 6, 7), (40, 3, 20, 30)])   # 1 chunk; several, with rows left over
def test_bn_act_equals_bn_then_activation(act, fmt, shape, store_mode):
    torch.manual_seed(0)
    fused = bnlab.BatchNormAct2d(3, activation=act, negative_slope=0.1).double()
    with torch.no_grad():
        fused.weight.uniform_(-1.5, 1.5)                       # negative γ too: |γ| + ε for invertibility
        fused.bias.uniform_(-1, 1)
    ref = nn.BatchNorm2d(3).double()
    ref.load_state_dict(fused.state_dict())
    if act != "relu":
        with torch.no_grad():
            ref.weight.copy_(fused.weight.abs() + bnlab.fused.GAMMA_EPS)
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    act_fn = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.1)}[act]
    y, y_ref = fused(x), act_fn(ref(x2))
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(fused.bias.grad, ref.bias.grad, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(fused.running_var, ref.running_var, atol=1e-12, rtol=1e-12)
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x), act_fn(ref(x2)), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("act,fmt", list(itertools.product(["identity", "leaky_relu", "relu"],
                                                      [torch.contiguous_format, torch.channels_last])))
def test_bn_act_float32_outputs_in_both_store_modes(act, fmt, store_mode):
    """float32 is where outputs may be streamed (vector stores of the activation, with scalar head
    and tail around them): the fused layer's output and input gradient against float64 BN +
    activation, for a shape whose rows and planes are not multiples of the vector width."""
    torch.manual_seed(1)
    fused = bnlab.BatchNormAct2d(5, activation=act, negative_slope=0.1)
    with torch.no_grad():
        fused.weight.uniform_(-1.5, 1.5)
        fused.bias.uniform_(-1, 1)
    ref = nn.BatchNorm2d(5).double()
    ref.load_state_dict(fused.state_dict())
    if act != "relu":
        with torch.no_grad():
            ref.weight.copy_(fused.weight.double().abs() + bnlab.fused.GAMMA_EPS)
    x = torch.randn(9, 5, 13, 11).contiguous(memory_format=fmt).requires_grad_()
    x2 = x.detach().double().requires_grad_()
    act_fn = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.1)}[act]
    y, y_ref = fused(x), act_fn(ref(x2))
    assert y.dtype == torch.float32 and y.is_contiguous(memory_format=fmt)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    torch.testing.assert_close(y.double(), y_ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(x.grad.double(), x2.grad, atol=5e-5, rtol=5e-5)
    fused.eval(), ref.eval()
    torch.testing.assert_close(fused(x).double(), act_fn(ref(x2)), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("act", ["identity", "leaky_relu", "relu"])
def test_bn_act_gradcheck(act):
    layer = bnlab.BatchNormAct2d(3, activation=act, negative_slope=0.2).double()
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: layer(x), (x,))


LEAKY_SLOPES = [-2.0, -0.5, 0.0, 0.01, 0.2, 1.0, 3.0]


@pytest.mark.parametrize("slope", LEAKY_SLOPES)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_bn_act_every_leaky_slope_equals_bn_then_leaky_relu(slope, fmt):
    """Every finite slope torch's leaky ReLU accepts. slope > 0 is inverted from the kept output
    (γ used as |γ| + ε); slope ≤ 0 cannot be (0 is ReLU, a negative slope maps both signs of z to
    a ≥ 0), so the input is kept and γ used as is. Slope 0 once gave NaN in every gradient and a
    negative slope dx off by up to 2.4."""
    torch.manual_seed(3)
    layer = bnlab.BatchNormAct2d(3, activation="leaky_relu", negative_slope=slope).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.3, -0.7, 0.4]))
        layer.bias.copy_(torch.tensor([0.2, -0.3, 0.1]))
    ref = nn.BatchNorm2d(3).double()
    ref.load_state_dict(layer.state_dict())
    if slope > 0:
        with torch.no_grad():
            ref.weight.copy_(layer.weight.abs() + bnlab.fused.GAMMA_EPS)
    x = torch.randn(6, 3, 5, 4, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y_ref = F.leaky_relu(ref(x2), slope)
    assert any(t is y for t in saved) == (slope > 0)            # output kept only when invertible
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    for g in (x.grad, layer.weight.grad, layer.bias.grad):
        assert torch.isfinite(g).all()
    torch.testing.assert_close(x.grad, x2.grad, atol=1e-11, rtol=1e-11)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad, atol=1e-11, rtol=1e-11)
    if slope <= 0:
        torch.testing.assert_close(layer.weight.grad, ref.weight.grad, atol=1e-11, rtol=1e-11)
    layer.eval(), ref.eval()
    torch.testing.assert_close(layer(x), F.leaky_relu(ref(x2), slope), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("slope", LEAKY_SLOPES)
def test_bn_act_gradcheck_over_slopes(slope):
    layer = bnlab.BatchNormAct2d(3, activation="leaky_relu", negative_slope=slope).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([1.1, 0.6, 1.4]))
        layer.bias.copy_(torch.tensor([0.3, -0.2, 0.05]))
    x = torch.randn(4, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    # x, γ and β all checked: γ and β are the layer's parameters, which gradcheck perturbs in place
    assert torch.autograd.gradcheck(lambda x, w, b: layer(x), (x, layer.weight, layer.bias))


@pytest.mark.parametrize("slope", [float("nan"), float("inf"), "0.1"])
def test_bn_act_refuses_a_slope_that_is_not_a_finite_number(slope):
    with pytest.raises(ValueError, match="negative_slope"):
        bnlab.BatchNormAct2d(3, activation="leaky_relu", negative_slope=slope)


@pytest.mark.parametrize("act,kept", [("leaky_relu", "output"), ("identity", "output"), ("relu", "input")])
def test_bn_act_keeps_one_full_size_tensor(act, kept):
    layer = bnlab.BatchNormAct2d(4, activation=act)
    x = torch.randn(8, 4, 16, 16, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() == x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert len(big) == 1
    assert (big[0] is y) if kept == "output" else torch.equal(big[0], x)


def test_bn_act_memory_efficient_false_is_plain_bn_then_activation():
    layer = bnlab.BatchNormAct2d(3, activation="leaky_relu", memory_efficient=False)
    with torch.no_grad():
        layer.weight.fill_(-2.0)                                # γ used as is
    ref = nn.BatchNorm2d(3)
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(4, 3, 5, 5)
    torch.testing.assert_close(layer(x), F.leaky_relu(ref(x), 0.01))
    with pytest.raises(ValueError):
        bnlab.BatchNormAct2d(3, activation="gelu")


# -- the C++ autograd node ---------------------------------------------------------------------------

@pytest.mark.parametrize("affine", ["both", "bias only", "none"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_cpu_training_records_the_cpp_node_and_matches_the_python_function(affine, fmt):
    """A CPU training call with autograd records the extension's node (no Python backward); its
    output, running statistics and every gradient equal the Python autograd.Function's (same
    kernels), and x's gradient obeys x's layout."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, 4, 3, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.rand(5, dtype=torch.float64, requires_grad=True) if affine == "both" else None
    b = torch.randn(5, dtype=torch.float64, requires_grad=True) if affine != "none" else None
    rm, rv = torch.zeros(5, dtype=torch.float64), torch.ones(5, dtype=torch.float64)
    before = kernels.calls["backward_train"]
    y = BF.batch_norm(x, rm, rv, w, b, True, 0.2, 1e-5)
    assert not isinstance(y.grad_fn, torch.autograd.function.BackwardCFunction)    # not a Python Function
    leaves = [t for t in (x, w, b) if t is not None]
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, leaves, dy)
    assert kernels.calls["backward_train"] == before + 1

    x2 = x.detach().clone().requires_grad_()
    w2, b2 = (t.detach().clone().requires_grad_() if t is not None else None for t in (w, b))
    rm2, rv2 = torch.zeros_like(rm), torch.ones_like(rv)
    # the same kernels through the Python autograd Function the other backends use
    y2 = dispatch._TrainFn.apply(x2, w2, b2, 1e-5, (rm2, rv2, 0.2, "unbiased"), dispatch.cpu_module())
    grads2 = torch.autograd.grad(y2, [t for t in (x2, w2, b2) if t is not None], dy)
    torch.testing.assert_close(y, y2, atol=0, rtol=0)
    torch.testing.assert_close((rm, rv), (rm2, rv2), atol=0, rtol=0)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, atol=0, rtol=0)
    assert grads[0].is_contiguous(memory_format=fmt)


def test_call_counts_include_the_node_and_clear():
    """kernels.calls reads like a Counter of dispatches, the C++ node's backward passes included,
    and clear() starts every count (those too) from zero."""
    bn = bnlab.BatchNorm2d(4)
    x = torch.randn(6, 4, 5, 5, requires_grad=True)
    kernels.calls.clear()
    assert dict(kernels.calls) == {} and kernels.calls["backward_train"] == 0
    bn(x).sum().backward()
    bn(x).sum().backward()
    assert kernels.calls["forward_train"] == 2 and kernels.calls["backward_train"] == 2
    # sum()'s gradient is an expanded scalar: the node's dense copy of it takes dx
    assert kernels.calls["backward_train_inplace"] == 2
    assert sum(kernels.calls.values()) == 6
    kernels.calls.clear()
    assert kernels.calls["backward_train"] == 0 and kernels.calls["backward_train_inplace"] == 0
    assert dict(kernels.calls) == {}


# -- dx written over a dead incoming gradient --------------------------------------------------------

INPLACE_SHAPES = [((9, 5, 4, 3), torch.contiguous_format), ((9, 5, 4, 3), torch.channels_last),
                  ((3001, 37), torch.contiguous_format), ((9, 16, 11, 13), torch.channels_last)]


def _graph_grads(impl, graph, shape, fmt, n_inputs=1, dtype=torch.float64):
    """Gradients of every input, weight and bias of graph(bns, xs) with BN layers impl, plus
    whatever graph stored along the way (its ``kept`` list)."""
    torch.manual_seed(0)
    C = shape[1]
    xs = [torch.randn(*shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_() for _ in range(n_inputs)]
    ws = [torch.rand(C, dtype=dtype, requires_grad=True) + 0.5 for _ in range(n_inputs)]
    bs = [torch.randn(C, dtype=dtype, requires_grad=True) for _ in range(n_inputs)]
    ws = [w.detach().requires_grad_() for w in ws]
    bns = [lambda x, i=i: impl(x, None, None, ws[i], bs[i], True, 0.1, 1e-5) for i in range(n_inputs)]
    kept: list = []
    loss = graph(bns, xs, kept)
    loss.backward()
    return [t.grad for t in xs + ws + bs], [k.detach().clone() for k in kept]


GRAPHS = {
    # dy comes from ReLU's backward: a fresh tensor only the engine holds — written over
    "relu": (lambda bns, xs, kept: (torch.relu(bns[0](xs[0])) * torch.linspace(-1, 2, xs[0].shape[-1],
                                                                              dtype=xs[0].dtype)).sum(), True),
    # y used twice: the engine sums the two gradients into a buffer it owns (in NCHW order even for
    # a channels_last y: then the node's own channels_last copy of it) — written over
    "used twice": (lambda bns, xs, kept: ((lambda y: (torch.relu(y) ** 2 + 3 * torch.tanh(y)).sum())(bns[0](xs[0]))),
                   True),
    # y.retain_grad(): autograd stores a copy of dy in y.grad, so dy itself is still dead
    "retain_grad": (lambda bns, xs, kept: (lambda y: (y.retain_grad(), (torch.relu(y) ** 2).sum())[1])(bns[0](xs[0])),
                    True),
    # a hook keeps dy: it must stay dy
    "hook keeps dy": (lambda bns, xs, kept: (lambda y: (y.register_hook(lambda g: kept.append(g)),
                                                        (torch.relu(y) ** 2).sum())[1])(bns[0](xs[0])), False),
    # a post-hook on BN's own node sees dy after the node ran: the engine keeps a copy of the
    # gradients for it, so dy is not dead
    "node post-hook": (lambda bns, xs, kept: (lambda y: (y.grad_fn.register_hook(lambda gi, go: kept.append(go[0])),
                                                         (torch.relu(y) ** 2).sum())[1])(bns[0](xs[0])), False),
    # z = BN1(x1) + BN2(x2): AddBackward hands the same tensor to both nodes; the first to run must
    # leave it for the second
    "sum of two BN": (lambda bns, xs, kept: (torch.relu(bns[0](xs[0]) + bns[1](xs[1])) ** 2).sum(), None),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("shape,fmt", INPLACE_SHAPES, ids=str)
def test_node_writes_dx_over_a_dead_gradient_and_only_then(graph, shape, fmt):
    """When nothing but the engine holds dy, the node writes dx over it (counted in
    kernels.calls["backward_train_inplace"]); when anything else can see dy (a retained .grad, a
    hook, another node waiting for the same tensor) it does not. Every gradient, and every dy a
    graph kept, equals torch.nn's (float64, 1e-10)."""
    fn, expect_inplace = GRAPHS[graph]
    n_inputs = 2 if graph == "sum of two BN" else 1
    before = kernels.calls["backward_train_inplace"]
    grads, kept = _graph_grads(BF.batch_norm, lambda b, x, k: fn(b, x, k), shape, fmt, n_inputs)
    inplace = kernels.calls["backward_train_inplace"] - before
    ref_grads, ref_kept = _graph_grads(F.batch_norm, lambda b, x, k: fn(b, x, k), shape, fmt, n_inputs)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-10, rtol=1e-10)
    for k, r in zip(kept, ref_kept):
        torch.testing.assert_close(k, r, atol=1e-10, rtol=1e-10)
    if expect_inplace is True:
        assert inplace == n_inputs
    elif expect_inplace is False:
        assert inplace == 0
    else:                                      # the first node may not write, the second may
        assert inplace <= 1
    assert grads[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("shape,fmt", INPLACE_SHAPES[:2], ids=str)
@pytest.mark.parametrize("keep", ["retain_grad", "hook", "both"])
def test_retained_and_hooked_gradients_stay_dy(shape, fmt, keep):
    """y.grad (retain_grad) and a gradient a hook stored are dy after the backward, equal to what
    torch.nn's graph gives, not dx written over them."""
    results = {}
    for impl in (BF.batch_norm, F.batch_norm):
        torch.manual_seed(0)
        x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        y = impl(x, None, None, None, None, True, 0.1, 1e-5)
        hooked = []
        if keep in ("retain_grad", "both"):
            y.retain_grad()
        if keep in ("hook", "both"):
            y.register_hook(lambda g: hooked.append(g))
        (torch.relu(y) ** 2).sum().backward()
        results[impl] = [x.grad] + ([y.grad] if y.grad is not None else []) + hooked
    assert len(results[BF.batch_norm]) == len(results[F.batch_norm]) > 1
    for got, want in zip(results[BF.batch_norm], results[F.batch_norm]):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_user_gradient_is_never_written():
    """y.backward(dy) with the caller holding dy: dy is read, never written."""
    x = torch.randn(64, 8, 5, 5, requires_grad=True)
    dy = torch.randn(64, 8, 5, 5)
    dy0 = dy.clone()
    before = kernels.calls["backward_train_inplace"]
    BF.batch_norm(x, None, None, None, None, True, 0.1, 1e-5).backward(dy)
    assert torch.equal(dy, dy0) and kernels.calls["backward_train_inplace"] == before
    assert kernels.calls["backward_train"] > 0


@pytest.mark.parametrize("shape", [(64, 16, 32, 32), (4, 16, 3, 3)])   # a pooled output; a small one
def test_eval_without_grad_runs_no_tensor_op_besides_the_kernel(shape):
    """Inference goes straight to the kernel with the running statistics: no small tensor
    operations (rsqrt, reciprocal, dtype conversions) before it — each costs ~10 µs when the
    previous large kernel has flushed the caches, which made cache-sized evals 1.1-1.4× torch's.
    The output equals torch.nn's."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    x = torch.randn(*shape)
    C = shape[1]
    rm, rv, w, b = torch.randn(C), torch.rand(C) + 0.5, torch.rand(C), torch.randn(C)
    before = kernels.calls["forward_eval"]
    with torch.no_grad(), Ops() as ops:
        y = BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5)
    assert kernels.calls["forward_eval"] == before + 1
    assert {n.split(".")[0] for n in ops.names} <= {"empty_like", "detach"}, ops.names
    torch.testing.assert_close(y, F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), atol=2e-6, rtol=2e-6)


def test_dx_over_dy_can_be_switched_off_and_back():
    """kernels.dx_over_dy(False) (the chain benchmark's ablation) stops the node writing over dy,
    gives the same gradients, and restores the setting on exit."""
    def relu_chain_grad():
        torch.manual_seed(0)
        x = torch.randn(9, 5, 4, 3, dtype=torch.float64, requires_grad=True)
        (torch.relu(BF.batch_norm(x, None, None, None, None, True, 0.1, 1e-5)) ** 2).sum().backward()
        return x.grad

    before = kernels.calls["backward_train_inplace"]
    with kernels.dx_over_dy(False):
        off = relu_chain_grad()
    assert kernels.calls["backward_train_inplace"] == before
    on = relu_chain_grad()
    assert kernels.calls["backward_train_inplace"] == before + 1
    torch.testing.assert_close(off, on, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,fmt", [((9, 5, 4, 3), torch.contiguous_format), ((300, 37), torch.contiguous_format),
                                       ((9, 16, 11, 13), torch.channels_last)], ids=str)
def test_dx_over_dy_in_float32_and_bfloat16(shape, fmt, dtype):
    """The in-place dx pass in the lower precisions gives exactly what the out-of-place pass gives
    (switched off with kernels.dx_over_dy(False)), and really ran. (Against torch.nn a bfloat16
    ReLU graph is ill-conditioned: an output rounded across 0 flips a mask, in either library.)"""
    fn, _ = GRAPHS["relu"]
    before = kernels.calls["backward_train_inplace"]
    grads, _ = _graph_grads(BF.batch_norm, fn, shape, fmt, dtype=dtype)
    assert kernels.calls["backward_train_inplace"] == before + 1
    with kernels.dx_over_dy(False):
        plain, _ = _graph_grads(BF.batch_norm, fn, shape, fmt, dtype=dtype)
    assert kernels.calls["backward_train_inplace"] == before + 1
    for g, p in zip(grads, plain):
        assert g.dtype == p.dtype == dtype and torch.equal(g, p)
    if dtype == torch.float32:
        ref, _ = _graph_grads(F.batch_norm, fn, shape, fmt, dtype=dtype)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


# -- functional.batch_norm's training path in one C++ call ---------------------------------------------

def _fast_calls() -> int:
    return kernels.load().control.fast_forward_calls()


def _warm_node() -> None:
    """The C++ module is loaded and wired up (its one-call entries armed)."""
    assert dispatch.cpu_module() is not None and dispatch._Cpu.train_fast is not None


@pytest.mark.parametrize("shape,fmt", [((9, 5, 4, 3), torch.contiguous_format), ((9, 5, 4, 3), torch.channels_last),
                                       ((300, 37), torch.contiguous_format),
                                       ((3, 4, 5, 6, 7), torch.channels_last_3d)], ids=str)
@pytest.mark.parametrize("affine", ["both", "bias only", "none"])
@pytest.mark.parametrize("correction", ["unbiased", "biased"])
def test_one_call_path_equals_the_python_path(shape, fmt, affine, correction, monkeypatch):
    """batch_norm_train_fast is taken for a training call with autograd, and its output, running
    statistics and gradients are bit-identical to the Python path's (the same node)."""
    _warm_node()

    def run(seed_tensors):
        x, w, b, rm, rv = (t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None
                           for t in seed_tensors)
        y = BF.batch_norm(x, rm, rv, w, b, True, 0.3, 1e-4, running_var_correction=correction)
        grads = torch.autograd.grad(y, [t for t in (x, w, b) if t is not None], dy)
        return y, rm, rv, grads

    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
    w = torch.rand(C, dtype=torch.float64, requires_grad=True) if affine == "both" else None
    b = torch.randn(C, dtype=torch.float64, requires_grad=True) if affine != "none" else None
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    dy = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt)
    before = _fast_calls()
    fast = run((x, w, b, rm, rv))
    assert _fast_calls() == before + 1
    monkeypatch.setattr(dispatch._Cpu, "train_fast", None)
    slow = run((x, w, b, rm, rv))
    assert _fast_calls() == before + 1
    torch.testing.assert_close(fast[0], slow[0], atol=0, rtol=0)
    torch.testing.assert_close(fast[1:3], slow[1:3], atol=0, rtol=0)
    for g, g2 in zip(fast[3], slow[3]):
        torch.testing.assert_close(g, g2, atol=0, rtol=0)


def _declined(call, count=_fast_calls) -> None:
    """call() runs without the one-call entry whose calls ``count`` reads (training's by default)."""
    before = count()
    call()
    assert count() == before, "the one-call path ran where the Python path must"


def test_compiled_for_takes_what_select_takes():
    """The variants' entry check (compiled_for, its checks in one C++ call) answers as select does:
    the compiled module exactly where select picks it — dtypes, layouts, empty and 1-D inputs,
    parameters, kernels off, tracing and functorch transforms."""
    k = dispatch.cpu_module()
    x = torch.randn(6, 4, 5, 3)
    cases = [x, x.double(), x.bfloat16(), x.half(), x.int(), x.contiguous(memory_format=torch.channels_last),
             x.transpose(2, 3), x[:, :, ::2], torch.randn(0, 4), torch.randn(4), torch.randn(8, 3),
             torch.randn(2, 3, 4, 5, 6).contiguous(memory_format=torch.channels_last_3d), nn.Parameter(torch.randn(5, 4))]
    for t in cases:
        want = dispatch.select(t) is k
        assert (dispatch.compiled_for(t, "group_train") is k) == want, (t.dtype, t.shape, t.stride())
    assert dispatch.compiled_for(x, "no_such_entry") is None
    with kernels.disabled():
        assert dispatch.compiled_for(x, "group_train") is None
    seen = []
    torch.jit.trace(lambda t: seen.append(dispatch.compiled_for(t, "group_train")) or t * 1, (x,), check_trace=False)
    torch.func.vmap(lambda t: seen.append(dispatch.compiled_for(t, "group_train")) or t)(torch.randn(2, 6, 4))
    assert seen and all(s is None for s in seen)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_one_call_path_declines_and_the_python_path_decides():
    """Every case the Python path treats otherwise is declined by the one C++ call, so behaviour
    and errors stay the Python path's."""
    _warm_node()
    x = torch.randn(6, 4, 5, requires_grad=True)
    w = torch.ones(4, requires_grad=True)
    with torch.no_grad():                                        # nothing to record: the no-grad kernel call
        _declined(lambda: BF.batch_norm(x, None, None, w, None, True))
    _declined(lambda: BF.batch_norm(x.detach(), None, None, None, None, True))   # nothing requires grad
    with pytest.raises(bnlab.BatchSizeError):
        _declined(lambda: BF.batch_norm(torch.randn(1, 4, requires_grad=True), None, None, None, None, True))
    with pytest.raises(bnlab.ShapeError):
        _declined(lambda: BF.batch_norm(x, None, None, torch.ones(5, requires_grad=True), None, True))
    with pytest.raises(RuntimeError, match="1-D"):                              # 2-D running mean, as torch.nn
        _declined(lambda: BF.batch_norm(x, torch.zeros(2, 2), torch.ones(4), None, None, True))
    with pytest.raises(ValueError, match="eps must be positive"):
        _declined(lambda: BF.batch_norm(x, None, None, w, None, True, 0.1, 0.0))
    with pytest.raises(TypeError):
        _declined(lambda: BF.batch_norm(x, None, None, None, None, True, None))
    with pytest.raises(ValueError):
        _declined(lambda: BF.batch_norm(x, None, None, None, None, True, running_var_correction="bessel"))
    _declined(lambda: BF.batch_norm(x.transpose(0, 2), None, None, None, None, True))   # neither layout
    _declined(lambda: BF.batch_norm(x.half(), None, None, None, None, True))            # no kernel dtype
    _declined(lambda: BF.batch_norm(torch.randn(0, 4, requires_grad=True), None, None, None, None, True))
    with kernels.disabled():
        _declined(lambda: BF.batch_norm(x, None, None, w, None, True))
    _declined(lambda: torch.func.vmap(lambda xi: BF.batch_norm(xi, None, None, None, None, True))(
        torch.randn(2, 6, 4, 5)))
    _declined(lambda: torch.func.grad(lambda xi: BF.batch_norm(xi, None, None, None, None, True).pow(2).sum())(
        torch.randn(6, 4, 5)))
    wd = w.detach()
    _declined(lambda: torch.jit.trace(lambda xi: BF.batch_norm(xi, None, None, wd, None, True),
                                      (x.detach().requires_grad_(),), check_trace=False))

    class Sub(torch.Tensor):
        pass
    _declined(lambda: BF.batch_norm(x.detach().as_subclass(Sub).requires_grad_(), None, None, None, None, True))
    # and after all of them it is taken again
    before = _fast_calls()
    BF.batch_norm(x, None, None, w, None, True)
    assert _fast_calls() == before + 1


def _fast_eval_calls() -> int:
    return kernels.load().control.fast_eval_calls()


@pytest.mark.parametrize("shape,fmt", [((9, 5, 4, 3), torch.contiguous_format), ((9, 5, 4, 3), torch.channels_last),
                                       ((1, 37), torch.contiguous_format),            # a batch of one is fine here
                                       ((3, 4, 5, 6, 7), torch.channels_last_3d)], ids=str)
@pytest.mark.parametrize("affine", ["both", "bias only", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_one_call_eval_equals_the_python_path(shape, fmt, affine, dtype, monkeypatch):
    """batch_norm_eval_fast is taken for inference without autograd and is bit-identical to the
    Python path's kernel call."""
    BF.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3))        # arms the one-call paths
    torch.manual_seed(0)
    C = shape[1]
    x = torch.randn(*shape, dtype=dtype).contiguous(memory_format=fmt)
    w = torch.rand(C) if affine == "both" else None
    b = torch.randn(C) if affine != "none" else None
    rm, rv = torch.randn(C), torch.rand(C) + 0.5
    before = _fast_eval_calls()
    fast = BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3)
    assert _fast_eval_calls() == before + 1
    monkeypatch.setattr(dispatch._Cpu, "eval_fast", None)
    slow = BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3)
    assert _fast_eval_calls() == before + 1
    torch.testing.assert_close(fast, slow, atol=0, rtol=0)
    assert fast.is_contiguous(memory_format=fmt) and fast.dtype == dtype


def _eval_declined(call) -> None:
    _declined(call, _fast_eval_calls)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_one_call_eval_declines_and_the_python_path_decides():
    BF.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3))
    x = torch.randn(6, 4, 5)
    rm, rv = torch.zeros(4), torch.ones(4)
    w = torch.ones(4, requires_grad=True)
    y = None

    def with_graph():
        nonlocal y
        y = BF.batch_norm(x, rm, rv, w, None, False)
    _eval_declined(with_graph)                                   # a graph to record: the autograd Function
    assert y.requires_grad
    with pytest.raises(bnlab.ModeError):
        _eval_declined(lambda: BF.batch_norm(x, None, rv, None, None, False))
    with pytest.raises(bnlab.ShapeError):
        _eval_declined(lambda: BF.batch_norm(x, torch.zeros(5), torch.ones(5), None, None, False))
    with pytest.raises(bnlab.DTypeError):
        _eval_declined(lambda: BF.batch_norm(x.long(), rm, rv, None, None, False))
    _eval_declined(lambda: BF.batch_norm(x.transpose(0, 2), rm, rv, None, None, False))      # neither layout
    _eval_declined(lambda: BF.batch_norm(x.half(), rm, rv, None, None, False))
    _eval_declined(lambda: BF.batch_norm(torch.randn(0, 4), rm, rv, None, None, False))
    with kernels.disabled():
        _eval_declined(lambda: BF.batch_norm(x, rm, rv, None, None, False))
    _eval_declined(lambda: torch.func.vmap(lambda xi: BF.batch_norm(xi, rm, rv, None, None, False))(
        torch.randn(2, 6, 4, 5)))
    _eval_declined(lambda: torch.jit.trace(lambda xi: BF.batch_norm(xi, rm, rv, None, None, False), (x,),
                                           check_trace=False))
    with torch.no_grad():                                        # no graph under no_grad: taken
        before = _fast_eval_calls()
        BF.batch_norm(x, rm, rv, w, None, False)
        assert _fast_eval_calls() == before + 1


# -- accuracy that does not degrade with the plane -------------------------------------------------

def _plane_errors(x: torch.Tensor) -> tuple[float, float, float]:
    """Relative errors of the kernel's variance, Σdy and Σdy·x̂ against float64, one channel."""
    k = kernels.load()
    _, mean, var, invstd = k.forward_train(x, None, None, 1e-5)
    xd = x.double()
    exact_mean, exact_var = xd.mean(), xd.var(unbiased=False)
    dy = torch.ones_like(x)
    _, dgamma, dbeta = k.backward_train(dy, x, mean, invstd, None)
    exact_dbeta = dy.double().sum()
    exact_dgamma = ((xd - mean.double()) * invstd.double()).sum()        # Σ x̂ with the kernel's μ, invstd
    return (abs(var.double().item() - exact_var.item()) / exact_var.item(),
            abs(dbeta.double().item() - exact_dbeta.item()) / exact_dbeta.item(),
            abs(dgamma.double().item() - exact_dgamma.item()) / xd.numel())


def test_statistics_of_a_large_plane_keep_float_accuracy():
    """A 4096² NCHW plane: per-plane float sums once gave a relative variance error of 4e-4
    (8192²: 3e-3); blocked sums merged in double keep it at a few float ulps."""
    x = torch.randn(1, 1, 4096, 4096, generator=torch.Generator().manual_seed(0)) * 2 + 3
    var_err, dbeta_err, dgamma_err = _plane_errors(x)
    assert var_err < 1e-6 and dbeta_err < 1e-6 and dgamma_err < 1e-6


@pytest.mark.slow
def test_statistics_of_a_billion_bfloat16_values_keep_float_accuracy():
    """2³⁰ bfloat16 values in one plane (8.5% variance error before the blocked sums)."""
    x = (torch.rand(1, 1, 32768, 32768, generator=torch.Generator().manual_seed(0)) * 4 + 1).bfloat16()
    _, mean, var, _ = kernels.load().forward_train(x, None, None, 1e-5)
    flat = x.flatten()
    chunks = range(0, flat.numel(), 2**26)
    m = sum(flat[i:i + 2**26].double().sum().item() for i in chunks) / flat.numel()
    v = sum(((flat[i:i + 2**26].double() - m) ** 2).sum().item() for i in chunks) / flat.numel()
    assert abs(var.item() - v) / v < 1e-6 and abs(mean.item() - m) < 1e-5


# -- edge cases torch.nn accepts --------------------------------------------------------------------

@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (2, 16, 3, 3), (40, 16, 3, 3)],
                         ids=["wide-rows", "one-tiled-chunk", "tiled-chunks"])
def test_inf_input_gives_torch_running_mean(fmt, shape):
    """A +Inf value makes its channel's mean +Inf (torch.nn's sum/m), not NaN — on every
    reduction path (channels_last 16 channels: the register tiles, one chunk of ≤ 64 rows or several)."""
    x = torch.randn(*shape).contiguous(memory_format=fmt)
    x[0, 0, 0, 0] = float("inf")
    x[1, 1, 1, 1] = float("-inf")
    x[0, 2, 0, 0], x[1, 2, 0, 0] = float("inf"), float("-inf")
    x[1, 3, 2, 2] = float("nan")
    C = shape[1]
    rm, rv = torch.zeros(C), torch.ones(C)
    rm_t, rv_t = torch.zeros(C), torch.ones(C)
    y = BF.batch_norm(x, rm, rv, training=True)
    y_t = F.batch_norm(x, rm_t, rv_t, training=True)
    torch.testing.assert_close(rm, rm_t, equal_nan=True)
    torch.testing.assert_close(rv, rv_t, equal_nan=True)
    torch.testing.assert_close(y, y_t, equal_nan=True)
    assert rm[0] == float("inf") and rm[1] == float("-inf") and rm[2].isnan() and rm[3].isnan()
    assert torch.isfinite(rm[4:]).all()


@pytest.mark.parametrize("training", [True, False])
def test_weight_of_shape_1_by_c_is_accepted_as_torch_does(training):
    x = torch.randn(8, 4, 5, 5)
    w, b = torch.rand(1, 4) + 0.5, torch.randn(1, 4)
    rm, rv = torch.randn(4), torch.rand(4) + 0.5
    y = BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    y_t = F.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    torch.testing.assert_close(y, y_t)
    dy = torch.randn(8, 4, 5, 5)
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    wt, bt = w.clone().requires_grad_(), b.clone().requires_grad_()
    BF.batch_norm(x, None, None, wg, bg, training=True).backward(dy)
    # (torch.nn's own backward fails on a (1, C) weight: its reference is the 1-D view)
    F.batch_norm(x, None, None, wt.view(-1), bt.view(-1), training=True).backward(dy)
    assert wg.grad.shape == (1, 4) and bg.grad.shape == (1, 4)
    torch.testing.assert_close(wg.grad, wt.grad)
    torch.testing.assert_close(bg.grad, bt.grad)


def test_non_contiguous_running_statistics_are_updated_in_place():
    """Buffers loaded with load_state_dict(assign=True) may be views of any stride."""
    x = torch.randn(8, 4, 5, 5)
    base_m, base_v = torch.zeros(4, 2), torch.ones(4, 2)
    rm, rv = base_m[:, 0], base_v[:, 0]
    rm_t, rv_t = torch.zeros(4), torch.ones(4)
    for requires_grad in (False, True):
        BF.batch_norm(x.clone().requires_grad_(requires_grad), rm, rv, training=True)
        F.batch_norm(x, rm_t, rv_t, training=True)
    torch.testing.assert_close(rm, rm_t)
    torch.testing.assert_close(rv, rv_t)
    assert torch.equal(base_m[:, 1], torch.zeros(4))          # the other column untouched


def test_two_d_running_statistics_are_refused_before_anything_changes():
    x = torch.randn(8, 4)
    rm, rv = torch.zeros(4), torch.ones(2, 2)
    with pytest.raises(RuntimeError, match="1-D"):
        BF.batch_norm(x, rm, rv, training=True)
    assert torch.equal(rm, torch.zeros(4))


def test_running_statistics_on_another_device_say_so():
    x = torch.randn(8, 4)
    with pytest.raises(RuntimeError, match="is on meta but the input is on cpu"):
        BF.batch_norm(x, torch.zeros(4, device="meta"), torch.ones(4, device="meta"), training=True)


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_non_positive_eps_in_training_is_refused_as_torch_does(eps):
    x = torch.randn(8, 4, 3, 3)
    with pytest.raises(ValueError, match="eps must be positive"):
        F.batch_norm(x, None, None, training=True, eps=eps)
    for requires_grad in (False, True):
        with pytest.raises(ValueError, match="eps must be positive"):
            BF.batch_norm(x.clone().requires_grad_(requires_grad), None, None, training=True, eps=eps)
    with pytest.raises(ValueError, match="eps must be positive"):
        bnlab.BatchNorm2d(4, eps=eps)(x)
    with pytest.raises(ValueError, match="eps must be positive"):
        bnlab.BatchNormAct2d(4, eps=eps)(x)


@pytest.mark.parametrize("shape,fmt", [((64, 64, 16, 16), torch.contiguous_format),
                                       ((64, 64, 16, 16), torch.channels_last), ((2048, 512), None)])
def test_large_outputs_have_resizable_storage(shape, fmt):
    """Outputs ≥ 1 MiB come from bnlab's pool; their storage can still be freed and regrown in
    place (storage().resize_(0), the FSDP/offload idiom), as torch's outputs can."""
    x = torch.randn(*shape)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    bn = bnlab.BatchNorm2d(shape[1]) if len(shape) == 4 else bnlab.BatchNorm1d(shape[1])
    y = bn(x)
    assert y.untyped_storage().nbytes() >= 2**20
    expected = y.detach().clone()
    y.backward(torch.ones_like(y))
    dx = x.grad
    for t in (y.detach(), dx, bn.eval()(x.detach())):
        storage = t.untyped_storage()
        data = t.clone()
        storage.resize_(0)
        assert storage.nbytes() == 0
        storage.resize_(data.numel() * data.element_size())
        t.copy_(data)
        torch.testing.assert_close(t, data)
    torch.testing.assert_close(expected.shape, y.shape)


# -- the build cache: locks no killed process can leave behind ----------------------------------------

_CHILD = ("import torch, bnlab; from bnlab import kernels; x = torch.randn(6, 3, 4, 4); "
          "y = bnlab.BatchNorm2d(3)(x); "
          "ref = torch.nn.functional.batch_norm(x, None, None, training=True); "
          "assert torch.allclose(y, ref, atol=1e-5); print('available' if kernels.load() else 'off')")


def _cache_copy(tmp_path):
    """This machine's build, copied into a private cache (same key, so no compile)."""
    import shutil
    src = kernels.build_dir()
    dst = tmp_path / "bnlab" / "kernels" / src.name
    shutil.copytree(src, dst)
    return dst


def _child(tmp_path, timeout, **env):
    import os
    import subprocess
    import sys
    full = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, env=full, timeout=timeout)


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next_process(tmp_path):
    """torch's build leaves ``lock`` in the build directory when killed, and waits on it for ever;
    bnlab removes it under its own flock (which the system releases however its holder died)."""
    d = _cache_copy(tmp_path)
    (d / "lock").write_text("")
    r = _child(tmp_path, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "available" and not (d / "lock").exists()


def test_a_process_waiting_for_a_build_says_for_whom_then_falls_back(tmp_path):
    from bnlab._files import FileLock
    d = _cache_copy(tmp_path)
    with FileLock(d.parent / f"{d.name}.lock", "compiling bnlab CPU kernels (a test holds it)"):
        r = _child(tmp_path, timeout=120, BNLAB_KERNEL_BUILD_WAIT="3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "off"                       # still right, on the torch-ops path
    lines = [line for line in r.stderr.splitlines() if line.startswith("bnlab:")]
    assert "waiting for pid" in lines[0] and "a test holds it" in lines[0]
    assert "CPU kernels off" in lines[1] and len(lines) == 2


def test_no_compiler_means_one_quiet_line(tmp_path):
    r = _child(tmp_path, timeout=120, CXX="/nonexistent/c++")
    assert r.returncode == 0 and r.stdout.strip() == "off", r.stderr
    assert [line for line in r.stderr.splitlines() if line.strip()] == [
        line for line in r.stderr.splitlines() if line.startswith("bnlab: CPU kernels off (no C++ compiler")]
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_a_build_killed_midway_leaves_a_cache_the_next_build_completes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    p = subprocess.Popen([sys.executable, "-c", "from bnlab import kernels; kernels.build()"], env=env,
                         stderr=subprocess.PIPE, text=True)
    time.sleep(8)                                          # compiling by now
    p.send_signal(signal.SIGKILL)
    p.wait()
    r = _child(tmp_path, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "available", r.stderr


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "identity"])
def test_bn_act_in_eval_keeps_the_graph_when_gradients_are_wanted(act):
    """The fused eval kernel records no graph; with a requires-grad input or γ it once returned an
    output without grad_fn, so backward() failed or (with other leaves) silently skipped the layer."""
    layer = bnlab.BatchNormAct2d(3, activation=act, negative_slope=0.2).eval()
    ref = nn.BatchNorm2d(3).eval()
    ref.load_state_dict(layer.state_dict())
    if act != "relu":
        with torch.no_grad():
            ref.weight.copy_(layer.weight.abs() + bnlab.fused.GAMMA_EPS)
    act_fn = {"identity": lambda z: z, "relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, 0.2)}[act]
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y = layer(x)
    assert y.grad_fn is not None
    y.backward(torch.ones_like(y))
    act_fn(ref(x2)).backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, x2.grad)


def test_relu_kernels_propagate_nan_as_torch_does(store_mode):
    """A NaN pre-activation stays NaN through the fused ReLU (it became 0, hiding a divergence)."""
    layer = bnlab.BatchNormAct2d(3, activation="relu").eval()
    for shape in [(2, 3, 4, 4), (64, 3, 64, 64)]:                   # scalar head/tail and vector body
        x = torch.randn(*shape)
        x[1, 2, 3, 3] = float("nan")
        with torch.no_grad():
            y = layer(x)
        assert torch.isnan(y[1, 2, 3, 3]) and torch.isnan(y).sum() == 1


def test_a_second_checkout_loads_the_same_build_without_recompiling(tmp_path):
    """Two checkouts (or environments) with the same key share one build: the compiled source is
    the copy inside the build directory, so ninja sees the same command from either."""
    import os
    import shutil
    d = _cache_copy(tmp_path)
    so = d / "bnlab_cpu_kernels.so"
    before = so.stat().st_mtime_ns
    checkout = tmp_path / "checkout"
    shutil.copytree(os.path.dirname(bnlab.__file__), checkout / "bnlab",
                    ignore=shutil.ignore_patterns("__pycache__"))
    r = _child(tmp_path, timeout=300, PYTHONPATH=str(checkout))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "available"
    assert "compiling" not in r.stderr and so.stat().st_mtime_ns == before


_NO_AVX512_CHILD = """
import torch, bnlab
import bnlab.kernels as K
K.FLAGS = K.FLAGS + ["-mno-avx512f"]
assert K.load() is not None, K.failure()
from bnlab import functional as BF
torch.manual_seed(0)
for shape, dtype in [((5, 144, 3, 7), torch.float32), ((5, 72, 3, 7), torch.float64), ((300, 48), torch.float32),
                     ((5, 32, 3, 7), torch.bfloat16)]:
    x = (torch.randn(*shape, dtype=torch.float64) * 2 + 1).to(dtype)
    if x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(*shape, dtype=torch.float64).to(dtype)
    for make in (lambda C: bnlab.BatchNorm2d(C) if x.dim() == 4 else bnlab.BatchNorm1d(C),
                 lambda C: bnlab.LpNorm2d(C, p="inf", groups=2) if x.dim() == 4 else bnlab.LpNorm1d(C, p=1)):
        outs = []
        for off in (False, True):
            m = make(shape[1]).to(dtype)
            xx = x.clone().requires_grad_()
            if off:
                with K.disabled():
                    y = m(xx)
                    y.backward(dy)
            else:
                y = m(xx)
                y.backward(dy)
            outs.append((y.double(), xx.grad.double()))
        tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 6e-2}[dtype]
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, atol=tol * max(1.0, b.abs().max().item()), rtol=tol)
print("ok")
"""


@pytest.mark.slow
def test_the_build_without_avx512_equals_the_definition(tmp_path):
    """Machines without AVX-512 compile other register tiles (two 64-byte vectors a tile for BN's
    reductions, one for ℓp's); this machine builds that variant (-mno-avx512f) into a private cache
    and holds BN and ℓp on their tiled paths to the definition."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", _NO_AVX512_CHILD], capture_output=True, text=True, env=env,
                         timeout=900)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
