"""bnlab's benchmarks: ``bnlab bench NAME`` looks NAME up here and runs its module's ``command``.

Each benchmark times against a baseline in the same process (ratios, medians over repeats; the
machines this runs on are shared and drift) and prints or writes its rows. Modules load only when
run. The benchmarks are tools, not library: they may use the lab (``e1``, ``ddp``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

__all__ = ["Benchmark", "BENCHMARKS", "run"]


@dataclass(frozen=True)
class Benchmark:
    name: str
    help: str
    default_threads: str = "2"          # --threads when not given


BENCHMARKS = {b.name: b for b in [
    Benchmark("batchnorm", "bnlab's BatchNorm vs torch.nn (fwd, fwd+bwd, eval) and a copy's bandwidth", "1,2"),
    Benchmark("chain", "4 × (BN, ReLU) trained, bnlab's BN vs torch.nn's, forward and backward timed apart"),
    Benchmark("passes", "each pass of the CPU kernels vs a torch operation moving the same bytes"),
    Benchmark("variants", "each normalization variant vs bnlab's BatchNorm"),
    Benchmark("memory", "BatchNormAct2d vs torch BN + activation: memory kept, peak RSS, step time"),
    Benchmark("probes", "probe overhead on the E1 MLP, per probe and measurement interval"),
    Benchmark("e1", "E1's training loop: bnlab vs plain PyTorch vs NumPy"),
    Benchmark("ddp", "E1's step in 1 process and in 2 (DDP + SyncBatchNorm, gloo)"),
]}


def run(name: str, args) -> int:
    """Run benchmark ``name`` with the CLI's parsed arguments."""
    if args.threads is None:
        args.threads = BENCHMARKS[name].default_threads
    return importlib.import_module(f"{__name__}.{name}").command(args)
