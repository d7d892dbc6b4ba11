"""``bnlab bench ddp``: E1's step time (BN arm, 3 seeds batched, global batch 60) in 1 and 2
processes on this machine, and the share of the 2-process step spent in communication.

Each configuration runs in its own process(es), one thread each: "1 process" is the lab's
single-process loop (the explicit fast path) and the same loop through autograd; "2 processes"
is torchrun + gloo, DistributedDataParallel and bnlab.SyncBatchNorm, each rank on half of every
global batch. Step times are medians over the timed steps. The communication share is estimated
as 1 − t(one rank's compute)/t(2 processes), where one rank's compute is the same autograd step
on half the batch in a single process: everything the 2-process step spends beyond it is
collectives (SyncBN's all-gather and all-reduce per layer, DDP's gradient all-reduce, the loss
all-reduce) and waiting for the other rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _worker(steps: int, fast: bool, out: str, batch: int = 60) -> None:
    import torch

    from ..lab import data as data_mod
    from ..lab import dist as lab_dist
    from ..lab.models import build_mlp
    from ..lab.trainers import make_trainer

    torch.set_num_threads(1)
    lab_dist.init_from_env()
    ds = data_mod.load("mnist")
    spec = dict(kind="mlp", widths=[784, 100, 100, 100, 10], activation="sigmoid", norm="bn",
                init="normal", init_std=0.1)
    trainer = make_trainer(build_mlp(spec, 3), ds, [0, 1, 2], "bn", batch, 0.1, fast=fast)
    for s in range(20):
        trainer.train_step(s)
    lab_dist.barrier()
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        trainer.train_step(s)
        times.append(time.perf_counter() - t0)
    if lab_dist.is_main():
        with open(out, "w") as f:
            json.dump(dict(ms_per_step=statistics.median(times) * 1e3, processes=lab_dist.world(),
                           trainer=type(trainer).__name__), f)
    lab_dist.barrier()
    lab_dist.shutdown()


def run(steps: int = 500, log=print) -> list[dict]:
    import tempfile
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    rows = []
    with tempfile.TemporaryDirectory() as d:
        one = [sys.executable, "-m", "bnlab.bench.ddp"]
        configs = [("1 process, explicit step", one, ["--fast"]),
                   ("1 process, autograd", one, []),
                   ("1 process, half batch (one rank's compute)", one, ["--batch", "30"]),
                   ("2 processes, DDP + SyncBatchNorm",
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                     "-m", "bnlab.bench.ddp"], [])]
        for name, cmd, extra in configs:
            out = os.path.join(d, "r.json")
            proc = subprocess.run(cmd + ["--steps", str(steps), "--out", out] + extra, env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"bench ddp: {name!r} exited with {proc.returncode}:\n"
                                   f"{(proc.stdout + proc.stderr)[-3000:]}")
            with open(out) as f:
                r = json.load(f)
            r["config"] = name
            rows.append(r)
    half, two = rows[2]["ms_per_step"], rows[3]["ms_per_step"]
    rows[3]["comm_share"] = max(0.0, 1 - half / two)
    for r in rows:
        share = f", communication and waiting ≈ {100 * r['comm_share']:.0f}% of the step" if "comm_share" in r else ""
        log(f"E1 BN arm (3 seeds, global batch 60), {r['config']}: {r['ms_per_step']:.3f} ms/step{share}")
    return rows


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--out", required=True)
    p.add_argument("--fast", action="store_true")
    p.add_argument("--batch", type=int, default=60)
    a = p.parse_args()
    _worker(a.steps, a.fast, a.out, a.batch)


def command(args) -> int:
    """``bnlab bench ddp``."""
    run(steps=100 if args.quick else 500)
    return 0
