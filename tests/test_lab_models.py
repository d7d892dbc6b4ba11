"""The lab's seed-batched models: seeds are independent, one seed extracts to an ordinary model
with the same outputs, and the explicit no-autograd step equals autograd + torch.optim."""

import copy

import pytest
import torch

import bnlab
from bnlab.lab import trainers
from bnlab.lab.data import Dataset
from bnlab.lab.trainers import FastMLPTrainer, supports
from bnlab.lab.models import build_mlp, to_plain
from bnlab.lab.trainers import ClassifierTrainer, make_trainer


def _toy_data(n=300, d=20, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g)
    y = (x[:, :k].argmax(1))
    return Dataset("toy", x, y, x[:100], y[:100], "memory")


SPECS = [dict(widths=[20, 16, 12, 4], activation=a, norm=n, init="normal", init_std=0.3)
         for a in ("sigmoid", "tanh", "relu") for n in ("bn", "none")]
VARIANT_SPECS = [dict(widths=[20, 16, 12, 4], activation="tanh", norm=n, init="normal", init_std=0.3,
                      norm_kwargs=kw)
                 for n, kw in (("ghost", {"virtual_batch_size": 4}), ("renorm", {"warmup": False}),
                               ("zca", {"group_size": 4}), ("pca", {"group_size": 4}),
                               ("iternorm", {"group_size": 4}), ("lp1", {}), ("noisy_bn", {}),
                               ("detached_meanstd", {}))]


@pytest.mark.parametrize("spec", SPECS + [s for s in VARIANT_SPECS if s["norm"] != "noisy_bn"])
def test_seeds_are_independent(spec):
    """Training seeds together equals training each alone (gradients never mix)."""
    data = _toy_data()
    together = ClassifierTrainer(build_mlp(spec, 3), data, [0, 1, 2], "a", 10, 0.2)
    alone = ClassifierTrainer(build_mlp(spec, 3), data, [0, 1, 2], "a", 10, 0.2)
    for s in range(5):
        together.train_step(s)
    # perturb seed 0's data order only: seeds 1 and 2 must not notice
    alone.sampler.perms[0] = alone.sampler.perms[0].flip(0)
    for s in range(5):
        alone.train_step(s)
    for (n, a), (_, b) in zip(together.model.state_dict().items(), alone.model.state_dict().items()):
        if a.dim() >= 2 and a.shape[0] == 3:
            assert torch.equal(a[1:], b[1:]), n
            assert not torch.equal(a[0], b[0]), n


@pytest.mark.parametrize("spec", SPECS + VARIANT_SPECS)
def test_one_seed_extracts_to_an_equivalent_plain_model(spec):
    data = _toy_data()
    trainer = ClassifierTrainer(build_mlp(spec, 3), data, [0, 1, 2], "a", 10, 0.2)
    for s in range(6):
        trainer.train_step(s)
    model = trainer.model
    for mode in ("train", "eval"):
        if mode == "train" and spec["norm"] == "noisy_bn":
            continue                      # one shared noise stream: seeds draw different noise
        model.train(mode == "train")
        x = data.test_x[:32]
        # extract first: a training forward moves running averages (Batch Renorm's output uses them)
        plains = [to_plain(model, seed).train(mode == "train") for seed in range(3)]
        out = model(x)
        for seed, plain in enumerate(plains):
            torch.testing.assert_close(plain(x), out[seed], atol=1e-4, rtol=1e-4)
    if spec["norm"] == "bn":
        assert any(isinstance(m, bnlab.BatchNorm1d) for m in to_plain(model, 0).modules())


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("spec", SPECS)
def test_explicit_step_equals_autograd(spec, backend, monkeypatch):
    monkeypatch.setattr(trainers, "MATMUL_BACKEND", backend)
    data = _toy_data()
    m1 = build_mlp(spec, 2)
    m2 = copy.deepcopy(m1)
    auto = ClassifierTrainer(m1, data, [0, 1], "a", 12, 0.3)
    fast = FastMLPTrainer(m2, data, [0, 1], "a", 12, 0.3)
    for s in range(15):
        auto.train_step(s)
        fast.train_step(s)
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        if a.dtype.is_floating_point:
            torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5, msg=n)
        else:
            assert torch.equal(a, b), n
    torch.testing.assert_close(auto.loss_sum, fast.loss_sum, atol=1e-5, rtol=1e-5)


def test_dispatch_uses_the_explicit_step_only_when_exact():
    data = _toy_data()
    spec = SPECS[0]
    assert type(make_trainer(build_mlp(spec, 1), data, [0], "a", 10, 0.1)) is FastMLPTrainer
    assert type(make_trainer(build_mlp(spec, 1), data, [0], "a", 10, 0.1, momentum=0.9)) is ClassifierTrainer
    assert type(make_trainer(build_mlp(spec, 1), data, [0], "a", 10, 0.1, fast=False)) is ClassifierTrainer
    residual = dict(spec, widths=[20, 16, 16, 4], residual_from=1)
    assert not supports(build_mlp(residual, 1), "sgd", 0, 0)
