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


def test_keep_freed_memory_stops_large_outputs_from_page_faulting():
    """After keep_freed_memory() a freed 64 MB output's pages are reused by the next one: no
    page faults (glibc's default here returns it to the OS: one fault per 4 KiB page)."""
    out = _python("""
        import resource, statistics, torch
        from bnlab import bench
        bench.keep_freed_memory()
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


def test_bench_command_runs_with_both_allocators(tmp_path):
    for malloc in ("default", "keep"):
        path = tmp_path / f"{malloc}.json"
        subprocess.run([sys.executable, "-m", "bnlab", "bench", "batchnorm", "--quick", "--threads", "1",
                        "--modes", "fwdbwd", "--malloc", malloc, "--json", str(path)],
                       check=True, capture_output=True, timeout=600)
        rows = json.loads(path.read_text())
        assert rows and all(r["mode"] == "fwdbwd" and r["torch_ms"] > 0 and r["bnlab_ms"] > 0 for r in rows)
