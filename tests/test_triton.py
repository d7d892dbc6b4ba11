"""The Triton (GPU) kernels, run on the CPU by Triton's interpreter.

CI has no GPU, so the kernels' arithmetic and addressing are checked here under
TRITON_INTERPRET=1 with BNLAB_KERNELS=triton, which routes every bnlab BN call on CPU tensors
to bnlab.kernels.triton_bn. The environment must be set before triton is imported, hence a
subprocess (tests/triton_worker.py holds the assertions). On a GPU the same kernels are timed
and checked by benchmarks/gpu_bench.py.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

WORKER = Path(__file__).with_name("triton_worker.py")


def test_triton_kernels_equal_the_definition_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", BNLAB_KERNELS="triton", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "triton path ok" in proc.stdout


def test_cpu_tensors_do_not_take_the_triton_path_by_default():
    import torch
    from bnlab.kernels import dispatch, torch_ops
    if os.environ.get("BNLAB_KERNELS") == "triton":
        pytest.skip("routing forced by the environment")
    k = dispatch.select(torch.randn(4, 3))
    assert k is dispatch.cpu_module() or k is torch_ops


def test_gpu_benchmark_script_runs_its_checks_in_smoke_mode(tmp_path):
    """benchmarks/gpu_bench.py is what a lent GPU session runs; keep it working without one."""
    import json
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_bench.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "--smoke", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert report["all_checks_ok"] and len(report["checks"]) >= 3
    assert {r["mode"] for r in report["timings"]} == {"fwd", "fwdbwd", "eval"}
    assert {"BatchRenorm", "l2", "IterNorm (G=8)"} <= {r["layer"] for r in report["variants"]}
