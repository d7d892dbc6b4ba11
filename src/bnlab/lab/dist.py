"""The lab under torch.distributed: processes started by ``torchrun`` (``bnlab run E1 --nproc 2``
wraps it). Rank 0 writes every file; all ranks train, each on its shard of every global batch
(a DistributedSampler), through DistributedDataParallel with bnlab.SyncBatchNorm."""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

__all__ = ["init_from_env", "shutdown", "rank", "world", "is_main", "barrier"]


def init_from_env(timeout_s: float = 300.0) -> bool:
    """Join the process group torchrun describes (gloo on CPU). True if distributed."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True


def world() -> int:
    return dist.get_world_size() if (dist.is_available() and dist.is_initialized()) else 1


def rank() -> int:
    return dist.get_rank() if (dist.is_available() and dist.is_initialized()) else 0


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group (after the last collective). A gloo group still alive at interpreter
    exit can abort the process (SIGABRT from its background threads) — intermittently, after all
    the work is done — so every entry point that joined one leaves it explicitly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
