"""bnlab's kernels: the backends that compute bnlab.definition's expressions fast, and their build.

Three backends share one interface (``forward_train``, ``forward_eval``, ``backward_train``):
the compiled CPU module (batchnorm_cpu.cpp, built on first use and cached), the Triton module
(triton_bn.py, CUDA tensors) and the memory-planned torch-ops module (torch_ops.py, anything
else dense). :mod:`bnlab.kernels.dispatch` picks one per call. Why C++ through
``torch.utils.cpp_extension`` rather than numba or torch ops: it shares ATen's thread pool
(``torch.set_num_threads`` applies, no second OpenMP runtime), handles bfloat16 natively, and can
give the large outputs huge-page memory — which no torch-level code can (docs/performance.md).

The build runs once per machine (``bnlab kernels --build`` does it ahead of time, < 1 min) into
``~/.cache/bnlab/kernels/<key>``, the key covering everything that makes builds differ (source,
flags, compiler, torch and its ABI, Python, CPU), so environments sharing the cache never rebuild
each other's; concurrent builds are serialized by a lock no killed process can leave stale.
Without a compiler the fast path is off and bnlab says so in one line; ``BNLAB_KERNELS=0`` turns
it off on purpose. ``calls`` counts dispatches.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import torch

__all__ = ["load", "load_triton", "backend", "available", "enabled", "disabled", "calls", "build_dir", "build", "empty_cache",
           "cache_info", "dx_over_dy"]

SOURCE = Path(__file__).with_name("batchnorm_cpu.cpp")
# -fopenmp: ATen's at::parallel_for is inline OpenMP in its headers (torch is built with
# AT_PARALLEL_OPENMP); the extension then links libgomp.so.1, which resolves to the copy torch
# already loaded — one runtime, one thread count, torch.set_num_threads applies.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fassociative-math", "-fno-signed-zeros",
         "-fno-trapping-math", "-std=c++17", "-fopenmp"]

class _Calls(MutableMapping):
    """Dispatches to the backends, by entry point (reads like a Counter: missing keys read 0):
    what the dispatch counts in Python (``dispatch.calls``) plus what the C++ module counts itself —
    ``forward_train``/``forward_eval`` made by its one-call entries, and ``backward_train`` (its
    autograd node's backward passes) and ``backward_train_inplace`` (those that wrote dx over an
    incoming gradient nothing else referenced). The two are added only when read."""

    _NODE = {"forward_train": "fast_forward_calls", "forward_eval": "fast_eval_calls",
             "backward_train": "node_backward_calls", "backward_train_inplace": "node_inplace_calls"}

    def __init__(self) -> None:
        self._node_base: Counter = Counter()    # node calls already cleared away, per key

    @staticmethod
    def _py() -> Counter:
        from .dispatch import calls as py_calls
        return py_calls

    def _node(self, key: str) -> int:
        name = self._NODE.get(key)
        if name is None or _module is None:
            return 0
        return int(getattr(_module.control, name)()) - self._node_base[key]

    def __getitem__(self, key: str) -> int:
        return self._py()[key] + self._node(key)

    def __setitem__(self, key: str, value: int) -> None:
        self._py()[key] = value - self._node(key)

    def __delitem__(self, key: str) -> None:
        if key in self._NODE:
            self._node_base[key] += self._node(key)
            self._py().pop(key, None)
        else:
            del self._py()[key]

    def clear(self) -> None:
        for key in self._NODE:
            self._node_base[key] += self._node(key)
        self._py().clear()

    def __iter__(self):
        keys = {k for k, v in self._py().items() if v} | {key for key in self._NODE if self._node(key)}
        return iter(sorted(keys))

    def __len__(self) -> int:
        return sum(1 for _ in self)


calls = _Calls()
_module = None
_failed: Optional[str] = None
_enabled = os.environ.get("BNLAB_KERNELS", "1") not in ("0", "false", "off")
_triton = None
_triton_failed: Optional[str] = None


def _compiler() -> Optional[str]:
    """The C++ compiler torch's build would use ($CXX, else c++), if it is on this machine."""
    return shutil.which(os.environ.get("CXX", "c++"))


def _compiler_id(path: str) -> str:
    try:
        return subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return path


def _cpu_flags() -> str:
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name")):
                    flags += line
                    if line.startswith("flags"):
                        break
    except OSError:
        pass
    return flags


def _cpu_key() -> str:
    """Everything that makes one build differ from another: the source, the flags, the compiler
    (path and version), torch (version and C++ ABI), Python (implementation and version, through
    the extension suffix), the machine and its CPU (the code is compiled for the host). Builds with
    different keys live in different directories, so virtual environments and checkouts that share
    ~/.cache/bnlab never rebuild each other's."""
    import sysconfig
    compiler = _compiler() or "none"
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(), _compiler_id(compiler).encode(),
                 torch.__version__.encode(), str(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", "")).encode(),
                 str(sysconfig.get_config_var("EXT_SUFFIX")).encode(), platform.machine().encode(),
                 _cpu_flags().encode()):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()[:16]


_KEY: Optional[str] = None


def build_dir() -> Path:
    global _KEY
    if _KEY is None:
        _KEY = _cpu_key()
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "bnlab" / "kernels"
    return root / _KEY


