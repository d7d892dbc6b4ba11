"""population_statistics: exact Algorithm 2 statistics, re-split invariance, restoration on
error, torch.nn and bnlab layers, both upstream modes, and the train/eval gap diagnostic."""


import pytest
import torch
from torch import nn

import bnlab
from bnlab.population import PopulationMoments as Moments


def _mlp(bn_cls=bnlab.BatchNorm1d, mixed=False):
    second = nn.BatchNorm1d if mixed else bn_cls
    return nn.Sequential(nn.Linear(6, 5), bn_cls(5), nn.Tanh(), nn.Linear(5, 4), second(4), nn.ReLU(),
                         nn.Linear(4, 3)).double()


def _data(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g, dtype=torch.float64) * 3 + 1


def _split(x, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(x[start:start + s])
        start += s
    assert start == len(x)
    return out


SPLITS = [[37], [10, 10, 10, 7], [3, 5, 2, 9, 11, 7], [2] * 17 + [3]]


@pytest.mark.parametrize("sizes", SPLITS)
def test_first_layer_is_split_invariant_and_equals_direct_float64(sizes):
    x = _data()
    model = _mlp()
    stats = bnlab.population_statistics(model, _split(x, sizes), progress=False)
    first_input = model[0](x)
    torch.testing.assert_close(model[1].running_mean, first_input.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(model[1].running_var, first_input.var(0, unbiased=True), atol=1e-12, rtol=1e-12)
    assert stats["1"].count == 37 and stats["1"].batches == len(sizes)


@pytest.mark.parametrize("sizes", SPLITS)
def test_population_upstream_is_split_invariant_for_every_layer(sizes):
    x = _data()
    model = _mlp()
    stats = bnlab.population_statistics(model, _split(x, sizes), upstream="population", progress=False)
    assert [s.depth for s in stats.values()] == [0, 1]
    # the exact statistics of the inference network, computed directly layer by layer
    model.eval()
    h1 = model[0](x)
    h2 = model[3](model[2](model[1](h1)))
    torch.testing.assert_close(model[1].running_var, h1.var(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(model[4].running_mean, h2.mean(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(model[4].running_var, h2.var(0), atol=1e-12, rtol=1e-12)


def test_batch_upstream_deeper_layers_depend_on_the_split_as_documented():
    x = _data()
    a, b = _mlp(), _mlp()
    b.load_state_dict(a.state_dict())
    bnlab.population_statistics(a, _split(x, [37]), progress=False)
    bnlab.population_statistics(b, _split(x, [2] * 17 + [3]), progress=False)
    assert not torch.allclose(a[4].running_var, b[4].running_var)


def test_algorithm2_by_hand_with_the_m_over_m_minus_1_factor():
    """Two batches of m = 4: E[x] = mean of batch means, Var = 4/3 · mean of batch variances."""
    b1 = torch.tensor([[1.0], [2.0], [4.0], [5.0]], dtype=torch.float64)
    b2 = torch.tensor([[10.0], [10.0], [12.0], [8.0]], dtype=torch.float64)
    bn = bnlab.BatchNorm1d(1).double()
    bnlab.population_statistics(bn, [b1, b2], estimator="algorithm2", progress=False)
    # batch means 3 and 10; biased batch variances 2.5 and 2.0
    assert bn.running_mean.item() == pytest.approx(6.5, abs=1e-14)
    assert bn.running_var.item() == pytest.approx(4 / 3 * (2.5 + 2.0) / 2, abs=1e-14)
    bnlab.population_statistics(bn, [b1, b2], estimator="algorithm2", correction="biased", progress=False)
    assert bn.running_var.item() == pytest.approx(2.25, abs=1e-14)
    # the pooled estimate also counts the spread of the batch means
    bnlab.population_statistics(bn, [b1, b2], progress=False)
    allx = torch.cat([b1, b2])
    assert bn.running_var.item() == pytest.approx(allx.var().item(), abs=1e-12)


def test_chan_merge_matches_direct_moments():
    x = torch.randn(50, 3, 4, dtype=torch.float64)
    parts = [x[:7], x[7:8], x[8:31], x[31:]]
    merged = Moments.empty(3)
    for p in parts:
        merged = merged.merge(Moments.of_batch(p))
    direct = Moments.of_batch(x)
    assert merged.count == direct.count == 200
    torch.testing.assert_close(merged.mean, direct.mean, atol=1e-13, rtol=0)
    torch.testing.assert_close(merged.m2, direct.m2, atol=1e-11, rtol=1e-13)


def test_conv_counts_values_per_channel_and_mixed_layers():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(),
                          nn.Conv2d(3, 2, 1), bnlab.BatchNorm2d(2)).double()
    batches = [torch.randn(n, 2, 5, 5, dtype=torch.float64) for n in (3, 4, 1)]
    stats = bnlab.population_statistics(model, batches, progress=False, upstream="population")
    assert stats["1"].count == 8 * 3 * 3          # N·H·W over all batches
    h = model[0](torch.cat(batches))
    torch.testing.assert_close(model[1].running_var, h.var((0, 2, 3)), atol=1e-12, rtol=1e-12)


def _snapshot(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            [m.training for m in model.modules()],
            [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
            [getattr(m, "momentum", None) for m in model.modules()])


def _assert_same(model, snap):
    state, flags, hooks, momenta = snap
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert [m.training for m in model.modules()] == flags
    assert [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()] == hooks
    assert [getattr(m, "momentum", None) for m in model.modules()] == momenta


@pytest.mark.parametrize("upstream", ["batch", "population"])
def test_failing_forward_leaves_the_model_exactly_as_it_was(upstream):
    model = _mlp(mixed=True)
    model.eval()
    model[1].train()
    snap = _snapshot(model)

    def batches():
        yield _data(8)
        yield _data(8, seed=1)
        yield torch.randn(8, 7, dtype=torch.float64)            # wrong width: Linear raises

    with pytest.raises(RuntimeError):
        bnlab.population_statistics(model, list(batches()), progress=False, upstream=upstream)
    _assert_same(model, snap)


def test_training_rng_stream_is_not_advanced():
    model = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), bnlab.BatchNorm1d(5), nn.Linear(5, 2)).double()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    bnlab.population_statistics(model, [_data(10), _data(10, 1)], progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_forward_callable_and_dict_batches():
    model = _mlp()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = model

        def forward(self, features, scale=1.0):
            return self.net(features * scale)

    batches = [{"features": _data(10), "scale": 2.0}]
    bnlab.population_statistics(Wrapped(), batches, progress=False)
    torch.testing.assert_close(model[1].running_mean, model[0](_data(10) * 2).mean(0))
    custom = [("meta", _data(10))]
    bnlab.population_statistics(model, custom, forward=lambda m, b: m(b[1]), progress=False)
    torch.testing.assert_close(model[1].running_mean, model[0](_data(10)).mean(0))


def test_empty_loader_is_a_clear_error_and_changes_nothing():
    model = _mlp()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="no batches"):
        bnlab.population_statistics(model, [], progress=False)
    _assert_same(model, snap)


def test_batches_of_one_are_skipped_in_batch_mode_and_used_in_population_mode():
    x = _data(12)
    model = _mlp()
    with pytest.warns(UserWarning, match="skipped 2"):
        bnlab.population_statistics(model, [x[:1], x[1:11], x[11:]], progress=False)
    torch.testing.assert_close(model[1].running_mean, model[0](x[1:11]).mean(0))
    with pytest.raises(bnlab.BnlabError, match="single value"):
        bnlab.population_statistics(model, [x[:1], x[1:2]], progress=False)
    bnlab.population_statistics(model, [x[i:i + 1] for i in range(12)], upstream="population", progress=False)
    torch.testing.assert_close(model[1].running_mean, model[0](x).mean(0))


def test_model_without_bn_is_a_documented_no_op():
    with pytest.warns(UserWarning, match="no batch-norm"):
        assert bnlab.population_statistics(nn.Linear(3, 2), [torch.randn(4, 3)], progress=False) == {}


def test_one_shot_iterator_works_in_population_mode():
    x = _data(20)
    model = _mlp()
    bnlab.population_statistics(model, iter([x[:10], x[10:]]), upstream="population", progress=False)
    model.eval()
    h2 = model[3](model[2](model[1](model[0](x))))
    torch.testing.assert_close(model[4].running_var, h2.var(0), atol=1e-12, rtol=1e-12)


def test_branching_model_gets_depths_from_the_graph():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.bn_a = nn.Linear(6, 4), bnlab.BatchNorm1d(4)
            self.b, self.bn_b = nn.Linear(6, 4), nn.BatchNorm1d(4)       # parallel: depth 0
            self.c, self.bn_c = nn.Linear(4, 4), bnlab.BatchNorm1d(4)    # after both: depth 1

        def forward(self, x):
            return self.bn_c(self.c(self.bn_a(self.a(x)) + self.bn_b(self.b(x))))

    model = Branchy().double()
    stats = bnlab.population_statistics(model, [_data(9), _data(9, 2)], upstream="population", progress=False)
    assert {n: s.depth for n, s in stats.items()} == {"bn_a": 0, "bn_b": 0, "bn_c": 1}
    x = torch.cat([_data(9), _data(9, 2)])
    model.eval()
    h = model.c(model.bn_a(model.a(x)) + model.bn_b(model.b(x)))
    torch.testing.assert_close(model.bn_c.running_var, h.var(0), atol=1e-12, rtol=1e-12)


def test_frozen_and_untracked_layers_are_left_alone():
    model = nn.Sequential(nn.Linear(6, 5), bnlab.BatchNorm1d(5), nn.Linear(5, 4),
                          nn.BatchNorm1d(4, track_running_stats=False)).double()
    model[1].freeze()
    before = model[1].running_mean.clone()
    with pytest.warns(UserWarning, match="nothing to do"):        # said, not silently skipped
        assert bnlab.population_statistics(model, [_data(8)], progress=False) == {}
    assert torch.equal(model[1].running_mean, before)


def test_float32_model_gets_float64_accumulation():
    model = _mlp().float()
    x = (_data(64) + 1e3).float()
    bnlab.population_statistics(model, list(x.split(8)), progress=False)
    torch.testing.assert_close(model[1].running_var.double(), model[0](x).double().var(0), rtol=1e-4, atol=1e-4)


def test_train_eval_gap_reports_a_stale_ema():
    model = _mlp()
    x = _data(64)
    gap = bnlab.train_eval_gap(model, list(x.split(8)))      # fresh EMA: mean 0, var 1
    row = gap.rows[0]
    assert row["running_mean_shift"] > row["batch_mean_shift"]
    bnlab.population_statistics(model, list(x.split(8)), progress=False)
    gap2 = bnlab.train_eval_gap(model, list(x.split(8)))
    assert gap2.rows[0]["running_mean_shift"] < 1e-10 and gap2.rows[0]["running_var_log_ratio"] < 1e-10
    assert "layer" in str(gap2)
