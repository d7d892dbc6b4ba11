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


_TORCHVISION_SCHEMAS = None


def import_torchvision():
    """torchvision, or pytest.skip with the reason. PyPI's torchvision wheels are CUDA builds whose
    C++ operators cannot load beside a CPU-only torch; their Python part (models, FX feature
    extraction, ops.misc) still works, except that torchvision registers fake kernels for two
    operators (nms, qnms) unconditionally. Declaring those two schemas lets the real package
    import; the detection operators themselves stay unavailable (no test uses them)."""
    import sys
    global _TORCHVISION_SCHEMAS
    try:
        import torchvision
        return torchvision
    except ImportError as e:
        pytest.skip(f"torchvision is not installed ({e})")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            pytest.skip(f"torchvision does not import here: {e}")
    for name in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
        del sys.modules[name]
    if _TORCHVISION_SCHEMAS is None:
        _TORCHVISION_SCHEMAS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _TORCHVISION_SCHEMAS.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    try:
        import torchvision
    except Exception as e:                                    # noqa: BLE001 — any failure is a skip reason
        pytest.skip(f"torchvision does not import here: {type(e).__name__}: {e}")
    return torchvision


def import_timm():
    """timm (which imports torchvision at its top), or pytest.skip with the reason."""
    import_torchvision()
    return pytest.importorskip("timm")


def import_lightning():
    """lightning.pytorch, or pytest.skip. Lightning imports torchvision when it is installed (through
    torchmetrics), so torchvision is made importable first (see import_torchvision)."""
    import importlib.util
    if importlib.util.find_spec("torchvision") is not None:
        import_torchvision()
    return pytest.importorskip("lightning.pytorch")
