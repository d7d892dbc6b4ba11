"""``bnlab bench memory``: a 20-block conv → BN → activation network (batch 32, 64 channels,
32×32), training memory and step time, bnlab.BatchNormAct2d(memory_efficient=True) vs
torch.nn.BatchNorm2d + activation.

Two measures of memory, each configuration in a fresh process:
  saved     bytes of the distinct storages autograd keeps for backward at the end of the forward
            (torch.autograd.graph.saved_tensors_hooks) — what the layer design controls;
  peak RSS  the process's peak resident memory over its first training steps minus its resident
            memory once the model and data exist (getrusage): everything a step needs, allocator
            caches (and bnlab's output pool) included.
Step time: forward + backward + SGD step, all configurations in one process, stepped
alternately (so a shared machine's load hits them alike), median over the steps.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("torch-leaky_relu", "torch-leaky_relu-inplace", "bnlab-leaky_relu", "torch-relu",
           "torch-relu-inplace", "bnlab-relu")


def _net(config: str, blocks: int = 20, channels: int = 64):
    import torch
    from torch import nn

    import bnlab
    kind, act, *inplace = config.split("-")
    layers: list = [nn.Conv2d(3, channels, 3, padding=1, bias=False)]
    for _ in range(blocks):
        if kind == "bnlab":
            layers.append(bnlab.BatchNormAct2d(channels, activation=act, memory_efficient=True))
        else:
            layers.append(nn.BatchNorm2d(channels))
            layers.append(nn.LeakyReLU(0.01, inplace=bool(inplace)) if act == "leaky_relu"
                          else nn.ReLU(inplace=bool(inplace)))
        layers.append(nn.Conv2d(channels, channels, 3, padding=1, bias=False))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 10)]
    torch.manual_seed(0)
    return nn.Sequential(*layers)


def _worker(config: str, steps: int, threads: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    model = _net(config)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    rss_before = _rss_now()                           # model, optimizer and data exist; no step yet
    step()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    storages: dict = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
    saved = sum(storages.values())
    loss.backward()
    opt.zero_grad(set_to_none=True)
    del loss
    return dict(config=config, saved_bytes=saved, peak_step_bytes=max(0, peak - rss_before))


def _timing(steps: int, threads: int) -> dict:
    """Median step time of every configuration, stepped alternately in one process."""
    import torch
    torch.set_num_threads(threads)
    x = torch.randn(32, 3, 32, 32)
    y = torch.randint(0, 10, (32,))
    loss_fn = torch.nn.CrossEntropyLoss()
    nets = {c: _net(c) for c in CONFIGS}
    opts = {c: torch.optim.SGD(m.parameters(), lr=0.01) for c, m in nets.items()}
    times: dict = {c: [] for c in CONFIGS}
    for s in range(steps + 2):
        for c in CONFIGS:
            t0 = time.perf_counter()
            loss = loss_fn(nets[c](x), y)
            opts[c].zero_grad(set_to_none=True)
            loss.backward()
            opts[c].step()
            if s >= 2:                                # two warm-up rounds
                times[c].append(time.perf_counter() - t0)
    return {c: statistics.median(t) * 1e3 for c, t in times.items()}


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run(steps: int = 10, threads: int = 2, log=print) -> list[dict]:
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    for config in CONFIGS:
        out = subprocess.run([sys.executable, "-m", "bnlab.bench.memory", config, str(steps), str(threads)],
                             env=env, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ms = _timing(steps, threads)
    for r in rows:
        r["ms_per_step"] = ms[r["config"]]
    ref = {act: next(r for r in rows if r["config"] == f"torch-{act}") for act in ("leaky_relu", "relu")}
    for r in rows:
        base = ref[r["config"].split("-")[1]]
        r["saved_ratio"] = r["saved_bytes"] / base["saved_bytes"]
        r["time_ratio"] = r["ms_per_step"] / base["ms_per_step"]
        log(f"{r['config']:>26}: saved for backward {r['saved_bytes'] / 2**20:7.1f} MiB (×{r['saved_ratio']:.2f}), "
            f"peak RSS over a step {r['peak_step_bytes'] / 2**20:7.1f} MiB, step {r['ms_per_step']:7.1f} ms "
            f"(×{r['time_ratio']:.2f})")
    return rows


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))


def command(args) -> int:
    """``bnlab bench memory``."""
    run(steps=3 if args.quick else 10, threads=int((args.threads or "2").split(",")[-1]))
    return 0
