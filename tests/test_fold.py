"""fold: the folded eval output equals the unfolded one (float64 to 1e-12, float32 to 1e-5
relative) for MLPs and CNNs, including ConvTranspose, groups, affine=False and bias-free
layers; training-mode refusal; what cannot be folded stays."""

import pytest
import torch
from torch import nn

import bnlab
from bnlab.fold import fold_weights


def _warm(model, shape, steps=4):
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if bnlab.is_batchnorm(m) and m.affine:
                m.weight.uniform_(0.5, 2.0)
                if m.bias is not None:
                    m.bias.uniform_(-1, 1)
        for _ in range(steps):
            model(torch.randn(*shape, dtype=next(model.parameters()).dtype) * 2 + 0.5)
    return model.eval()


def _models():
    return {
        "mlp": (nn.Sequential(nn.Linear(8, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 5, bias=False),
                              bnlab.BatchNorm1d(5, affine=False), nn.Sigmoid(), nn.Linear(5, 3)), (16, 8)),
        "cnn": (nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), bnlab.BatchNorm2d(6), nn.ReLU(),
                              nn.Conv2d(6, 6, 3, groups=3), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
                              nn.ConvTranspose2d(6, 4, 2, stride=2), bnlab.BatchNorm2d(4),
                              nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d(6)), (4, 3, 7, 7)),
        "conv1d3d": (nn.Sequential(nn.Conv1d(2, 4, 3), bnlab.BatchNorm1d(4), nn.ConvTranspose1d(4, 2, 2),
                                   nn.BatchNorm1d(2)), (5, 2, 9)),
        "conv3d": (nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.ConvTranspose3d(3, 2, 2, bias=False),
                                 bnlab.BatchNorm3d(2, affine=False)), (3, 2, 4, 4, 4)),
    }


@pytest.mark.parametrize("name", ["mlp", "cnn", "conv1d3d", "conv3d"])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_folded_equals_unfolded(name, dtype, rtol):
    model, shape = _models()[name]
    model = _warm(model.to(dtype), shape)
    x = torch.randn(*shape, dtype=dtype)
    folded, report = bnlab.fold(model, x, return_report=True)
    n_bn = sum(bnlab.is_batchnorm(m) for m in model.modules())
    assert len(report.folded) == n_bn and not any(bnlab.is_batchnorm(m) for m in folded.modules())
    with torch.no_grad():
        y, y_folded = model(x), folded(x)
    scale = y.abs().max().item()
    assert (y - y_folded).abs().max().item() <= rtol * max(scale, 1.0)
    assert report.max_abs_diff == pytest.approx((y - y_folded).abs().max().item(), abs=1e-12)
    assert folded.fold_report is report
    for p in folded.parameters():
        assert p.dtype == dtype


def test_original_model_is_untouched():
    model, shape = _models()["cnn"]
    model = _warm(model, shape)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bnlab.fold(model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_refuses_training_mode_and_folded_model_refuses_training():
    model, shape = _models()["mlp"]
    with pytest.raises(bnlab.ModeError, match="eval"):
        bnlab.fold(model.train())
    folded = bnlab.fold(_warm(model, shape))
    folded.train()
    with pytest.raises(bnlab.ModeError, match="inference only"):
        folded(torch.randn(*shape))


def test_custom_forward_uses_the_graph_and_keeps_what_cannot_fold():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.side = nn.Conv2d(2, 4, 3)
            self.bn_side = nn.BatchNorm2d(4)          # conv output also used elsewhere: keep
            self.bn_free = bnlab.BatchNorm2d(4)       # follows an addition: keep
            self.bn_batch = nn.BatchNorm2d(4, track_running_stats=False)
            self.last = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            s = self.side(x)
            h = self.bn(self.conv(x)) + self.bn_side(s) + s
            return self.bn_batch(self.last(self.bn_free(h)))

    model = _warm(Net().double(), (4, 2, 6, 6))
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert report.method == "fx" and report.folded == [("conv", "bn")]
    kept = dict(report.skipped)
    assert set(kept) == {"bn_side", "bn_free", "bn_batch"}
    assert "running statistics" in kept["bn_batch"]
    assert report.max_abs_diff < 1e-12


def test_untraceable_model_falls_back_to_sequential_neighbours():
    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 3), bnlab.BatchNorm1d(3))

        def forward(self, x):
            if x.sum() > 0:                          # data-dependent: fx cannot trace it
                return self.body(x)
            return self.body(-x)

    model = _warm(Dynamic().double(), (8, 4))
    x = torch.randn(8, 4, dtype=torch.float64)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert report.method == "sequential" and report.folded == [("body.0", "body.1")]
    assert report.max_abs_diff < 1e-12


