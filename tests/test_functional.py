"""bnlab.functional.batch_norm, the public entry: float64 gradcheck and gradgradcheck through the
dispatch, parity with torch.nn.functional, and its signature."""

import pytest
import torch

from bnlab import definition as D
from bnlab import functional as BF
from bnlab import kernels

SHAPES = [(6, 4), (5, 3, 7), (4, 3, 5, 2), (3, 2, 3, 4, 2)]


def _inputs(shape, affine, dtype=torch.float64):
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    C = shape[1]
    w = (torch.rand(C, dtype=dtype) + 0.5).requires_grad_() if affine else None
    b = torch.randn(C, dtype=dtype).requires_grad_() if affine else None
    return x, w, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_and_gradgradcheck(shape, affine, training):
    x, w, b = _inputs(shape, affine)
    C = shape[1]
    rm = torch.randn(C, dtype=torch.float64)
    rv = torch.rand(C, dtype=torch.float64) + 0.5

    def f(*args):
        x, *params = args
        w, b = (params if affine else (None, None))
        # clones: the training call updates running buffers in place on every evaluation
        return BF.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training, eps=1e-3)

    args = (x, w, b) if affine else (x,)
    assert torch.autograd.gradcheck(f, args)
    assert torch.autograd.gradgradcheck(f, args)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("training", [True, False])
def test_dispatched_call_equals_the_definition(shape, training):
    """Whatever backend the dispatch picks, output and gradients are the definition's."""
    x, w, b = _inputs(shape, affine=True)
    C = shape[1]
    rm, rv = torch.randn(C, dtype=torch.float64), torch.rand(C, dtype=torch.float64) + 0.5
    rm_ref, rv_ref = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, training=training)
    with kernels.disabled():                                 # kernels off: the definition itself runs
        y_ref = BF.batch_norm(x, rm_ref, rv_ref, w, b, training=training)
    torch.testing.assert_close(y, D.batch_norm(x, rm.clone(), rv.clone(), w, b, training, 0.0, 1e-5),
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close((rm, rv), (rm_ref, rv_ref), atol=1e-13, rtol=1e-13)
    dy = torch.randn_like(y)
    for g, g_ref in zip(torch.autograd.grad(y, (x, w, b), dy), torch.autograd.grad(y_ref, (x, w, b), dy)):
        torch.testing.assert_close(g, g_ref, atol=1e-11, rtol=1e-11)


def test_direct_path_without_grad_equals_autograd_path():
    x = torch.randn(8, 3, 4, 4)
    w, b = torch.rand(3) + 0.5, torch.randn(3)
    rm1, rv1, rm2, rv2 = torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    with torch.no_grad():
        y1 = BF.batch_norm(x, rm1, rv1, w, b, training=True)
    y2 = BF.batch_norm(x, rm2, rv2, w.requires_grad_(), b, training=True)
    torch.testing.assert_close(y1, y2.detach(), atol=0, rtol=0)
    torch.testing.assert_close(rm1, rm2, atol=0, rtol=0)
    torch.testing.assert_close(rv1, rv2, atol=0, rtol=0)


def test_signature_matches_torch():
    import inspect
    ours = list(inspect.signature(BF.batch_norm).parameters)
    theirs = list(inspect.signature(torch.nn.functional.batch_norm).parameters)
    assert ours[:len(theirs)] == theirs


@pytest.mark.parametrize("training", [True, False])
def test_functional_parity_with_torch(training):
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    w, b = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    rm, rv = torch.randn(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) + 0.1
    rm_t, rv_t = rm.clone(), rv.clone()
    y = BF.batch_norm(x, rm, rv, w, b, training, 0.3, 1e-3)
    y_t = torch.nn.functional.batch_norm(x, rm_t, rv_t, w, b, training, 0.3, 1e-3)
    torch.testing.assert_close(y, y_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rm, rm_t, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rv, rv_t, atol=1e-12, rtol=1e-12)


def test_low_precision_accumulates_in_float32():
    """A bfloat16 input's statistics are computed in float32 (and returned as float32)."""
    from bnlab.kernels import dispatch
    x = (torch.randn(64, 8) * 3 + 100).bfloat16()
    y = BF.batch_norm(x, None, None, training=True)
    _, mean, var, invstd = dispatch.forward_train(x, None, None, 1e-5)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32 and var.dtype == torch.float32
    assert invstd.dtype == torch.float32
    x32 = x.float()
    torch.testing.assert_close(mean, x32.mean(0), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(var, x32.var(0, unbiased=False), atol=1e-3, rtol=1e-4)
