"""bnlab against PyTorch's own curated inputs.

PyTorch's test suite keeps hand-picked sample inputs for every operator (OpInfo, in
``torch.testing._internal.common_methods_invocations``) and module (ModuleInfo, in
``common_modules``): odd shapes, empty batches, 1-D empty input, negative momentum, eps = 0.6,
``momentum=None``, ``bias=False``, no running statistics. Each sample goes through torch.nn and
through bnlab; outputs, every gradient and the running buffers must agree, and where torch
raises, bnlab must raise too.

These modules import test-only packages (expecttest); without them the tests are skipped.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bnlab
import bnlab.functional as BF
from conftest import TOLERANCES

common_methods = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

TOL = {dtype: tol["out"][0] for dtype, tol in TOLERANCES.items()}


def _op_samples(dtype):
    op = next(o for o in common_methods.op_db if o.name == "nn.functional.batch_norm" and not o.variant_test_name)
    return list(op.sample_inputs("cpu", dtype, requires_grad=True))


def _fresh(t):
    return t.detach().clone().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t


def _apply(fn, inp, args, kwargs):
    """(output, gradients of every tensor that requires grad, tensor args afterwards) or the error."""
    inp, args = _fresh(inp), [_fresh(a) for a in args]
    try:
        out = fn(inp, *args, **kwargs)
    except Exception as e:                               # the comparison is of what raises
        return e
    leaves = [t for t in [inp, *args] if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = None
    if out.requires_grad and out.numel():
        # a weighted sum, so that Σdy = 0 and Σdy·x̂ = 0 cannot hide a wrong backward
        dy = torch.linspace(-1, 2, out.numel(), dtype=torch.float64).view_as(out).to(out.dtype)
        grads = torch.autograd.grad(out, leaves, dy, allow_unused=True)
    return out, grads, [a for a in args if isinstance(a, torch.Tensor)]


def _close(a, b, tol):
    return a.shape == b.shape and torch.allclose(a.double(), b.double(), atol=tol, rtol=tol, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_functional_matches_torch_on_opinfo_samples(dtype):
    samples = _op_samples(dtype)
    assert len(samples) >= 10
    tol = TOL[dtype]
    for i, s in enumerate(samples):
        what = f"sample {i}: input {tuple(s.input.shape)}, {s.kwargs}"
        ref = _apply(F.batch_norm, s.input, s.args, s.kwargs)
        ours = _apply(BF.batch_norm, s.input, s.args, s.kwargs)
        if isinstance(ref, Exception):
            assert isinstance(ours, Exception), f"{what}: torch raised {ref!r}, bnlab did not"
            continue
        assert not isinstance(ours, Exception), f"{what}: bnlab raised {ours!r}"
        (y_ref, g_ref, args_ref), (y, g, args) = ref, ours
        assert y.dtype == y_ref.dtype and _close(y, y_ref, tol), what
        for a_ref, a in zip(args_ref, args):              # running statistics updated alike
            assert _close(a, a_ref, tol), what
        assert (g is None) == (g_ref is None), what
        for gr, go in zip(g_ref or (), g or ()):
            assert (gr is None) == (go is None), what
            if gr is not None:
                assert _close(go, gr, 10 * tol), what


def _module_samples():
    for info in common_modules.module_db:
        if info.module_cls.__name__.startswith("BatchNorm"):
            for dtype in (torch.float64, torch.float32):
                for training in (True, False):
                    for s in info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True,
                                                     training=training):
                        yield info.module_cls, dtype, training, s


def _module_run(module, args):
    xs = [_fresh(a) for a in args]
    y = module(*xs)
    leaves = xs + [p for p in module.parameters()]
    grads = None
    if y.requires_grad and y.numel():
        dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y).to(y.dtype)
        grads = torch.autograd.grad(y, leaves, dy, allow_unused=True)
    return y, grads, {n: b.clone() for n, b in module.named_buffers()}


def test_modules_match_torch_on_moduleinfo_samples():
    seen = 0
    for cls, dtype, training, s in _module_samples():
        ctor, fwd = s.constructor_input, s.forward_input
        what = f"{cls.__name__}{tuple(ctor.args)} {ctor.kwargs} {dtype} training={training}"
        ref = cls(*ctor.args, **ctor.kwargs).to(dtype)
        ours = getattr(bnlab, cls.__name__)(*ctor.args, **ctor.kwargs).to(dtype)
        ours.load_state_dict(ref.state_dict())
        ref.train(training)
        ours.train(training)
        tol = TOL[dtype] * (1e2 if dtype == torch.float64 else 10)
        for _ in range(2):                                # a second step sees the updated buffers
            y_ref, g_ref, buf_ref = _module_run(ref, fwd.args)
            y, g, buf = _module_run(ours, fwd.args)
            assert y.dtype == y_ref.dtype and _close(y, y_ref, tol), what
            assert buf.keys() == buf_ref.keys(), what
            for name in buf_ref:
                assert _close(buf[name], buf_ref[name], tol), f"{what}: buffer {name}"
            assert (g is None) == (g_ref is None), what
            for gr, go in zip(g_ref or (), g or ()):
                assert (gr is None) == (go is None), what
                if gr is not None:
                    assert _close(go, gr, 10 * tol), what
        seen += 1
    assert seen >= 40
