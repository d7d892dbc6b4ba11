"""Real torch.distributed processes (gloo, CPU): SyncBatchNorm equals single-process BatchNorm on
the concatenated batch, uneven and empty per-rank batches, population statistics identical across
ranks, and a 2-process DDP run of a tiny E1 matching a 1-process run.

Rendezvous through a file store in a temporary directory (no ports to leak); mp.spawn terminates
every worker when one fails, and collectives time out after 30 s instead of hanging.
"""

import json
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import bnlab

pytestmark = [pytest.mark.distributed, pytest.mark.slow]     # real gloo processes: make test-all

sys.path.insert(0, __import__("os").path.dirname(__file__))
import dist_workers  # noqa: E402


def _spawn(fn, world, tmp_path):
    store = tmp_path / f"store-{fn.__name__}-{world}"
    store.mkdir()
    mp.spawn(fn, args=(world, str(store), str(tmp_path)), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_syncbn_equals_batchnorm_on_the_concatenated_batch(world, tmp_path):
    _spawn(dist_workers.syncbn_worker, world, tmp_path)
    per_rank = [torch.load(tmp_path / f"syncbn_{world}_{r}.pt") for r in range(world)]
    cases = dist_workers.CASES_2 if world == 2 else dist_workers.CASES_3
    for k, (sizes, shape) in enumerate(cases):
        x, dy, w, b = dist_workers.global_case(sizes, shape, seed=k)
        x = x.clone().requires_grad_()
        ref = bnlab.BatchNorm1d(shape[1], momentum=0.3).double() if len(shape) == 2 else \
            bnlab.BatchNorm2d(shape[1], momentum=0.3).double()
        with torch.no_grad():
            ref.weight.copy_(w)
            ref.bias.copy_(b)
        y = ref(x)
        y.backward(dy)
        tol = dict(atol=1e-10, rtol=1e-10)
        got_y = torch.cat([per_rank[r][k]["y"] for r in range(world)])
        got_dx = torch.cat([per_rank[r][k]["dx"] for r in range(world)])
        torch.testing.assert_close(got_y, y.detach(), **tol, msg=f"case {sizes} {shape}")
        torch.testing.assert_close(got_dx, x.grad, **tol)
        for r in range(world):
            res = per_rank[r][k]
            torch.testing.assert_close(res["dweight"], ref.weight.grad, **tol)
            torch.testing.assert_close(res["dbias"], ref.bias.grad, **tol)
            torch.testing.assert_close(res["running_mean"], ref.running_mean, **tol)
            torch.testing.assert_close(res["running_var"], ref.running_var, **tol)


def test_population_statistics_identical_across_ranks_and_equal_to_one_process(tmp_path):
    world = 2
    _spawn(dist_workers.population_worker, world, tmp_path)
    per_rank = [torch.load(tmp_path / f"pop_{world}_{r}.pt") for r in range(world)]
    all_batches = [b for r in range(world) for b in per_rank[r]["batches"]]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), bnlab.BatchNorm1d(4), torch.nn.Tanh(),
                                torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
    for upstream in ("batch", "population"):
        bnlab.population_statistics(model, all_batches, upstream=upstream, progress=False)
        expected = model.state_dict()
        for key in ("1.running_mean", "1.running_var", "4.running_mean", "4.running_var"):
            assert torch.equal(per_rank[0][upstream][key], per_rank[1][upstream][key]), (upstream, key)
            torch.testing.assert_close(per_rank[0][upstream][key], expected[key], atol=1e-10, rtol=1e-10)


def _run(args, timeout=180):
    proc = subprocess.run([sys.executable, "-m", "bnlab", *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_two_process_ddp_run_matches_one_process(tmp_path):
    """Same global batches (DistributedSampler shards), SyncBatchNorm (global statistics) and DDP's
    mean of per-rank mean losses: the same mathematics as one process, so the runs differ only by
    float32 summation order — a few ulps per step, which 60 steps cannot grow past 1e-3."""
    common = ["run", "E1", "--profile", "tiny", "--quiet", "--set", "seeds=1"]
    _run(common + ["--out", str(tmp_path / "one")])
    _run(common + ["--out", str(tmp_path / "two"), "--nproc", "2"])
    one = json.loads((tmp_path / "one" / "E1" / "result.json").read_text())
    two = json.loads((tmp_path / "two" / "E1" / "result.json").read_text())
    assert two["versions"]["processes"] == 2 and one["versions"]["processes"] == 1
    for arm in ("bn", "nobn"):
        for a, b in zip(one["numbers"]["acc_final"][arm], two["numbers"]["acc_final"][arm]):
            assert abs(a - b) <= 2e-3
    rows = lambda d: {(r.split(",")[0], r.split(",")[2], r.split(",")[3]): float(r.split(",")[4])
                      for r in (d / "E1" / "metrics.csv").read_text().splitlines()[1:]}
    r1, r2 = rows(tmp_path / "one"), rows(tmp_path / "two")
    assert r1.keys() == r2.keys()
    for k in r1:
        assert abs(r1[k] - r2[k]) <= 1e-3 + 1e-3 * abs(r1[k]), (k, r1[k], r2[k])
