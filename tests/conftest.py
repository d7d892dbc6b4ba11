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


# The one tolerance table: per dtype, (atol, rtol) for outputs/buffers ("out") and for
# gradients ("grad"), comparing bnlab with a reference computed the same way (the definition,
# torch.nn, the same formula in float64). A test comparing two *different* approximations (e.g.
# torch.nn's float16 statistics against bnlab's float32 ones) widens it by a stated factor.
TOLERANCES = {
    torch.float64: dict(out=(1e-10, 1e-10), grad=(1e-10, 1e-10)),
    torch.float32: dict(out=(2e-5, 2e-5), grad=(1e-4, 1e-4)),
    torch.float16: dict(out=(3e-3, 3e-3), grad=(1e-2, 1e-2)),
    torch.bfloat16: dict(out=(4e-2, 2e-2), grad=(1e-1, 5e-2)),
}
