"""EMA conventions and importers, against their closed forms."""

import pytest
import torch

import bnlab
from bnlab import ema


def test_effective_momentum_table():
    assert ema.effective_momentum("pytorch", 0.1, 7) == 0.1
    assert ema.effective_momentum("cumulative", 0.1, 4) == 0.25
    assert ema.effective_momentum("pytorch", None, 5) == 0.2
    assert ema.effective_momentum("debiased", 0.1, 1) == 1.0
    assert ema.effective_momentum("debiased", 0.1, 2) == pytest.approx(0.1 / (1 - 0.81))
    with pytest.raises(ValueError):
        ema.effective_momentum("keras", 0.1, 1)


def test_debiased_ema_equals_haikus_hidden_over_one_minus_d_to_the_t():
    """Haiku: hidden_t = d·hidden + (1 − d)·x_t from 0, average = hidden / (1 − d^t)."""
    d = 0.9
    bn = bnlab.BatchNorm1d(2, momentum=1 - d, ema="debiased").double()
    hidden = torch.zeros(2, dtype=torch.float64)
    hidden_var = torch.zeros(2, dtype=torch.float64)
    for t in range(1, 8):
        x = torch.randn(6, 2, dtype=torch.float64) * t + t
        bn(x)
        hidden = d * hidden + (1 - d) * x.mean(0)
        hidden_var = d * hidden_var + (1 - d) * x.var(0, unbiased=True)
        torch.testing.assert_close(bn.running_mean, hidden / (1 - d ** t), atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(bn.running_var, hidden_var / (1 - d ** t), atol=1e-12, rtol=1e-12)


def test_keras_importer_converts_decay_and_bias():
    mean, var = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.6])
    s = ema.from_framework(mean, var, "keras", values_per_batch=4)
    assert s.momentum == pytest.approx(0.01) and s.ema == "pytorch"
    torch.testing.assert_close(s.running_var, var * 4 / 3)
    with pytest.raises(ValueError, match="values_per_batch"):
        ema.from_framework(mean, var, "flax")
    kept = ema.from_framework(mean, var, "flax", keep_biased=True, decay=0.9)
    torch.testing.assert_close(kept.running_var, var) and kept.momentum == pytest.approx(0.1)


def test_haiku_import_into_a_layer_continues_the_debiased_ema():
    s = ema.from_framework(torch.zeros(3), torch.ones(3), "haiku", values_per_batch=11, steps=5)
    bn = ema.load_statistics(bnlab.BatchNorm1d(3), s, eps=1e-3, gamma=torch.full((3,), 2.0))
    assert bn.ema == "debiased" and bn.momentum == pytest.approx(0.001)
    assert bn.num_batches_tracked.item() == 5 and bn.eps == 1e-3 and torch.all(bn.weight == 2)
    torch.testing.assert_close(bn.running_var, torch.full((3,), 1.1))


def test_keras_layer_import_gives_keras_inference():
    """A Keras layer's inference y = γ(x − m)/√(v + ε) + β is reproduced (variance made unbiased
    for bnlab, then evaluated with the factor undone by the caller keeping it biased)."""
    gamma, beta = torch.tensor([1.5, 0.5]), torch.tensor([0.1, -0.2])
    m, v = torch.tensor([0.3, -1.0]), torch.tensor([2.0, 0.5])
    bn = ema.load_statistics(bnlab.BatchNorm1d(2, running_var_correction="biased"),
                             ema.from_framework(m, v, "keras", keep_biased=True), eps=1e-3,
                             gamma=gamma, beta=beta).eval()
    x = torch.randn(5, 2)
    torch.testing.assert_close(bn(x), gamma * (x - m) / torch.sqrt(v + 1e-3) + beta)
