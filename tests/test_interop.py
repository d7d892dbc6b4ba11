"""bnlab in the model zoo and under PyTorch's graph tools.

Real timm and torchvision models (random weights): convert, fold and freeze touch only layers
whose forward they know (timm's BatchNormAct2d is BN, dropout and an activation) and never
change what a model computes. Under FX, jit.trace, torch.export and ONNX export bnlab's layers
are torch's batch-norm op, so the tools built around that op (feature extraction, FX
quantization, fuse_modules, ONNX's BatchNormalization) work unchanged.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import bnlab
from conftest import import_timm, import_torchvision

TIMM_MODELS = ["efficientnet_b0", "mobilenetv3_small_100", "regnetx_002", "densenet121", "resnet18"]


def _warm(model: nn.Module, shape=(4, 3, 32, 32)) -> nn.Module:
    """Running statistics away from their 0/1 start, γ and β away from 1/0: a fold or a freeze
    that ignores any of them shows."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
        model.train()
        for scale in (1.0, 2.0):
            model(torch.randn(*shape, generator=g) * scale + 0.5)
    return model


def _batchnorm_like(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _convert_quietly(model, to="bnlab"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # a known layout: no "left as it is"
        return bnlab.convert(model, to=to)


def _grads(model, x):
    x = x.clone().requires_grad_()
    torch.manual_seed(7)                                      # the same dropout masks for both
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out, x.grad, {n: p.grad for n, p in model.named_parameters()}


def _assert_same_training_step(original, converted, x):
    """One training forward/backward in float64, on a batch large enough that the deepest BN
    layers see 16 values per channel (with 3, rounding is amplified ~1e7 through the net):
    outputs, input and parameter gradients and the updated buffers agree to rounding."""
    original, converted, x = original.double(), converted.double(), x.double()
    out_a, dx_a, dp_a = _grads(original, x)
    out_b, dx_b, dp_b = _grads(converted, x)

    def close(b, a, what):      # relative to the tensor's scale: random deep nets reach |∇| ~ 1e4
        assert (b - a).abs().max() <= 1e-9 * (1 + a.abs().max()), what

    close(out_b, out_a, "output")
    close(dx_b, dx_a, "input gradient")
    assert dp_a.keys() == dp_b.keys()
    for name in dp_a:
        close(dp_b[name], dp_a[name], name)
    for (name, a), (_, b) in zip(original.named_buffers(), converted.named_buffers()):
        close(b.double(), a.double(), name)
    original.float(), converted.float()


# -- timm -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_convert_keeps_outputs_gradients_and_keys(name):
    timm = import_timm()
    original = _warm(timm.create_model(name, num_classes=7))
    converted = _convert_quietly(copy.deepcopy(original))
    assert original.state_dict().keys() == converted.state_dict().keys()
    kinds = {type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds <= {bnlab.BatchNorm2d, bnlab.BatchNormAct2d}, kinds       # every BN layer is bnlab's now
    _assert_same_training_step(original.train(), converted.train(), torch.randn(4, 3, 64, 64))
    original.eval(), converted.eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(converted(x), original(x), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_fold_and_freeze_keep_outputs(name):
    timm = import_timm()
    model = _warm(timm.create_model(name, num_classes=7)).eval()
    x = torch.randn(3, 3, 32, 32)
    expected = model(x)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert report.folded, "no BN folded at all"
    if name != "densenet121":                                 # densenet normalizes before its convs
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    torch.testing.assert_close(folded(x), expected, atol=2e-5, rtol=1e-4)
    frozen = _convert_quietly(copy.deepcopy(model), to="frozen")
    assert _batchnorm_like(frozen) == 0
    torch.testing.assert_close(frozen(x), expected, atol=2e-5, rtol=1e-4)
    # and the bnlab-converted model folds and freezes the same way
    converted = _convert_quietly(copy.deepcopy(model))
    torch.testing.assert_close(bnlab.fold(converted, x)(x), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_convert_quietly(converted, to="frozen")(x), expected, atol=2e-5, rtol=1e-4)


def test_timm_frozen_layers_fold():
    """timm's own frozen layers (FrozenBatchNorm2d from torchvision, FrozenBatchNormAct2d) are
    inference transforms: they fold, with the activation kept."""
    timm = import_timm()
    from timm.utils.model import freeze_batch_norm_2d
    model = freeze_batch_norm_2d(_warm(timm.create_model("efficientnet_b0", num_classes=7)).eval())
    assert _batchnorm_like(model) == 0
    x = torch.randn(3, 3, 32, 32)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert len(report.folded) > 40
    torch.testing.assert_close(folded(x), model(x), atol=2e-5, rtol=1e-4)


class _ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass whose forward is something else: no tool may treat it as BN."""

    def forward(self, x):
        return super().forward(x) * 2 + 1


def test_an_unknown_batchnorm_subclass_is_left_in_place_and_named():
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledBN(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    for to in ("bnlab", "frozen", "sync", "ghost"):
        with pytest.warns(UserWarning, match=r"left 1 layer\(s\).*1 \(_ScaledBN"):
            converted = bnlab.convert(copy.deepcopy(model), to=to)
        assert type(converted[1]) is _ScaledBN
        torch.testing.assert_close(converted(x), expected)
    folded, report = bnlab.fold(model, x, return_report=True)
    assert report.folded == [("2", "3")] and report.skipped == [("1", "_ScaledBN: its forward is not batch norm's")]
    torch.testing.assert_close(folded(x), expected, atol=1e-6, rtol=1e-5)


def test_norm_act_layers_keep_state_dict_keys_both_ways():
    """A converted timm model's checkpoint loads into a fresh timm model, and back."""
    timm = import_timm()
    original = _warm(timm.create_model("efficientnet_b0", num_classes=7)).eval()
    converted = _convert_quietly(copy.deepcopy(original))
    fresh = timm.create_model("efficientnet_b0", num_classes=7).eval()
    fresh.load_state_dict(converted.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh(x), original(x))


# -- torchvision ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_convert_fold_freeze(name):
    tv = import_torchvision()
    original = _warm(getattr(tv.models, name)(num_classes=7))
    converted = _convert_quietly(copy.deepcopy(original))
    _assert_same_training_step(original.train(), converted.train(), torch.randn(4, 3, 64, 64))
    original.eval(), converted.eval()
    x = torch.randn(3, 3, 32, 32)
    expected = original(x)
    torch.testing.assert_close(converted(x), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(bnlab.fold(converted, x)(x), expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(_convert_quietly(converted, to="frozen")(x), expected, atol=2e-5, rtol=1e-4)


def test_torchvision_feature_extractor_on_a_converted_model():
    """create_feature_extractor traces with FX: bnlab's layers record torch's batch_norm."""
    tv = import_torchvision()
    from torchvision.models.feature_extraction import create_feature_extractor
    original = _warm(tv.models.resnet18(num_classes=7)).eval()
    converted = _convert_quietly(copy.deepcopy(original))
    x = torch.randn(2, 3, 32, 32)
    ours = create_feature_extractor(converted, {"layer2": "f"})(x)["f"]
    theirs = create_feature_extractor(original, {"layer2": "f"})(x)["f"]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


# -- graph tools ------------------------------------------------------------------------------

BN = {1: (bnlab.BatchNorm1d, nn.BatchNorm1d, (6, 5, 7)), 2: (bnlab.BatchNorm2d, nn.BatchNorm2d, (6, 5, 4, 3)),
      3: (bnlab.BatchNorm3d, nn.BatchNorm3d, (6, 5, 3, 2, 4))}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("train", [True, False])
def test_fx_symbolic_trace_records_torch_batch_norm(dims, train):
    ours_cls, torch_cls, shape = BN[dims]
    ours = _warm(nn.Sequential(ours_cls(5)), shape).train(train)
    theirs = copy.deepcopy(ours)
    theirs[0] = bnlab.convert(theirs[0], to="torch")
    graph = torch.fx.symbolic_trace(ours)
    targets = [n.target for n in graph.graph.nodes if n.op == "call_function"]
    assert targets == [torch.nn.functional.batch_norm]
    assert ours[0].num_batches_tracked.item() == 2, "tracing ran a training step"
    x = torch.randn(*shape)
    for _ in range(2):                                         # two steps: the counter and the EMA
        torch.testing.assert_close(graph(x), theirs(x))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours[0], name), getattr(theirs[0], name), msg=name)


def test_fx_refuses_what_torch_batch_norm_cannot_record():
    layer = bnlab.BatchNorm2d(3, running_var_correction="biased")
    with pytest.raises(NotImplementedError, match="eval mode"):
        torch.fx.symbolic_trace(layer)
    torch.fx.symbolic_trace(layer.eval())                      # eval: no update, nothing lost


def test_fx_quantization_prepares_a_bnlab_model():
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                nn.Linear(4 * 30 * 30, 3))).eval()
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    prepared = prepare_fx(copy.deepcopy(model), get_default_qconfig_mapping("x86"), (x,))
    torch.testing.assert_close(prepared(x), expected)          # observers watch, they do not change
    quantized = convert_fx(prepared)
    assert (quantized(x) - expected).abs().max() < 0.1 * (1 + expected.abs().max())


def test_fuse_modules_fuses_bnlab_batch_norm():
    from torch.ao.quantization import fuse_modules, fuse_modules_qat
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    fused = fuse_modules(model, [["0", "1", "2"]])
    assert isinstance(fused[1], nn.Identity) and type(fused[0]).__name__ == "ConvReLU2d"
    torch.testing.assert_close(fused(x), model(x), atol=1e-6, rtol=1e-5)
    qat = fuse_modules_qat(model.train(), [["0", "1", "2"]])
    assert type(qat[0]).__name__ == "ConvBnReLU2d"


def test_jit_trace_and_export_record_the_batch_norm_op():
    model = _warm(nn.Sequential(nn.Conv2d(3, 4, 3), bnlab.BatchNorm2d(4), nn.ReLU())).eval()
    x = torch.randn(2, 3, 8, 8)
    traced = torch.jit.trace(model, x)
    kinds = {n.kind() for n in traced.inlined_graph.nodes()}
    assert "aten::batch_norm" in kinds and "aten::rsqrt" not in kinds
    for train in (False, True):
        exported = torch.export.export(model.train(train), (x,))
        ops = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
        assert any("batch_norm" in op for op in ops) and not any("rsqrt" in op for op in ops), ops


def test_onnx_export_has_the_same_graph_as_torch():
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    torch_model = _warm(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))).eval()
    ours = _convert_quietly(copy.deepcopy(torch_model))
    x = torch.randn(2, 3, 12, 12)
    graphs = {}
    for name, model in (("torch", torch_model), ("bnlab", ours)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proto = torch.onnx.export(model, (x,), dynamo=True, verbose=False).model_proto
        graphs[name] = [n.op_type for n in proto.graph.node]
        session = ort.InferenceSession(proto.SerializeToString())
        out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), torch_model(x), atol=1e-5, rtol=1e-4)
    assert graphs["bnlab"] == graphs["torch"]


