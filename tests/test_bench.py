"""The BatchNorm benchmark's mechanics: its allocator switch and a smoke run of the command."""

import json
import platform
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux", reason="glibc mallopt")


def _python(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          check=True, timeout=300).stdout


@pytest.mark.slow
def test_keep_freed_memory_stops_large_outputs_from_page_faulting():
    """After keep_freed_memory() a freed 64 MB output's pages are reused by the next one: no
    page faults (glibc's default here returns it to the OS: one fault per 4 KiB page)."""
    out = _python("""
        import resource, statistics, torch
        from bnlab.bench._common import keep_freed_memory
        keep_freed_memory()
        x = torch.randn(4096, 4096)
        faults = []
        for _ in range(5):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            y = x * 2
            del y
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        print(statistics.median(faults[1:]))
    """)
    assert float(out) < 100            # 64 MB is 16384 pages of 4 KiB


@pytest.mark.slow
def test_bench_command_runs_with_both_allocators(tmp_path):
    for malloc in ("default", "keep"):
        path = tmp_path / f"{malloc}.json"
        subprocess.run([sys.executable, "-m", "bnlab", "bench", "batchnorm", "--quick", "--threads", "1",
                        "--modes", "fwdbwd", "--malloc", malloc, "--json", str(path)],
                       check=True, capture_output=True, timeout=600)
        rows = json.loads(path.read_text())
        assert rows and all(r["mode"] == "fwdbwd" and r["torch_ms"] > 0 and r["bnlab_ms"] > 0 for r in rows)


def test_single_passes_run_the_kernels_code():
    """bench_pass runs the real passes: with its fixed coefficients the normalize pass is
    y = x·1 + 0 and the dx pass dx = dy·1 + x·1 + 0, in both layouts (and streamed or not)."""
    import torch
    from bnlab import kernels
    k = kernels.load()
    if k is None:
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    for x in (torch.randn(300, 37), torch.randn(4, 5, 6, 7), torch.randn(4, 5, 6, 7).to(memory_format=torch.channels_last)):
        dy = torch.randn_like(x)
        out = torch.full_like(x, float("nan"))
        k.control.bench_pass(1, x, dy, out)
        assert torch.equal(out, x)
        k.control.bench_pass(3, x, dy, out)
        assert torch.allclose(out, dy + x, atol=1e-6)
        k.control.bench_pass(0, x, dy, out)            # reductions: run without error, leave out alone
        k.control.bench_pass(2, x, dy, out)
        assert torch.allclose(out, dy + x, atol=1e-6)
    with pytest.raises(RuntimeError, match="share dtype and strides"):
        k.control.bench_pass(1, x, dy.contiguous(), out)


