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


def test_batch_of_one_with_spatial_extent_and_in_eval_normalizes_as_torch_does():
    """One example with 4 values per channel has batch statistics; in eval a single example
    uses the running statistics. Both give torch.nn's numbers."""
    x2 = torch.randn(1, 3, 2, 2)
    ours, ref = bnlab.BatchNorm2d(3), nn.BatchNorm2d(3)
    torch.testing.assert_close(ours(x2), ref(x2))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    x1 = torch.randn(1, 3)
    ours1, ref1 = bnlab.BatchNorm1d(3).eval(), nn.BatchNorm1d(3).eval()
    with torch.no_grad():
        for m in (ours1, ref1):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    torch.testing.assert_close(ours1(x1), ref1(x1))


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


# Every layer that takes check_finite honours it, in training and in eval, on every path (Ghost BN
# with more than one virtual batch and BatchNormAct2d once let NaN into their running statistics).
CHECK_FINITE_LAYERS = {
    "BatchNorm2d": lambda: bnlab.BatchNorm2d(8, check_finite=True),
    "GhostBatchNorm2d": lambda: bnlab.GhostBatchNorm2d(8, virtual_batch_size=16, check_finite=True),
    "GhostBatchNorm2d-virtual": lambda: bnlab.GhostBatchNorm2d(8, virtual_batch_size=16, running_stats="virtual",
                                                               check_finite=True),
    "BatchRenorm2d": lambda: bnlab.BatchRenorm2d(8, check_finite=True),
    "BatchNormAct2d": lambda: bnlab.BatchNormAct2d(8, check_finite=True),
    "BatchNormAct2d-leaky": lambda: bnlab.BatchNormAct2d(8, activation="leaky_relu", check_finite=True),
    "BatchNormAct2d-plain": lambda: bnlab.BatchNormAct2d(8, memory_efficient=False, check_finite=True),
    "NoisyBatchNorm2d": lambda: bnlab.NoisyBatchNorm2d(8, check_finite=True),
    "SyncBatchNorm": lambda: bnlab.SyncBatchNorm(8, check_finite=True),
}


@pytest.mark.parametrize("name", sorted(CHECK_FINITE_LAYERS))
@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_check_finite_is_honoured_by_every_layer_that_takes_it(name, mode, bad):
    layer = CHECK_FINITE_LAYERS[name]().train(mode == "train")
    x = torch.randn(64, 8, 3, 3)
    x[40, 5, 1, 2] = bad                                     # in the third virtual batch of Ghost BN
    before = {k: v.clone() for k, v in layer.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(bnlab.NonFiniteError, match=r"channels \[5\]"):
        layer(x)
    for k, v in layer.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, before[k]), (name, k)


@pytest.mark.parametrize("make,match", [
    (lambda: bnlab.BatchRenorm1d(4, rmax=0.0), "rmax"),
    (lambda: bnlab.BatchRenorm1d(4, rmax=0.5), "rmax"),
    (lambda: bnlab.BatchRenorm1d(4, dmax=-1.0), "dmax"),
    (lambda: bnlab.BatchRenorm1d(4, rmax=float("nan")), "rmax"),
    (lambda: bnlab.BatchRenorm1d(4, warmup_steps=-1), "warmup_steps"),
    (lambda: bnlab.BatchRenorm1d(4, virtual_batch_size=0), "virtual_batch_size"),
    (lambda: bnlab.BatchRenorm1d(4, virtual_batch_size=2.5), "virtual_batch_size"),
    (lambda: bnlab.GhostBatchNorm1d(4, virtual_batch_size=0), "virtual_batch_size"),
    (lambda: bnlab.GhostBatchNorm1d(4, virtual_batch_size=2.5), "virtual_batch_size"),
    (lambda: bnlab.GhostBatchNorm1d(4, virtual_batch_size=1), "virtual_batch_size"),
    (lambda: bnlab.IterNorm(4, T=0), "T"),
    (lambda: bnlab.IterNorm(4, T=-2), "T"),
    (lambda: bnlab.IterNorm(4, T=2.5), "T"),
    (lambda: bnlab.IterNorm(4, eps=0.0), "eps"),
    (lambda: bnlab.DecorrelatedBatchNorm(4, group_size=0), "group_size"),
    (lambda: bnlab.DecorrelatedBatchNorm(4, group_size=3), "multiple"),
    (lambda: bnlab.DecorrelatedBatchNorm(4, momentum=2.0), "momentum"),
])
def test_variants_refuse_bad_arguments_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [lambda: bnlab.DecorrelatedBatchNorm(4, group_size=2),
                                  lambda: bnlab.DecorrelatedBatchNorm(4, group_size=2, whitening="pca"),
                                  lambda: bnlab.IterNorm(4, group_size=2)])
def test_whitening_of_an_empty_batch_is_empty_and_of_nan_a_clear_error(make):
    layer = make()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    y = layer(torch.randn(0, 4))                            # once: LinAlgError from eigh
    assert y.shape == (0, 4)
    x = torch.randn(16, 4)
    x[3, 1] = float("nan")
    with pytest.raises(bnlab.NonFiniteError, match="no statistics were updated"):
        layer(x)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