def test_fold_weights_closed_form():
    W = torch.tensor([[2.0, 0.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([1.0, 3.0], dtype=torch.float64)
    mean, var = torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([4.0, 0.25], dtype=torch.float64)
    gamma, beta = torch.tensor([2.0, 1.0], dtype=torch.float64), torch.tensor([0.0, 10.0], dtype=torch.float64)
    Wf, bf = fold_weights(W, b, mean, var, 0.0, gamma, beta)
    s = torch.tensor([2.0 / 2.0, 1.0 / 0.5], dtype=torch.float64)
    torch.testing.assert_close(Wf, W * s[:, None])
    torch.testing.assert_close(bf, (b - mean) * s + beta)


def test_a_layer_whose_eval_is_not_bn_is_not_folded():
    """DetachedNorm2d (center only) only subtracts the mean: folding it as a plain BN would
    change the output, so it stays (and the folded model still equals the original)."""
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.DetachedNorm2d(4)), (8, 3, 7, 7))
    x = torch.randn(5, 3, 7, 7)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert report.folded == [] and [bn for bn, _ in report.skipped] == ["1"]
    torch.testing.assert_close(folded(x), model(x))


@pytest.mark.parametrize("layer,tail", [
    (lambda: bnlab.BatchNormAct2d(4, activation="relu"), [nn.ReLU]),
    (lambda: bnlab.BatchNormAct2d(4, activation="leaky_relu", negative_slope=0.2), [nn.LeakyReLU]),
    (lambda: bnlab.BatchNormAct2d(4, activation="identity"), []),
    (lambda: bnlab.BatchNormAct2d(4, activation=nn.SiLU(), drop=nn.Dropout(0.3)), [nn.Dropout, nn.SiLU])],
    ids=["relu", "leaky", "identity", "module-silu"])
def test_norm_act_layers_fold_and_keep_their_activation(layer, tail):
    """BatchNormAct2d is BN *and* an activation (and, memory-efficient with an invertible
    activation, |γ| + ε as its scale): the BN folds into the conv with the scale it applies, and
    the activation stays where the layer was."""
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), layer()), (8, 3, 7, 7))
    with torch.no_grad():
        model[1].weight[0] = -0.7                                # |γ| + ε differs from γ here
    x = torch.randn(5, 3, 7, 7)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert report.folded == [("0", "1")]
    kept = list(folded[1]) if isinstance(folded[1], nn.Sequential) else []
    assert [type(m) for m in kept] == tail
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_fold_raises_rather_than_return_a_changed_model(monkeypatch):
    """The example input is the last line of defence: a fold that changed the output is refused."""
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4)), (8, 3, 7, 7))
    real = bnlab.fold.__globals__["fold_weights"]
    monkeypatch.setitem(bnlab.fold.__globals__, "fold_weights",
                        lambda *a, **k: tuple(t * 1.5 for t in real(*a, **k)))
    with pytest.raises(bnlab.fold.__globals__["FoldError"], match="changed the model's output"):
        bnlab.fold(model, torch.randn(5, 3, 7, 7))


def test_bnlab_layers_are_torch_batchnorm_instances_and_the_fused_layer_is_not():
    """Drop-ins pass the isinstance checks model code makes (init loops, fusers); a layer that
    is BN plus something else must not."""
    for layer, torch_cls in ((bnlab.BatchNorm1d(3), nn.BatchNorm1d), (bnlab.BatchNorm2d(3), nn.BatchNorm2d),
                             (bnlab.BatchNorm3d(3), nn.BatchNorm3d)):
        assert isinstance(layer, torch_cls)
    for other in (bnlab.BatchNormAct2d(3), bnlab.DetachedNorm2d(3)):
        assert bnlab.is_batchnorm(other) and not isinstance(other, nn.BatchNorm2d)
    conv, bn = nn.Conv2d(2, 3, 1).eval(), _warm(nn.Sequential(bnlab.BatchNorm2d(3)), (6, 3, 4, 4))[0]
    fused_conv = torch.nn.utils.fusion.fuse_conv_bn_eval(conv, bn)     # torch's own fuser accepts it
    x = torch.randn(2, 2, 4, 4)
    torch.testing.assert_close(fused_conv(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
