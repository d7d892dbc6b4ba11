"""The probes where people already log: a real Lightning Trainer, live TensorBoard event files,
a records stream, mixed precision's GradScaler, modules called twice, per-probe figures."""

import pytest
import torch
from torch import nn

import bnlab
from bnlab.probes import ActivationStats, GradientFlow, Landscape, Monitor
from conftest import import_lightning


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), bnlab.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


def _data(steps=6, n=16):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)) for _ in range(steps)]


def _manual(model, data, probes, every=2, **kwargs):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = nn.CrossEntropyLoss()
    monitor = Monitor(model, loss_fn, opt, probes=probes, every=every, **kwargs)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        monitor.observe(step, x, y)
        opt.step()
    monitor.close()
    return monitor


def _event_tags(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc.Tags()


def test_lightning_callback_records_what_a_plain_loop_records(tmp_path):
    pl = import_lightning()
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
    from bnlab.integrations.lightning import MonitorCallback
    data = _data()

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = _model()

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, i):
            x, y = batch
            return nn.functional.cross_entropy(self(x), y)

        def validation_step(self, batch, i):
            self(batch[0])                                 # forwards the probes must not see

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    callback = MonitorCallback([GradientFlow(), ActivationStats()], every=2, loss_fn=nn.CrossEntropyLoss())
    trainer = pl.Trainer(max_steps=len(data), accelerator="cpu", devices=1, callbacks=[callback],
                         logger=[TensorBoardLogger(tmp_path / "tb"), CSVLogger(tmp_path / "csv")],
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         val_check_interval=2, limit_val_batches=2, num_sanity_val_steps=1)
    def loader(batches):
        x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=len(batches[0][1]))

    trainer.fit(Module(), train_dataloaders=loader(data), val_dataloaders=loader(data[:2]))
    ours = {(r["step"], r["layer"].removeprefix("net."), r["metric"]): r["value"] for r in callback.monitor.records}
    reference = _manual(_model(), data, [GradientFlow(), ActivationStats()])
    expected = {(r["step"], r["layer"], r["metric"]): r["value"] for r in reference.records}
    assert ours.keys() == expected.keys()                  # steps 0, 2, 4; no validation rows
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    tags = _event_tags(next((tmp_path / "tb").rglob("events.out.tfevents.*")).parent)
    assert "bnlab/gradient_flow/grad_norm/net.0" in tags["scalars"]
    assert {"gradient_flow/grad/net.0", "activation_stats/preact/net.2"} <= set(tags["histograms"])
    assert "bnlab/activation_stats/p50/net.2" in (next((tmp_path / "csv").rglob("metrics.csv"))).read_text()


def test_tensorboard_output_is_live_and_records_stream(tmp_path):
    streamed = []
    model, data = _model(), _data(steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monitor = Monitor(model, nn.CrossEntropyLoss(), opt, probes=[GradientFlow(), ActivationStats()], every=1,
                      tensorboard=tmp_path, on_records=streamed.append)
    x, y = data[0]
    nn.functional.cross_entropy(model(x), y).backward()
    monitor.observe(0, x, y)
    tags = _event_tags(tmp_path)                           # before close: written as training runs
    assert "gradient_flow/grad_norm/0" in tags["scalars"] and "activation_stats/preact/2" in tags["histograms"]
    assert len(streamed) == 1 and streamed[0] == monitor.records
    monitor.close()


@pytest.mark.parametrize("unscale_first", [False, True])
def test_gradients_are_reported_unscaled_under_a_grad_scaler(unscale_first):
    data = _data(steps=3)
    plain = _manual(_model(), data, [GradientFlow()], every=1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    monitor = Monitor(model, nn.CrossEntropyLoss(), opt, probes=[GradientFlow()], every=1, scaler=scaler)
    for step, (x, y) in enumerate(data):
        opt.zero_grad()
        scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
        if unscale_first:
            scaler.unscale_(opt)
        monitor.observe(step, x, y)
        scaler.step(opt)
        scaler.update()
    got = {(r["step"], r["layer"], r["metric"]): r["value"] for r in monitor.records}
    for r in plain.records:
        assert got[(r["step"], r["layer"], r["metric"])] == pytest.approx(r["value"], rel=1e-6), r


class _Twice(nn.Module):
    """One ReLU module called twice per forward (as torchvision's BasicBlock does)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.relu, self.head = nn.Linear(6, 8), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.relu(self.b(self.relu(self.a(x)))))


def test_a_module_called_twice_is_named_per_call():
    torch.manual_seed(0)
    model, (x, y) = _Twice(), _data(steps=1)[0]
    monitor = Monitor(model, nn.CrossEntropyLoss(), probes=[ActivationStats()], every=1)
    nn.functional.cross_entropy(model(x), y).backward()
    rows = {(r["layer"], r["metric"]): r["value"] for r in monitor.observe(0, x, y)}
    with torch.no_grad():
        first, second = model.a(x), model.b(torch.relu(model.a(x)))
    assert rows[("relu", "mean")] == pytest.approx(first.mean().item(), rel=1e-6)
    assert rows[("relu#2", "mean")] == pytest.approx(second.mean().item(), rel=1e-6)


def test_each_figure_draws_its_own_probe(tmp_path):
    monitor = _manual(_model(), _data(), [GradientFlow(), Landscape()], every=2)
    assert any(r["layer"] == "*" and r["metric"] == "grad_norm" for r in monitor.records)   # Landscape's
    fig = monitor.plot("gradients", tmp_path / "g.png")
    labels = {line.get_label() for ax in fig.axes for line in ax.get_lines()}
    assert labels == {"0", "3"} and (tmp_path / "g.png").stat().st_size > 0
