"""Every experiment's tiny config runs in seconds and produces a well-formed result.json,
metrics.csv and figures; experiment-specific mechanisms are checked where they matter. Whole
experiments: make test-all (the fast tier runs E1's in the runner's tests)."""

import json

import pytest
import torch

from bnlab.lab.registry import all_experiments
from bnlab.lab.runner import run_experiment
from bnlab.lab.verdict import VERDICTS


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    results = {}
    for e in all_experiments():
        results[e.id] = run_experiment(e.id, profile="tiny", out=out, progress=False, log=lambda m: None)
    return out, results


@pytest.mark.slow
def test_every_experiment_writes_well_formed_results(tiny_runs):
    out, results = tiny_runs
    for eid, result in results.items():
        d = out / eid
        assert result["verdict"] in VERDICTS, eid
        assert result["claim"] and result["criterion"] and result["measured"], eid
        assert (d / "metrics.csv").read_text().startswith("step,seed,arm,metric,value\n"), eid
        assert json.loads((d / "result.json").read_text())["experiment"] == eid
        assert result["figures"], eid
        for fig in result["figures"]:
            assert (d / fig).read_bytes()[:4] == b"\x89PNG", (eid, fig)


@pytest.mark.slow
def test_e2_saves_checkpoints_that_recalibrate_accepts(tiny_runs, tmp_path):
    from bnlab.lab.models import load_checkpoint
    from bnlab.lab.recalibrate import recalibrate
    out, results = tiny_runs
    ckpt = out / "E2" / "model_b60_seed0.pt"
    model, info = load_checkpoint(ckpt)
    assert info["kind"] == "lab" and info["meta"]["train_batch"] == 60
    summary = recalibrate(str(ckpt), str(tmp_path / "new.pt"), num_batches=3, log=lambda m: None)
    new, _ = load_checkpoint(tmp_path / "new.pt")
    assert summary["layers"] == 3 and summary["test_acc_after"] is not None
    bn_old = [m for m in model.modules() if hasattr(m, "running_var")][0]
    bn_new = [m for m in new.modules() if hasattr(m, "running_var")][0]
    assert not torch.equal(bn_old.running_var, bn_new.running_var)


@pytest.mark.slow
def test_e2_batch_of_one_gives_beta_only_predictions(tiny_runs):
    out, results = tiny_runs
    acc1 = results["E2"]["numbers"]["accuracy"]["b60/batch1"]
    assert all(a < 0.2 for a in acc1)             # the input no longer matters: chance level


def test_recalibrate_cli_on_a_generic_module(tmp_path):
    from torch import nn

    from bnlab.cli import main
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 26 * 26, 10))
    torch.save(model, tmp_path / "m.pt")
    # a whole pickled module runs code when loaded: refused unless the user says it is trusted
    assert main(["recalibrate", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m2.pt"), "--num-batches", "2"]) == 2
    assert not (tmp_path / "m2.pt").exists()
    assert main(["recalibrate", str(tmp_path / "m.pt"), "--out", str(tmp_path / "m2.pt"), "--num-batches", "2",
                 "--trust-checkpoint"]) == 0
    m2 = torch.load(tmp_path / "m2.pt", weights_only=False)
    assert m2[1].running_mean.abs().sum() > 0
