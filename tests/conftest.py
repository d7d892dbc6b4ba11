"""Shared test setup: deterministic, single-threaded torch (tiny tensors run faster on one thread)."""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# Tolerances per dtype: (atol, rtol) for outputs and for gradients/buffers.
TOL = {
    torch.float64: dict(out=(1e-10, 1e-10), grad=(1e-10, 1e-10)),
    torch.float32: dict(out=(2e-5, 2e-5), grad=(1e-4, 1e-4)),
    torch.bfloat16: dict(out=(4e-2, 2e-2), grad=(1e-1, 5e-2)),
}
