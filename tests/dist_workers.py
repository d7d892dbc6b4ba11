"""Worker functions for tests/test_distributed.py (module level: torch.multiprocessing pickles them)."""

import datetime
import os

import torch
import torch.distributed as dist

import bnlab

CASES_2 = [([4, 4], (2, 3)), ([3, 5], (2, 3)), ([0, 6], (2, 3)), ([3, 5], (4, 3, 2, 2)), ([0, 5], (4, 3, 2, 2))]
CASES_3 = [([3, 5, 2], (2, 3)), ([2, 0, 4], (2, 3)), ([1, 2, 3], (4, 3, 2, 2)), ([4, 4, 4], (4, 3, 2, 2))]


def init(rank: int, world: int, store_dir: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))


def global_case(sizes, shape, seed):
    """The concatenated batch, its upstream gradient, and this test's γ, β (same on every rank)."""
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    C = shape[1]
    rest = shape[2:]
    x = torch.randn(n, C, *rest, generator=g, dtype=torch.float64) * 2 + 1
    dy = torch.randn(n, C, *rest, generator=g, dtype=torch.float64)
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.5
    b = torch.randn(C, generator=g, dtype=torch.float64)
    return x, dy, w, b


def syncbn_worker(rank: int, world: int, store_dir: str, out_dir: str) -> None:
    init(rank, world, store_dir)
    try:
        cases = CASES_2 if world == 2 else CASES_3
        results = []
        for k, (sizes, shape) in enumerate(cases):
            x, dy, w, b = global_case(sizes, shape, seed=k)
            start = sum(sizes[:rank])
            xl = x[start:start + sizes[rank]].clone().requires_grad_()
            layer = bnlab.SyncBatchNorm(shape[1], momentum=0.3).double()
            with torch.no_grad():
                layer.weight.copy_(w)
                layer.bias.copy_(b)
            y = layer(xl)
            y.backward(dy[start:start + sizes[rank]])
            gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
            dist.all_reduce(gw)
            dist.all_reduce(gb)
            results.append(dict(y=y.detach(), dx=xl.grad.clone(), dweight=gw, dbias=gb,
                                running_mean=layer.running_mean.clone(), running_var=layer.running_var.clone()))
        torch.save(results, f"{out_dir}/syncbn_{world}_{rank}.pt")
    finally:
        dist.destroy_process_group()


def population_worker(rank: int, world: int, store_dir: str, out_dir: str) -> None:
    init(rank, world, store_dir)
    try:
        torch.manual_seed(0)                       # the same model on every rank
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), bnlab.BatchNorm1d(4), torch.nn.Tanh(),
                                    torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3)).double()
        g = torch.Generator().manual_seed(100 + rank)
        batches = [torch.randn(n, 5, generator=g, dtype=torch.float64) * 2 for n in (7, 3 + rank, 5)]
        out = {}
        for upstream in ("batch", "population"):
            bnlab.population_statistics(model, batches, upstream=upstream, progress=False)
            out[upstream] = {k: v.clone() for k, v in model.state_dict().items()}
        out["batches"] = batches
        torch.save(out, f"{out_dir}/pop_{world}_{rank}.pt")
    finally:
        dist.destroy_process_group()
