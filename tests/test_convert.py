"""convert(model, to=...): every batch-norm layer swapped, state kept (the same tensors),
nesting and subclasses handled, and back again."""

import warnings

import pytest
import torch
from torch import nn

import bnlab


class MyBN(nn.BatchNorm2d):
    """A user's subclass of torch's layer."""


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = MyBN(4)
        self.inner = nn.Sequential(nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False))
        self.head = nn.ModuleDict({"fc": nn.Linear(4, 3), "bn": nn.BatchNorm1d(3, momentum=None)})

    def forward(self, x):
        h = self.inner(self.bn(self.conv(x))).mean((2, 3))
        return self.head["bn"](self.head["fc"](h))


def _kinds(model, cls):
    return [n for n, m in model.named_modules() if isinstance(m, cls)]


def test_round_trip_keeps_tensors_outputs_and_flags():
    torch_model = Block()
    for _ in range(2):
        torch_model(torch.randn(5, 2, 4, 4))
    tensors = {n: t for n, t in list(torch_model.named_parameters()) + list(torch_model.named_buffers())}
    x = torch.randn(5, 2, 4, 4)
    torch_model.eval()
    y_ref = torch_model(x)

    model = bnlab.convert(torch_model, to="bnlab")
    assert model is torch_model
    bn_names = ["bn", "inner.2", "head.bn"]
    assert _kinds(model, (bnlab.BatchNorm1d, bnlab.BatchNorm2d)) == bn_names
    assert not model.training and not model.bn.training
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert t is tensors[n], f"{n} was copied, optimizers would lose it"
    assert model.head["bn"].momentum is None and model.inner[2].affine is False
    torch.testing.assert_close(model(x), y_ref)

    back = bnlab.convert(model, to="torch")
    assert _kinds(back, bnlab.BatchNorm2d) == [] and type(back.inner[2]) is nn.BatchNorm2d
    torch.testing.assert_close(back(x), y_ref)


def test_root_layer_is_replaced_and_returned():
    bn = nn.BatchNorm1d(4)
    out = bnlab.convert(bn)
    assert isinstance(out, bnlab.BatchNorm1d) and out.weight is bn.weight


def test_hooks_move_with_the_layer():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    seen = []
    handle = model[1].register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    model = bnlab.convert(model)
    model(torch.randn(4, 3))
    assert seen == ["BatchNorm1d"] and isinstance(model[1], bnlab.BatchNorm1d)
    handle.remove()
    model(torch.randn(4, 3))
    assert len(seen) == 1


def test_optimizer_keeps_working_after_conversion():
    model = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = bnlab.convert(model)
    before = model[1].bias.detach().clone()
    # (y − 1)²: dβ = 2Σ(y − 1) = −2m ≠ 0 (with Σy² alone dβ = 2Σy = 2mβ = 0 in exact arithmetic)
    model(torch.randn(8, 3)).sub(1).pow(2).sum().backward()
    opt.step()
    assert torch.allclose(model[1].bias, before + 0.1 * 2 * 8, atol=1e-5)


def test_bias_false_and_lazy_layers():
    m = bnlab.convert(nn.BatchNorm2d(3, bias=False))
    assert m.bias is None and m.weight is not None
    with pytest.raises(ValueError, match="forward pass"):
        bnlab.convert(nn.LazyBatchNorm1d())
    lazy = nn.LazyBatchNorm1d()
    lazy(torch.randn(4, 6))
    assert isinstance(bnlab.convert(lazy), bnlab.BatchNorm1d)


def test_unknown_target():
    with pytest.raises(ValueError, match="unknown conversion target"):
        bnlab.convert(nn.BatchNorm1d(2), to="tensorflow")


def test_frozen_layer_to_torch_warns_and_restores_flags():
    m = bnlab.BatchNorm1d(3).freeze()
    with pytest.warns(UserWarning, match="frozen"):
        t = bnlab.convert(m, to="torch")
    assert type(t) is nn.BatchNorm1d and t.weight.requires_grad


@pytest.mark.parametrize("to", ["torch", "bnlab", "sync", "frozen", "ghost", "renorm"])
@pytest.mark.parametrize("layer", [lambda: bnlab.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.3),
                                   lambda: bnlab.DetachedNorm2d(4)], ids=["bn-act", "detached"])
def test_layers_whose_eval_is_not_bn_are_left_alone(to, layer):
    """BatchNormAct2d is BN and an activation (with |γ| + ε as its scale when memory-efficient);
    DetachedNorm2d by default only subtracts the mean: no target may replace them by a plain
    batch norm. Freezing BatchNormAct2d keeps its activation (and the scale it applies)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), layer())
    kind = type(model[1])
    model(torch.randn(6, 3, 7, 7))
    model.eval()
    x = torch.randn(2, 3, 7, 7)
    before = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        converted = bnlab.convert(model, to=to)
    if to == "frozen" and kind is bnlab.BatchNormAct2d:
        assert type(converted[1]) is bnlab.FrozenBatchNorm and len(converted[1].tail_modules()) == 2
    else:
        assert type(converted[1]) is kind
    torch.testing.assert_close(converted(x), before)
