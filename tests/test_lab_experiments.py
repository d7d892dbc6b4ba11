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
    numbers = results["E2"]["numbers"]
    for arm in ("acc_b60", "acc_b4"):
        assert all(a < 0.2 for a in numbers[arm]["batch1"])     # the input no longer matters: chance level
    check = {c["name"]: c for c in results["E2"]["checks"]}["batch_of_one_is_input_blind"]
    assert check["passed"]


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


@pytest.mark.slow
def test_e1_saves_models_that_recalibrate_accepts(tiny_runs, tmp_path):
    from bnlab.lab.recalibrate import recalibrate
    out, _ = tiny_runs
    summary = recalibrate(str(out / "E1" / "model_bn_seed0.pt"), str(tmp_path / "new.pt"), num_batches=3,
                          log=lambda m: None)
    assert summary["layers"] >= 2 and summary["test_acc_after"] is not None


_USER_CODE = '''
import torch
from torch import nn

def build():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))

def _data(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(96, 3, 8, 8, generator=g) * 2 + 1
    return torch.utils.data.TensorDataset(x, torch.randint(0, 5, (96,), generator=g))

def train_loader():
    return torch.utils.data.DataLoader(_data(0), batch_size=32)

def eval_loader():
    return torch.utils.data.DataLoader(_data(1), batch_size=48)
'''


def test_recalibrate_any_state_dict_with_model_and_loader_functions(tmp_path, capsys):
    import importlib.util

    from bnlab.cli import main
    (tmp_path / "user_code.py").write_text(_USER_CODE)
    spec = importlib.util.spec_from_file_location("user_code_here", tmp_path / "user_code.py")
    user = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user)
    torch.manual_seed(0)
    model = user.build()
    torch.save({"state_dict": model.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    code = f"{tmp_path / 'user_code.py'}"
    assert main(["recalibrate", str(tmp_path / "ckpt.pt"), "--out", str(tmp_path / "new.pt"),
                 "--model", f"{code}:build", "--loader", f"{code}:train_loader",
                 "--eval-loader", f"{code}:eval_loader"]) == 0
    log = capsys.readouterr().out
    assert "over 96 training examples" in log and "test accuracy" in log
    new = user.build()
    new.load_state_dict(torch.load(tmp_path / "new.pt", weights_only=True))
    # the first BN's population statistics are those of the conv's output over all 96 images
    with torch.no_grad():
        z = model[0](torch.cat([x for x, _ in user.train_loader()]))
    torch.testing.assert_close(new[1].running_mean, z.mean((0, 2, 3)), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(new[1].running_var, z.var((0, 2, 3), unbiased=True), atol=1e-5, rtol=1e-5)


def test_recalibrate_explains_what_it_cannot_load(tmp_path, capsys):
    from bnlab.cli import main
    torch.save(dict(trainer={}, step=3, rows=[], done=False), tmp_path / "unit.pt")
    assert main(["recalibrate", str(tmp_path / "unit.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "resume state" in capsys.readouterr().err
    for bad in ("nocolon", "no_such_module_xyz:f", f"{tmp_path / 'missing.py'}:f"):
        assert main(["recalibrate", str(tmp_path / "unit.pt"), "--out", str(tmp_path / "o.pt"), "--model", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bnlab: error: --model") and err.count("\n") == 1, err
