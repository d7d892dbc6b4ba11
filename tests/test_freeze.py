"""freeze(): normalize with the running statistics, update nothing, stay frozen through train()."""

import pytest
import torch
from torch import nn

import bnlab


def _warm(bn, shape):
    for _ in range(3):
        bn(torch.randn(*shape) * 2 + 1)
    return bn


def test_frozen_layer_updates_nothing_and_survives_train():
    bn = _warm(bnlab.BatchNorm2d(3), (4, 3, 2, 2))
    model = nn.Sequential(nn.Conv2d(3, 3, 1), bn)
    bn.freeze()
    model.train()                                 # the classic way freezing gets undone
    assert bn.training and bn.frozen
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3, 2, 2) * 5
    y = model(x)
    y.sum().backward()
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert bn.weight.grad is None and bn.bias.grad is None
    # it normalized with the running statistics, exactly as eval mode does
    bn_eval = bnlab.BatchNorm2d(3)
    bn_eval.load_state_dict(bn.state_dict())
    torch.testing.assert_close(y, bn_eval.eval()(model[0](x)))


def test_freeze_can_keep_parameters_learning():
    bn = _warm(bnlab.BatchNorm1d(3), (8, 3)).freeze(parameters=False)
    bn(torch.randn(8, 3)).sum().backward()
    assert bn.weight.grad is not None
    assert bn.num_batches_tracked.item() == 3


def test_unfreeze_restores_training_behaviour_and_flags():
    bn = _warm(bnlab.BatchNorm1d(3), (8, 3))
    bn.bias.requires_grad_(False)
    bn.freeze().unfreeze()
    assert not bn.frozen and bn.weight.requires_grad and not bn.bias.requires_grad
    bn(torch.randn(8, 3))
    assert bn.num_batches_tracked.item() == 4


def test_cannot_freeze_without_running_statistics():
    with pytest.raises(bnlab.ModeError, match="track_running_stats=False"):
        bnlab.BatchNorm1d(3, track_running_stats=False).freeze()


def test_frozen_batch_of_one_normalizes_with_the_running_statistics():
    """A frozen layer in train mode takes a single example (no batch statistics needed) and
    normalizes it with its running statistics, changing nothing."""
    bn = _warm(bnlab.BatchNorm1d(3), (8, 3)).freeze().train()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(1, 3)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(bn(x), expected)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
