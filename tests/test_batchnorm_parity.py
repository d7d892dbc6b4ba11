"""bnlab.BatchNorm* against torch.nn.BatchNorm* over the whole mode grid.

train/eval × affine × track_running_stats × momentum {0.1, None} × dtype {float64, float32,
bfloat16} × {contiguous, channels_last}: outputs, input and parameter gradients, and every
buffer after several steps, with the tolerances of conftest.TOLERANCES per dtype.
"""

import itertools

import pytest
import torch
from torch import nn

import bnlab
from conftest import TOLERANCES

LAYERS = [
    (nn.BatchNorm1d, bnlab.BatchNorm1d, (6, 4)),
    (nn.BatchNorm1d, bnlab.BatchNorm1d, (5, 4, 3)),
    (nn.BatchNorm2d, bnlab.BatchNorm2d, (4, 3, 5, 4)),
    (nn.BatchNorm3d, bnlab.BatchNorm3d, (3, 3, 2, 4, 3)),
]
GRID = [case for case in itertools.product(
    range(len(LAYERS)), [True, False], [True, False], [True, False], [0.1, None],
    [torch.float64, torch.float32, torch.bfloat16], [False, True])
    if not (case[-1] and len(LAYERS[case[0]][2]) < 4)]   # channels_last exists for 4D/5D only


def _close(a, b, tol):
    atol, rtol = tol
    torch.testing.assert_close(a.float() if a.dtype == torch.bfloat16 else a,
                               b.float() if b.dtype == torch.bfloat16 else b,
                               atol=atol, rtol=rtol, check_dtype=False)


@pytest.mark.parametrize("layer,training,affine,track,momentum,dtype,channels_last", GRID)
def test_parity_grid(layer, training, affine, track, momentum, dtype, channels_last):
    torch_cls, bnlab_cls, shape = LAYERS[layer]
    C = shape[1]
    ref = torch_cls(C, eps=1e-3, momentum=momentum, affine=affine, track_running_stats=track)
    ours = bnlab_cls(C, eps=1e-3, momentum=momentum, affine=affine, track_running_stats=track)
    if affine:  # non-trivial γ, β so the parameter paths are exercised
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    ref.to(dtype).train(training)
    ours.to(dtype).train(training)
    fmt = (torch.channels_last if len(shape) == 4 else torch.channels_last_3d) if channels_last \
        else torch.contiguous_format
    tol = TOLERANCES[dtype]

    for step in range(3):
        x = (torch.randn(*shape, dtype=torch.float64) * 2 + 0.5).to(dtype)
        x = x.contiguous(memory_format=fmt)
        x_ref = x.clone().requires_grad_()
        x_ours = x.clone().requires_grad_()
        y_ref, y_ours = ref(x_ref), ours(x_ours)
        assert y_ours.dtype == y_ref.dtype and y_ours.shape == y_ref.shape
        if channels_last:
            assert y_ours.is_contiguous(memory_format=fmt)
        _close(y_ours, y_ref, tol["out"])
        dy = torch.randn_like(y_ref)
        y_ref.backward(dy)
        y_ours.backward(dy)
        _close(x_ours.grad, x_ref.grad, tol["grad"])
        if affine:
            _close(ours.weight.grad, ref.weight.grad, tol["grad"])
            _close(ours.bias.grad, ref.bias.grad, tol["grad"])
        for name, buf in ref.named_buffers():
            mine = dict(ours.named_buffers())[name]
            if buf.dtype.is_floating_point:
                _close(mine, buf, tol["grad"])
            else:
                assert torch.equal(mine, buf), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_into_float32_module_keeps_float32_statistics(dtype):
    """The autocast pattern: float32 parameters and buffers, low-precision activations."""
    ref, ours = nn.BatchNorm2d(3), bnlab.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5).to(dtype)
    y = ours(x)
    assert y.dtype == dtype
    assert ours.running_mean.dtype == torch.float32 and ours.running_var.dtype == torch.float32
    if dtype == torch.bfloat16:   # torch's CPU kernel supports this mix for bfloat16
        torch.testing.assert_close(y.float(), ref(x).float(), atol=4e-2, rtol=2e-2)
        torch.testing.assert_close(ours.running_var, ref.running_var, atol=1e-3, rtol=1e-3)
    else:
        expected = (x.float() - x.float().mean((0, 2, 3), keepdim=True)) / torch.sqrt(
            x.float().var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
        torch.testing.assert_close(y.float(), expected, atol=4e-3, rtol=4e-3)


def test_double_input_into_float32_module_is_computed_in_float64():
    ours = bnlab.BatchNorm1d(4)
    x = torch.randn(8, 4, dtype=torch.float64)
    y = ours(x)
    assert y.dtype == torch.float64
    expected = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(y, expected, atol=1e-12, rtol=1e-12)


def test_zero_batch_matches_torch():
    """PyTorch's curated 'zero_batch' input: empty output, counter increments, statistics kept."""
    ref, ours = nn.BatchNorm1d(5, 1e-3, 0.3, False), bnlab.BatchNorm1d(5, 1e-3, 0.3, False)
    x = torch.randn(0, 5, 9, requires_grad=True)
    y, y_ref = ours(x), ref(x)
    assert y.shape == y_ref.shape == (0, 5, 9)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(ours.named_buffers())[name], buf)
    ours.eval()
    assert ours(torch.randn(0, 5, 9)).shape == (0, 5, 9)


def test_eval_without_running_stats_uses_batch_statistics():
    ref = nn.BatchNorm2d(3, track_running_stats=False).eval()
    ours = bnlab.BatchNorm2d(3, track_running_stats=False).eval()
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(ours(x), ref(x))


def test_eval_changes_no_buffer():
    ours = bnlab.BatchNorm1d(4)
    ours(torch.randn(8, 4))
    ours.eval()
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    ours(torch.randn(8, 4) * 10 + 3)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k
