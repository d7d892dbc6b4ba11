"""Checkpoints: a torch checkpoint loads into bnlab and back, both give the same outputs;
versioning (old checkpoints without num_batches_tracked); pickling; repr."""

import io

import pytest
import torch
from torch import nn

import bnlab

PAIRS = [(nn.BatchNorm1d, bnlab.BatchNorm1d, (6, 4)), (nn.BatchNorm2d, bnlab.BatchNorm2d, (4, 4, 3, 3)),
         (nn.BatchNorm3d, bnlab.BatchNorm3d, (2, 4, 2, 3, 3))]


def _trained(cls, shape, **kw):
    m = cls(shape[1], **kw)
    with torch.no_grad():
        if m.weight is not None:
            m.weight.uniform_(0.5, 2)
        if m.bias is not None:
            m.bias.uniform_(-1, 1)
    for _ in range(3):
        m(torch.randn(*shape) * 3 + 1)
    return m


@pytest.mark.parametrize("torch_cls,bnlab_cls,shape", PAIRS)
@pytest.mark.parametrize("kw", [{}, {"affine": False}, {"track_running_stats": False}, {"bias": False}])
def test_round_trip_torch_bnlab_torch(torch_cls, bnlab_cls, shape, kw):
    ref = _trained(torch_cls, shape, **kw)
    sd = ref.state_dict()
    ours = bnlab_cls(shape[1], **kw)
    ours.load_state_dict(sd)                      # strict: same keys
    assert list(ours.state_dict().keys()) == list(sd.keys())
    back = torch_cls(shape[1], **kw)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(*shape)
    for mode in (True, False):
        for m in (ref, ours, back):
            m.train(mode)
        # one forward each: training forwards update the buffers the eval pass then uses
        y_ref = ref(x)
        torch.testing.assert_close(ours(x), y_ref)
        torch.testing.assert_close(back(x), y_ref)


def test_same_parameters_buffers_and_version():
    ref, ours = nn.BatchNorm2d(5), bnlab.BatchNorm2d(5)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in ref.named_buffers()]
    assert ours._version == ref._version == 2
    assert ours.state_dict()._metadata[""]["version"] == 2


def test_old_checkpoint_without_num_batches_tracked_loads():
    """Version-1 checkpoints (before num_batches_tracked) load, with the counter at 0."""
    ref = _trained(nn.BatchNorm1d, (6, 4))
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    ours = bnlab.BatchNorm1d(4)
    ours.load_state_dict(sd)
    assert ours.num_batches_tracked.item() == 0
    torch.testing.assert_close(ours.running_var, ref.running_var)


def test_whole_model_checkpoint_loads_across_implementations():
    torch_model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                                nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8))
    for _ in range(2):
        torch_model(torch.randn(5, 1, 8, 8))
    ours = bnlab.convert(nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
        nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8)), to="bnlab")
    ours.load_state_dict(torch_model.state_dict())
    torch_model.eval(), ours.eval()
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(ours(x), torch_model(x))


def test_pickle_and_torch_save_round_trip():
    m = _trained(bnlab.BatchNorm2d, (4, 3, 2, 2), running_var_correction="biased")
    m.freeze()
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m2 = torch.load(buf, weights_only=False)
    assert isinstance(m2, bnlab.BatchNorm2d) and m2.frozen and m2.running_var_correction == "biased"
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(m2(x), m(x))


def test_factory_kwargs_and_repr():
    m = bnlab.BatchNorm1d(3, device="cpu", dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in (m.weight, m.bias, m.running_mean, m.running_var))
    assert m.num_batches_tracked.dtype == torch.long
    assert repr(m) == repr(nn.BatchNorm1d(3)).replace("BatchNorm1d", "BatchNorm1d")
    assert "running_var_correction='biased'" in repr(bnlab.BatchNorm1d(3, running_var_correction="biased"))
    m.to(torch.float32)
    assert m.running_var.dtype == torch.float32


def test_is_a_torch_batchnorm_for_the_ecosystem():
    assert isinstance(bnlab.BatchNorm2d(3), nn.modules.batchnorm._BatchNorm)
    assert bnlab.is_batchnorm(nn.BatchNorm1d(2)) and bnlab.is_batchnorm(bnlab.BatchNorm3d(2))
    assert not bnlab.is_batchnorm(nn.LayerNorm(2))