# How long a process waits for another that is compiling into the same directory (then it runs
# the torch-ops path); env BNLAB_KERNEL_BUILD_WAIT in seconds.
BUILD_WAIT_S = float(os.environ.get("BNLAB_KERNEL_BUILD_WAIT", "900"))


def build(verbose: bool = False):
    """Compile (or load the cached build of) the extension; raises on failure.

    Builds into the same directory are serialized by a lock (``<dir>.lock``, an flock the system
    releases when its holder dies, however it dies); a waiting process says on stderr whom it waits
    for. torch's own lock file inside the directory, which a killed build leaves behind and on
    which torch would wait for ever, is removed by whoever holds the flock. The first build of a
    directory says so on stderr (it takes about half a minute).
    """
    from torch.utils.cpp_extension import load as cpp_load

    from .._files import FileLock, atomic_write_text
    if _compiler() is None:
        raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'c++')}): install g++ "
                           f"(or set CXX) to enable the CPU kernels")
    d = build_dir()
    d.mkdir(parents=True, exist_ok=True)
    with FileLock(d.parent / f"{d.name}.lock", f"compiling bnlab CPU kernels into {d}", timeout=BUILD_WAIT_S):
        (d / "lock").unlink(missing_ok=True)        # torch's FileBaton of a build that was killed
        so, done = d / "bnlab_cpu_kernels.so", d / "complete"
        if so.exists() and done.exists():
            # the key covers everything a build depends on, so a completed build is loaded as it
            # is: ninja is not asked again, and a checkout elsewhere (whose build.ninja would name
            # another source path, which ninja takes for a change) does not rebuild it
            return _import_extension(so)
        fresh = not so.exists()
        if fresh and not verbose:
            print(f"bnlab: compiling CPU kernels (first use, under a minute) into {d}", file=sys.stderr,
                  flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")          # torch's compiler banners: the error says enough
            module = cpp_load(name="bnlab_cpu_kernels", sources=[str(SOURCE)], extra_cflags=FLAGS,
                              extra_ldflags=["-fopenmp"], build_directory=str(d), verbose=verbose)
        atomic_write_text(done, _KEY or "")                # written only once the build has loaded
        return module


def _import_extension(path: Path):
    """Import a compiled extension module from its file (what torch's loader does after a build)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("bnlab_cpu_kernels", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load():
    """The compiled module, or None (no compiler, disabled, or not on this platform).

    A failed build is said once, in one line on stderr, with what to do about it."""
    global _module, _failed
    if _module is not None or _failed is not None:
        return _module
    if platform.system() != "Linux":
        _failed = "the CPU kernels are built for Linux"
        return None
    try:
        _module = build()
    except Exception as e:                      # no compiler, no ninja, ...: the torch-ops path works
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        _failed = first[:300]
        print(f"bnlab: CPU kernels off ({_failed}); using the torch-ops path. "
              f"`bnlab kernels --build --verbose` shows the build; BNLAB_KERNELS=0 silences this.",
              file=sys.stderr, flush=True)
    return _module


_backend = "triton" if os.environ.get("BNLAB_KERNELS", "") == "triton" else "cpu"


def backend() -> str:
    """"triton" when BNLAB_KERNELS=triton was set at import (CPU tensors then run the Triton
    kernels, interpreted), else "cpu"."""
    return _backend


def load_triton():
    """bnlab.kernels.triton_bn, or None when Triton cannot be imported (the torch-ops path runs)."""
    global _triton, _triton_failed
    if _triton is not None or _triton_failed is not None:
        return _triton
    try:
        from . import triton_bn
        _triton = triton_bn
    except Exception as e:                      # no triton installed, or no GPU driver for it
        _triton_failed = f"{type(e).__name__}: {e}"
        warnings.warn(f"bnlab: Triton kernels unavailable ({_triton_failed}); using the torch-ops path",
                      stacklevel=3)
    return _triton


def available() -> bool:
    return _enabled and load() is not None


def enabled() -> bool:
    return _enabled


@contextmanager
def disabled():
    """Run the readable torch-ops path only (for comparisons and tests)."""
    global _enabled
    before = _enabled
    _enabled = False
    # the module's own switch too: functional.batch_norm's training path asks it first
    module_before = _module.control.set_enabled(False) if _module is not None else None
    try:
        yield
    finally:
        _enabled = before
        if module_before is not None:
            _module.control.set_enabled(module_before)


@contextmanager
def dx_over_dy(enabled: bool):
    """Whether the C++ autograd node may write dx over an incoming gradient nothing else holds
    (on by default; off only to measure what it is worth — ``bnlab bench chain --ablate``)."""
    k = load()
    if k is None:
        yield
        return
    before = k.control.set_dx_over_dy(bool(enabled))
    try:
        yield
    finally:
        k.control.set_dx_over_dy(before)


def failure() -> Optional[str]:
    return _failed


def empty_cache() -> int:
    """Unmap the pooled output regions (kept for reuse by later outputs); returns bytes freed."""
    m = _module
    return int(m.empty_cache()) if m is not None else 0


def cache_info() -> dict:
    """Pooled output memory: regions, bytes, and the cap (env BNLAB_KERNEL_CACHE_MB, default 1024)."""
    m = _module
    if m is None:
        return dict(regions=0, bytes=0, cap=0)
    regions, nbytes, cap = m.cache_info()
    return dict(regions=regions, bytes=nbytes, cap=cap)