@pytest.mark.slow
def test_passes_command_reports_every_pass():
    out = subprocess.run([sys.executable, "-m", "bnlab", "bench", "passes", "--quick", "--threads", "1", "--markdown"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    table = [line for line in out.splitlines() if line.startswith("| ")]
    for name in ("statistics", "normalize", "grad sums", "dx", "**bnlab total**", "torch total"):
        assert sum(f"| {name} |" in line for line in table) == 2, name          # both quick shapes
    totals = [line.split("|") for line in table if "**bnlab total**" in line]
    assert all(float(cells[4]) > 0 for cells in totals)


@pytest.mark.slow
def test_chain_benchmark_times_both_and_writes_dx_over_dy(tmp_path):
    """`bnlab bench chain`: both implementations timed forward and backward, and inside the chain
    every bnlab BN backward wrote dx over its incoming gradient (ReLU's fresh, unshared output)."""
    from bnlab import kernels
    if not kernels.available():
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    path = tmp_path / "chain.json"
    out = subprocess.run([sys.executable, "-m", "bnlab", "bench", "chain", "--quick", "--threads", "1",
                          "--markdown", "--json", str(path)], check=True, capture_output=True, text=True,
                         timeout=600).stdout
    rows = json.loads(path.read_text())
    assert len(rows) == 2 and {r["layout"] for r in rows} == {"contiguous", "channels_last"}
    for r in rows:
        assert min(r["torch_fwd_ms"], r["torch_bwd_ms"], r["bnlab_fwd_ms"], r["bnlab_bwd_ms"]) > 0
        assert r["ratio"] > 0 and r["layers"] == 4 and r["threads"] == 1
        assert r["inplace_fraction"] == 1.0
    assert sum(line.startswith("| ") for line in out.splitlines()) == 3           # header and 2 rows
    assert all(r["ratio_without"] is None for r in rows)


@pytest.mark.slow
def test_chain_ablation_times_bnlab_without_dx_over_dy():
    """--ablate adds bnlab with dx over dy off as a third contender; the share of bnlab's own
    backwards that wrote over dy is still all of them (the ablated turns are not counted)."""
    from bnlab import kernels
    from bnlab.bench import chain as bench_chain
    if not kernels.available():
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    rows = bench_chain.run(bench_chain.QUICK_SHAPES, (1,), min_turns=3, max_turns=3, block=1, ablate=True, log=None)
    for r in rows:
        assert r.ratio_without > 0 and r.ratio_bwd_without > 0
        assert r.inplace_fraction == 1.0
        assert r.faults_without is not None and min(r.torch_faults, r.bnlab_faults, r.faults_without) >= 0
    assert "without it" in bench_chain.markdown(rows)


@pytest.mark.slow
def test_backward_split_script_splits_both_implementations():
    """benchmarks/backward_split.py (quoted in docs/performance.md) runs and reports all five rows."""
    from pathlib import Path
    from bnlab import kernels
    if not kernels.available():
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "backward_split.py"
    out = subprocess.run([sys.executable, str(script), "--shape", "8,4,5,5", "--turns", "1", "--threads", "1"],
                         check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if "total" in line]
    assert len(rows) == 5
    assert all(float(line.split("total")[1]) > 0 for line in rows)


@pytest.mark.slow
def test_call_overhead_script_times_every_caller():
    """benchmarks/call_overhead.py (quoted in docs/performance.md) runs and reports the three
    callers for training and inference on each shape."""
    from pathlib import Path
    from bnlab import kernels
    if not kernels.available():
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "call_overhead.py"
    out = subprocess.run([sys.executable, str(script), "--shapes", "8,4,5,5:cl;30,7", "--turns", "2",
                          "--threads", "1"], check=True, capture_output=True, text=True, timeout=300).stdout
    rows = [line for line in out.splitlines() if "direct" in line]
    assert len(rows) == 4 and sum("train" in r for r in rows) == 2 and sum("eval" in r for r in rows) == 2
    assert all(all(name in r for name in ("batch_norm +", "Python path +", "lambda +")) for r in rows)
    assert all(float(r.split("direct")[1].split("µs")[0]) > 0 for r in rows)


def test_every_registered_benchmark_has_a_command():
    """`bnlab bench NAME` is a lookup: every name in the registry resolves to a module's command."""
    import importlib

    from bnlab.bench import BENCHMARKS
    assert {"batchnorm", "chain", "passes", "variants", "memory", "probes", "e1", "ddp"} <= set(BENCHMARKS)
    for name in BENCHMARKS:
        assert callable(importlib.import_module(f"bnlab.bench.{name}").command), name


def test_noise_floor_times_the_kernels_draws_against_bns_step(monkeypatch):
    """Noisy BN's floor row: the draws alone and BN's step, floor = 1 + draws/BN, in its table."""
    from bnlab import kernels
    from bnlab.bench import variants as B
    if not kernels.available():
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    monkeypatch.setattr(B, "SHAPES", (((64, 32), None), ((8, 4, 6, 6), None)))
    rows = B.noise_floor(threads=(1,), repeats=1, log=lambda *_: None)
    assert [r["shape"] for r in rows] == ["64x32", "8x4x6x6"]
    for r in rows:
        assert r["bn_ms"] > 0 and r["draws_ms"] > 0
        assert r["floor"] == pytest.approx(1 + r["draws_ms"] / r["bn_ms"])
    table = B.noise_markdown(rows)
    assert table.count("\n| 1 | ") == 2 and "floor × BN" in table


def test_whitening_floor_times_zcas_jacobi_for_small_groups_only():
    """The whitening floor: PCA's floor from the eigendecomposition, ZCA's from the Jacobi kernel
    where a ZCA step runs it (G ≤ 16; timed at every G) and from eigh beyond, IterNorm's from the
    iterations."""
    from bnlab import kernels
    from bnlab.bench import variants as B
    if not kernels.available():
        pytest.skip(f"no CPU kernels: {kernels.failure()}")
    rows = B.whitening_floor(threads=(1,), repeats=1, log=lambda *_: None)
    assert [(r["shape"], r["G"]) for r in rows] == [("256x512", 16), ("256x512", 64), ("64x64x28x28", 16),
                                                    ("64x64x28x28", 64)]
    for r in rows:
        assert r["pca_floor"] == pytest.approx((r["eigh_ms"] + r["madds_ms"]) / r["bn_ms"])
        zca_ms = r["jacobi_ms"] if r["G"] <= 16 else r["eigh_ms"]
        assert r["jacobi_ms"] > 0 and zca_ms > 0
        assert r["zca_floor"] == pytest.approx((zca_ms + r["madds_ms"]) / r["bn_ms"])
        assert r["iternorm_floor"] == pytest.approx((r["newton_ms"] + r["madds_ms"]) / r["bn_ms"])
    table = B.floor_markdown(rows)
    assert table.count("\n| 1 | ") == 4 and "ZCA floor" in table