# -- the whole path ---------------------------------------------------------------------------


def _pipeline(original: nn.Module, shape):
    """convert → train → fold → export → ONNX, the outputs checked against torch.nn at each stage."""
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    original = _warm(original, shape)
    converted = _convert_quietly(copy.deepcopy(original))
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(*shape, generator=g), torch.randint(0, 7, (shape[0],), generator=g)) for _ in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.01) for m in (original, converted)]
    for x, y in batches:                                       # train: the same steps on both
        losses = []
        for model, opt in zip((original, converted), opts):
            model.train()
            opt.zero_grad()
            torch.manual_seed(7)                              # the same dropout masks for both
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], atol=1e-4, rtol=1e-3)
    x = batches[0][0]
    original.eval(), converted.eval()
    with torch.no_grad():
        expected = converted(x)

    def close(out, reference, rel):
        assert (out - reference).abs().max() <= rel * reference.abs().max(), (out - reference).abs().max()

    # after three float32 steps the two models differ by accumulated rounding only
    close(expected, original(x).detach(), 5e-3)
    folded = bnlab.fold(converted, x)                          # each later stage: against the one before
    close(folded(x), expected, 1e-4)
    exported = torch.export.export(folded, (x,))
    close(exported.module()(x), expected, 1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(folded, (x,), dynamo=True, verbose=False).model_proto
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    session = ort.InferenceSession(proto.SerializeToString())
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    close(torch.from_numpy(out), expected, 1e-4)


@pytest.mark.slow
def test_timm_model_convert_train_fold_export_onnx():
    timm = import_timm()
    _pipeline(timm.create_model("efficientnet_b0", num_classes=7), (8, 3, 64, 64))


@pytest.mark.slow
def test_torchvision_model_convert_train_fold_export_onnx():
    tv = import_torchvision()
    _pipeline(tv.models.mobilenet_v3_small(num_classes=7), (8, 3, 64, 64))
