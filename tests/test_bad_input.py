"""Bad input gets a clear error — of bnlab's type *and* of the type torch.nn raises — or a
documented result."""

import pytest
import torch
from torch import nn

import bnlab
from bnlab import functional as BF


@pytest.mark.parametrize("layer,shape", [(bnlab.BatchNorm1d(3), (4,)), (bnlab.BatchNorm1d(3), (4, 3, 2, 2)),
                                         (bnlab.BatchNorm2d(3), (4, 3, 2)), (bnlab.BatchNorm3d(3), (4, 3, 2, 2))])
def test_wrong_ndim(layer, shape):
    with pytest.raises(bnlab.ShapeError, match="expect") as info:
        layer(torch.randn(*shape))
    assert isinstance(info.value, ValueError)          # what torch.nn raises here


def test_wrong_channel_count_says_which_and_how_to_fix():
    with pytest.raises(bnlab.ShapeError, match="expects 3 channels.*5 channels") as info:
        bnlab.BatchNorm1d(3)(torch.randn(4, 5))
    assert isinstance(info.value, RuntimeError)        # what torch.nn raises here
    with pytest.raises(bnlab.ShapeError, match="running_mean has 4 elements but the input has 3 channels"):
        BF.batch_norm(torch.randn(4, 3), torch.zeros(4), torch.ones(4), training=True)


@pytest.mark.parametrize("layer,shape", [(bnlab.BatchNorm1d(3), (1, 3)), (bnlab.BatchNorm2d(3), (1, 3, 1, 1)),
                                         (bnlab.BatchNorm1d(3), (1, 3, 1))])
def test_batch_of_one_in_training_raises_and_says_what_to_do(layer, shape):
    with pytest.raises(bnlab.BatchSizeError, match="more than 1 value per channel.*model.eval"):
        layer.train()(torch.randn(*shape))
    assert layer.num_batches_tracked.item() == 0       # nothing was updated


def test_batch_of_one_is_fine_with_spatial_extent_and_in_eval():
    bnlab.BatchNorm2d(3)(torch.randn(1, 3, 2, 2))      # 4 values per channel
    bnlab.BatchNorm1d(3).eval()(torch.randn(1, 3))


def test_batch_of_one_option_uses_running_statistics():
    bn = bnlab.BatchNorm1d(3, batch_of_one="use_running_stats")
    bn(torch.randn(8, 3) * 2 + 1)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(1, 3)
    y = bn(x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y, expected)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k             # no statistics, no counter updated


def test_empty_batch_is_documented_no_op():
    bn = bnlab.BatchNorm2d(2)
    y = bn(torch.randn(0, 2, 3, 3))
    assert y.shape == (0, 2, 3, 3)
    assert torch.equal(bn.running_mean, torch.zeros(2)) and torch.equal(bn.running_var, torch.ones(2))


def test_integer_input_is_refused_with_advice():
    with pytest.raises(bnlab.DTypeError, match="floating-point.*float") as info:
        bnlab.BatchNorm1d(3)(torch.ones(4, 3, dtype=torch.long))
    assert isinstance(info.value, TypeError) and isinstance(info.value, NotImplementedError)
    with pytest.raises(bnlab.DTypeError):
        bnlab.BatchNorm2d(3)(torch.ones(4, 3, 2, 2, dtype=torch.uint8))


def test_nan_propagates_to_its_channel_only_like_torch():
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    ours, ref = bnlab.BatchNorm1d(3), nn.BatchNorm1d(3)
    y, y_ref = ours(x), ref(x)
    assert torch.isnan(y[:, 1]).all() and torch.isfinite(y[:, [0, 2]]).all()
    torch.testing.assert_close(y, y_ref, equal_nan=True)
    assert torch.isnan(ours.running_mean[1]) and torch.isfinite(ours.running_mean[[0, 2]]).all()


def test_check_finite_raises_before_touching_buffers():
    bn = bnlab.BatchNorm1d(3, check_finite=True)
    x = torch.randn(6, 3)
    x[0, 2] = float("inf")
    with pytest.raises(bnlab.NonFiniteError, match=r"channels \[2\]"):
        bn(x)
    assert bn.num_batches_tracked.item() == 0 and torch.equal(bn.running_mean, torch.zeros(3))


def test_eval_without_statistics_in_functional():
    with pytest.raises(bnlab.ModeError, match="running_mean must be defined"):
        BF.batch_norm(torch.randn(4, 3), None, None, training=False)


def test_functional_momentum_none_explains_itself():
    with pytest.raises(TypeError, match="cumulative"):
        BF.batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None)


@pytest.mark.parametrize("kw", [dict(momentum=1.5), dict(running_var_correction="sample"), dict(batch_of_one="skip")])
def test_bad_constructor_arguments(kw):
    with pytest.raises(ValueError):
        bnlab.BatchNorm1d(3, **kw)


def test_non_tensor_input():
    with pytest.raises(TypeError):
        bnlab.BatchNorm1d(3)([[1.0, 2.0, 3.0]])
