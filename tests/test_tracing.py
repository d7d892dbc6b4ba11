"""bnlab's modules under PyTorch's tracers — torch.jit.trace, torch.export and torch.compile —
give what torch.nn gives: the compiled kernels are opaque to a tracer (a trace would record their
output as a constant; export's fake tensors have no data), so traced calls take the definition
in torch operations (bnlab.definition)."""

import warnings

import pytest
import torch
from torch import nn

import bnlab
from bnlab import kernels

BN = {1: (bnlab.BatchNorm1d, nn.BatchNorm1d), 2: (bnlab.BatchNorm2d, nn.BatchNorm2d),
      3: (bnlab.BatchNorm3d, nn.BatchNorm3d)}
INPUT = {1: (6, 5, 7), 2: (6, 5, 4, 3), 3: (6, 5, 3, 2, 4)}


def _pair(dims: int, train: bool, fmt=None):
    """A bnlab layer and a torch.nn layer with the same state (after one training step each)."""
    ours, theirs = BN[dims][0](5), BN[dims][1](5)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-1, 1)
    ours(torch.randn(*INPUT[dims]) * 2 + 1)
    theirs.load_state_dict(ours.state_dict())
    return ours.train(train), theirs.train(train)


def _inputs(dims: int, fmt=None):
    g = torch.Generator().manual_seed(5)
    x, x2 = (torch.randn(*INPUT[dims], generator=g) * 3 - 1 for _ in range(2))
    if fmt is not None:
        x, x2 = x.contiguous(memory_format=fmt), x2.contiguous(memory_format=fmt)
    return x, x2


CASES = [(1, None), (2, None), (2, torch.channels_last), (3, None)]


@pytest.mark.parametrize("dims,fmt", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_jit_trace_equals_torch_nn(dims, fmt, train):
    ours, theirs = _pair(dims, train)
    x, x2 = _inputs(dims, fmt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # the check re-traces and compares the graphs: the trace must not depend on grad mode;
        # a training trace is checked without it (each run updates the running statistics)
        traced = torch.jit.trace(ours, x, check_trace=not train)
    theirs(x)                                        # the trace ran the layer on x (in training: an update)
    before = sum(kernels.calls.values())
    out = traced(x2)
    assert sum(kernels.calls.values()) == before, "the traced graph calls a compiled kernel"
    torch.testing.assert_close(out, theirs(x2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dims,fmt", CASES)
@pytest.mark.parametrize("train", [False, True])
def test_torch_export_equals_torch_nn(dims, fmt, train):
    ours, theirs = _pair(dims, train)
    x, x2 = _inputs(dims, fmt)
    exported = torch.export.export(ours, (x,)).module()
    out, expected = exported(x2), theirs(x2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    state = exported.state_dict()
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(state[name], getattr(theirs, name), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_torch_compile_equals_torch_nn(train):
    torch._dynamo.reset()
    ours, theirs = _pair(2, train)
    x, _ = _inputs(2)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)   # fullgraph: no break into eager
    y, y_ref = compiled(xa), theirs(xb)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-6, rtol=1e-6)


def test_eager_calls_still_take_the_compiled_kernels():
    if not kernels.available():
        pytest.skip("no compiled kernels here")
    before = kernels.calls["forward_train"]
    bnlab.BatchNorm2d(5)(torch.randn(*INPUT[2]))
    assert kernels.calls["forward_train"] == before + 1


@pytest.mark.parametrize("dims", [1, 2])
def test_torch_func_transforms_equal_torch_nn(dims):
    """vmap (eval, and training without running statistics), grad and jacrev compose with
    bnlab's layers as with torch.nn's (custom autograd Functions would not)."""
    from torch.func import grad, jacrev, vmap
    g = torch.Generator().manual_seed(6)
    xs = torch.randn(3, *INPUT[dims], generator=g) * 2 + 1
    ours, theirs = _pair(dims, train=False)
    torch.testing.assert_close(vmap(ours)(xs), vmap(theirs)(xs), atol=1e-5, rtol=1e-5)
    ours_t, theirs_t = BN[dims][0](5, track_running_stats=False), BN[dims][1](5, track_running_stats=False)
    with torch.no_grad():
        ours_t.weight.uniform_(0.5, 1.5)
    theirs_t.load_state_dict(ours_t.state_dict())
    torch.testing.assert_close(vmap(ours_t)(xs), vmap(theirs_t)(xs), atol=1e-5, rtol=1e-5)

    def loss(layer):
        return lambda x: layer(x).pow(3).sum()
    torch.testing.assert_close(grad(loss(ours_t))(xs[0]), grad(loss(theirs_t))(xs[0]), atol=1e-4, rtol=1e-4)
    if dims == 1:
        torch.testing.assert_close(jacrev(ours_t)(xs[0]), jacrev(theirs_t)(xs[0]), atol=1e-5, rtol=1e-5)
