"""Noisy BN's counter-based noise: Philox4x32-10 against Random123's known-answer vectors, the
compiled kernel (noise drawn inside the pass) against the torch-op definition over layouts,
dtypes, odd sizes, 64-bit seeds and steps and thread counts; the noise's distribution; the
gradient; and the layer's stream state."""

import math
import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab import kernels
from bnlab.variants import noisy as N

K = kernels.load()
needs_kernels = pytest.mark.skipif(K is None, reason="no compiled CPU kernels on this machine")
NOISE = dict(n_mu=0.5, n_sigma=1.25, r_mu=0.1, r_sigma=0.1)


@pytest.mark.parametrize("counter,key,expected", [
    ((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
    ((0xffffffff,) * 4, (0xffffffff, 0xffffffff), (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
    ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
     (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1)),
])
def test_philox_matches_the_random123_known_answers(counter, key, expected):
    out = N.philox4x32(tuple(torch.tensor([c]) for c in counter), key)
    assert tuple(int(w) for w in out) == expected


def _input(shape, fmt, dtype, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


LAYOUTS = [((7, 5), None), ((64, 33), None), ((3, 5, 7), None), ((5, 3, 7, 3), None),
           ((4, 6, 5, 5), torch.channels_last), ((3, 4, 3, 5), torch.channels_last),
           ((2, 3, 2, 3, 5), torch.channels_last_3d), ((3, 3, 3, 3), torch.channels_last),
           ((2, 3, 3, 1, 3), torch.channels_last_3d), ((1, 1, 1, 1), None), ((9, 130, 3), None)]


@needs_kernels
@pytest.mark.parametrize("shape,fmt", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed,step", [(0, 0), (123456789012, 5), (-1, 2 ** 40 + 3)])
def test_kernel_draws_the_definitions_noise(shape, fmt, dtype, seed, step):
    a = _input(shape, fmt, dtype)
    y, s = K.nonstationary_noise(a, N._int64(seed), N._int64(step), *NOISE.values(), True)
    s_ref, m_ref = N.nonstationary_noise(shape, seed & (2 ** 64 - 1), step & (2 ** 64 - 1), **NOISE)
    assert s.dtype == torch.float32 and y.dtype == dtype
    assert y.stride() == a.stride() and s.stride() == a.stride()              # the input's layout
    # Box–Muller's ln, sin, cos by polynomials in float32: within a few float32 ulps of s ≈ 1.1
    torch.testing.assert_close(s, s_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(y, torch.addcmul(m_ref.to(dtype), a, s_ref.to(dtype)), atol=5e-6, rtol=1e-6)
    y2, none = K.nonstationary_noise(a, N._int64(seed), N._int64(step), *NOISE.values(), False)
    assert torch.equal(y2, y) and none is None                               # s kept only when asked


@needs_kernels
@pytest.mark.parametrize("first", [0, 1, 63, 2 ** 32 - 40, 2 ** 33 - 1, 2 ** 33 + 17, 2 ** 62 + 5])
def test_kernel_draws_equal_the_definition_far_into_the_stream(first):
    """Element indices past 2³² (the counter's carry into its high word, pairs that straddle it)
    and windows that start and end mid-pair and mid-vector."""
    z, v = K.control.noise_values(first, 101, N._int64(-5), 2 ** 33 + 1)
    z_ref, v_ref = N.noise_draws(first, 101, -5, 2 ** 33 + 1)
    torch.testing.assert_close(z, z_ref, atol=2e-6, rtol=0)
    torch.testing.assert_close(v, v_ref, atol=0, rtol=0)
    z_in, v_in = N.noise_draws(first + 30, 40, -5, 2 ** 33 + 1)             # a window inside
    assert torch.equal(v_in, v_ref[30:70]) and torch.equal(z_in, z_ref[30:70])


@needs_kernels
@pytest.mark.parametrize("shape,fmt", [((64, 512), None), ((16, 8, 30, 30), None), ((16, 8, 30, 30), torch.channels_last)])
def test_kernel_noise_does_not_depend_on_threads_or_layout(shape, fmt):
    a = _input(shape, fmt, torch.float32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = K.nonstationary_noise(a, 7, 11, *NOISE.values(), True)
        torch.set_num_threads(2)
        two = K.nonstationary_noise(a, 7, 11, *NOISE.values(), True)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    dense = K.nonstationary_noise(a.contiguous(), 7, 11, *NOISE.values(), True)
    assert torch.equal(dense[1], one[1].contiguous())


def test_the_noise_has_the_algorithms_distribution():
    """z standard normal (mean, variance, kurtosis, tail mass), v uniform (deciles), per unit
    μ_t on (−n_μ, n_μ) and σ_t on (1, n_σ); different steps and seeds draw different noise."""
    shape = (400, 50, 50)                                        # 10⁶ values, 50 units
    s, m = N.nonstationary_noise(shape, 3, 1, **NOISE)
    s2, _ = N.nonstationary_noise(shape, 3, 1, **NOISE)
    assert torch.equal(s, s2)
    sigma_t = s.mean((0, 2), keepdim=True)
    z = ((s - sigma_t) / 0.1).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((z ** 4).mean().item() - 3) < 0.05
    assert abs((z.abs() > 1.96).double().mean().item() - 0.05) < 0.002
    mu_t = m.mean((0, 2))
    v = ((m - mu_t.view(1, -1, 1) + 0.1) / 0.2).double().flatten()
    deciles = torch.quantile(v[:100_000], torch.linspace(0.1, 0.9, 9, dtype=torch.float64))
    torch.testing.assert_close(deciles, torch.linspace(0.1, 0.9, 9, dtype=torch.float64), atol=0.01, rtol=0)
    assert mu_t.abs().max() < 0.5 + 1e-3 and ((sigma_t > 1 - 1e-3) & (sigma_t < 1.25 + 1e-3)).all()
    assert not torch.equal(N.nonstationary_noise(shape, 3, 2, **NOISE)[0], s)
    assert not torch.equal(N.nonstationary_noise(shape, 4, 1, **NOISE)[0], s)


def test_consecutive_values_are_not_correlated():
    """Box–Muller's pair (cos, sin) and the pairs across counters: lag-1 and lag-2 correlations
    of z at the noise of 10⁶ values are within sampling error of 0."""
    s, m = N.nonstationary_noise((1, 1, 1_000_000), 0, 0, **NOISE)
    for t in (s.flatten().double(), m.flatten().double()):
        t = (t - t.mean()) / t.std()
        for lag in (1, 2):
            assert abs((t[:-lag] * t[lag:]).mean().item()) < 5e-3


@needs_kernels
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_the_layer_on_the_kernel_equals_the_layer_on_the_definition(fmt):
    x = _input((6, 4, 5, 5), fmt, torch.float64).requires_grad_()
    dy = _input((6, 4, 5, 5), None, torch.float64, seed=1)
    layers = [bnlab.NoisyBatchNorm2d(4, noise_seed=5).double() for _ in range(2)]
    out = []
    for layer, on in zip(layers, (True, False)):
        xi = x.detach().clone().requires_grad_()
        if on:
            y = layer(xi)
        else:
            with kernels.disabled():
                y = layer(xi)
        y.backward(dy)
        out.append((y.detach(), xi.grad, layer.weight.grad))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("on", [True, False], ids=["kernel", "definition"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_noise_gradient_is_the_noise_scale(on, fmt):
    """d(s·a + m)/da = s: gradcheck in float64 (the noise fixed by its step), a gradient in
    another layout than a, and a graph of the backward (create_graph)."""
    a = _input((3, 4, 2, 3), fmt, torch.float64).requires_grad_()

    def f(a):
        return N.add_nonstationary_noise(a, 9, 4, **NOISE)
    if on and K is None:
        pytest.skip("no compiled CPU kernels on this machine")
    ctx = kernels.disabled() if not on else torch.enable_grad()
    with ctx:
        assert torch.autograd.gradcheck(f, (a,))
        s, _ = N.nonstationary_noise(a.shape, 9, 4, **NOISE)
        dy = torch.randn(3, 4, 2, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last) \
            if fmt is None else torch.randn(3, 4, 2, 3, dtype=torch.float64)
        dy.requires_grad_()
        g, = torch.autograd.grad(f(a), a, dy, create_graph=True)
        torch.testing.assert_close(g, dy * s.double(), atol=1e-6, rtol=0)
        gg, = torch.autograd.grad(g.sum(), dy)                  # the backward's own graph: d(dy·s)/d(dy) = s
        torch.testing.assert_close(gg, s.double().expand_as(gg), atol=1e-6, rtol=0)


def test_half_precision_and_odd_strides_take_the_definition():
    a = torch.randn(8, 6, 4)[:, :, ::2]                          # neither contiguous nor channels_last
    y = N.add_nonstationary_noise(a, 1, 2, **NOISE)
    s, m = N.nonstationary_noise(a.shape, 1, 2, **NOISE)
    torch.testing.assert_close(y, s * a + m)
    h = N.add_nonstationary_noise(a.contiguous().bfloat16(), 1, 2, **NOISE)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), (s * a + m), atol=0.05, rtol=0.02)
    with pytest.raises(ValueError, match=r"\(N, C"):
        N.add_nonstationary_noise(torch.randn(5), 1, 2)
    with pytest.raises(TypeError, match="counter-based"):                     # the old signature
        N.add_nonstationary_noise(a, torch.Generator(), 2)
    with pytest.raises(ValueError, match="64 bits"):
        N.add_nonstationary_noise(a, 2 ** 64, 2)
    with pytest.raises(ValueError, match="64 bits"):
        bnlab.NoisyBatchNorm1d(3, noise_seed=-(2 ** 63) - 1)
    if K is not None:
        with pytest.raises(RuntimeError, match="CPU"):
            K.noise_grad(torch.randn(2, 3, device="meta"), torch.randn(2, 3, device="meta"))


def test_the_layers_stream_is_its_seed_and_step():
    layer = bnlab.NoisyBatchNorm1d(5, noise_seed=3)
    x = torch.randn(16, 5)
    y0 = layer(x)
    assert layer.noise_step == 1 and layer.get_extra_state() == {"noise_seed": 3, "noise_step": 1}
    assert "_noise_step" not in layer.state_dict()                           # saved as extra state only
    with torch.no_grad():
        bn = layer(x) * 0                                       # a second step: another draw
    layer.eval()
    layer(x)
    assert layer.noise_step == 2                                 # eval draws nothing
    layer.train()
    fresh = bnlab.NoisyBatchNorm1d(5, noise_seed=3)
    torch.testing.assert_close(fresh(x), y0, atol=0, rtol=0)
    layer.reseed()
    assert layer.noise_step == 0
    torch.testing.assert_close(layer(x), y0, atol=0, rtol=0)
    layer.reseed(8)
    assert layer.noise_seed == 8 and not torch.equal(layer(x), y0)
    with pytest.raises(TypeError):
        bnlab.NoisyBatchNorm1d(5, noise_seed=1.5)
    del bn


def test_a_checkpoint_from_the_generator_version_loads_with_a_warning():
    layer = bnlab.NoisyBatchNorm1d(4, noise_seed=2)
    layer(torch.randn(8, 4))
    state = layer.state_dict()
    state["_extra_state"] = {"generator": torch.Generator().manual_seed(0).get_state()}
    other = bnlab.NoisyBatchNorm1d(4, noise_seed=2)
    other.noise_step = 7
    with pytest.warns(UserWarning, match="torch.Generator"):
        other.load_state_dict(state)
    assert other.noise_step == 0
    torch.testing.assert_close(other.running_mean, layer.running_mean)
    with pytest.raises(ValueError, match="unrecognized extra state"):
        other.set_extra_state({"something": 1})
    with pytest.raises(ValueError, match="unrecognized extra state"):
        other.set_extra_state({"noise_step": 1})
    bn = nn.BatchNorm1d(4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(bn.state_dict())                 # a plain BN checkpoint: no extra state


def test_the_step_is_a_buffer_that_moves_and_replicas_advance():
    """The step lives in a (non-persistent) buffer: it follows .to(), and a shallow replica — as
    DataParallel's first one — advances the original's stream."""
    import copy
    layer = bnlab.NoisyBatchNorm1d(4, noise_seed=1).double()
    x = torch.randn(8, 4, dtype=torch.float64)
    replica = copy.copy(layer)
    replica._buffers = dict(layer._buffers)                        # shares the buffer tensors
    replica(x)
    assert layer.noise_step == 1
    layer.noise_step = 2 ** 40
    assert layer.get_extra_state()["noise_step"] == 2 ** 40


def test_the_definition_draws_in_chunks_without_changing_a_value(monkeypatch):
    """The torch-op definition bounds its temporaries by drawing a chunk of values at a time:
    the chunks (odd-sized here, so they start mid-pair) give the same numbers as one draw."""
    whole = N.nonstationary_noise((5, 3, 7), 11, 4, **NOISE)
    monkeypatch.setattr(N, "_CHUNK", 13)
    chunked = N.nonstationary_noise((5, 3, 7), 11, 4, **NOISE)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
