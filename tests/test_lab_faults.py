"""Fault injection for the lab: processes killed at random points and resumed, planted and
corrupt files, symbolic links, concurrent runs, read-only and full directories, invalid
configurations. Each case states what must hold; the module runs in well under a minute (the
killed runs are E1's tiny profile in subprocesses)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import bnlab
from bnlab.cli import main
from bnlab.lab import data
from bnlab.lab.runner import run_experiment

QUIET = dict(progress=False, log=lambda m: None)


def _bnlab(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bnlab", *args], capture_output=True, text=True,
                          timeout=kw.pop("timeout", 300), **kw)


def _killed_run(out: Path, unit: str, step: int, extra: tuple = ()) -> int:
    """`run_experiment("E1", tiny)` in a child that SIGKILLs itself after ``step`` of ``unit``:
    no handler, no finally, no flush runs (as when the machine kills it)."""
    code = textwrap.dedent(f"""
        import os, signal
        from bnlab.lab.runner import run_experiment
        def kill(unit, step):
            if unit == {unit!r} and step == {step}:
                os.kill(os.getpid(), signal.SIGKILL)
        run_experiment("E1", profile="tiny", out={str(out)!r}, progress=False, hooks=[kill],
                       overrides={list(extra)!r}, log=lambda m: None)
    """)
    return subprocess.run([sys.executable, "-c", code], timeout=300).returncode


@pytest.fixture(scope="module")
def clean_e1(tmp_path_factory):
    out = tmp_path_factory.mktemp("clean")
    run_experiment("E1", profile="tiny", out=out, **QUIET)
    return out / "E1"


# Kill points drawn at random (seeded: the same ones every run): E1 tiny trains "nobn" then "bn",
# 60 steps each, checkpoints every 25 — so points before, at and after a checkpoint, in both units.
KILL_POINTS = sorted(random.Random(18).sample([(u, s) for u in ("nobn", "bn") for s in range(1, 61)], 3))


@pytest.mark.parametrize("unit,step", KILL_POINTS)
def test_sigkill_at_a_random_point_then_resume_is_bit_identical(tmp_path, clean_e1, unit, step):
    assert _killed_run(tmp_path, unit, step) == -signal.SIGKILL
    assert not (tmp_path / "E1" / "result.json").exists()
    assert json.loads((tmp_path / "E1" / "config.json").read_text())["steps"] == 60   # written first
    run_experiment("E1", profile="tiny", out=tmp_path, resume=True, **QUIET)
    assert (tmp_path / "E1" / "metrics.csv").read_bytes() == (clean_e1 / "metrics.csv").read_bytes()


def test_resume_after_sigkill_with_another_config_is_refused(tmp_path, capsys):
    """The config guard needed state/elapsed.json, which a kill never writes: a resume with another
    --set was accepted, and result.json showed the new config beside the old config's numbers."""
    assert _killed_run(tmp_path, "bn", 10) == -signal.SIGKILL
    rc = main(["run", "E1", "--profile", "tiny", "--out", str(tmp_path), "--resume", "--set", "lr=0.3"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("bnlab: error: --resume:") and "different config" in err
    assert not (tmp_path / "E1" / "result.json").exists()


def test_a_planted_pickle_in_the_state_directory_runs_no_code(tmp_path, capsys):
    run_experiment("E1", profile="tiny", out=tmp_path, **QUIET)
    marker = tmp_path / "pwned"
    code = (f"import os, torch\n"
            f"class Evil:\n    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n"
            f"torch.save({{'trainer': Evil()}}, {str(tmp_path / 'E1' / 'state' / 'bn.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    rc = main(["run", "E1", "--profile", "tiny", "--out", str(tmp_path), "--resume", "--quiet"])
    assert rc == 2 and "bn.pt is not a checkpoint this run wrote" in capsys.readouterr().err
    assert not marker.exists()


def test_a_pickled_module_checkpoint_runs_no_code_unless_trusted(tmp_path):
    from bnlab.lab.models import load_checkpoint
    marker = tmp_path / "pwned"
    code = (f"import os, torch\n"
            f"class Evil(torch.nn.Module):\n    def __reduce__(self):\n"
            f"        return (os.system, ('touch {marker}',))\n"
            f"torch.save(Evil(), {str(tmp_path / 'evil.pt')!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(bnlab.DataError, match="--trust-checkpoint"):
        load_checkpoint(tmp_path / "evil.pt")
    r = _bnlab("recalibrate", str(tmp_path / "evil.pt"), "--out", str(tmp_path / "o.pt"))
    assert r.returncode == 2 and "refusing to unpickle" in r.stderr and len(r.stderr.splitlines()) == 1
    assert not marker.exists() and not (tmp_path / "o.pt").exists()


def test_a_symlinked_experiment_directory_is_refused_and_its_target_untouched(tmp_path, capsys):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    out = tmp_path / "runs"
    out.mkdir()
    (out / "E1").symlink_to(target)
    for args in (["run", "E1"], ["reproduce", "--only", "E1", "--jobs", "1"]):
        rc = main([*args, "--profile", "tiny", "--out", str(out)])
        assert rc == 2 and "symbolic link" in capsys.readouterr().err
    assert (target / "thesis.tex").read_text() == "years of work" and os.listdir(target) == ["thesis.tex"]


def test_links_inside_an_experiment_directory_are_removed_not_followed(tmp_path):
    target = tmp_path / "precious"
    target.mkdir()
    (target / "keep.txt").write_text("keep")
    run_experiment("E1", profile="tiny", out=tmp_path / "runs", **QUIET)
    (tmp_path / "runs" / "E1" / "link").symlink_to(target)
    run_experiment("E1", profile="tiny", out=tmp_path / "runs", **QUIET)       # clears E1/
    assert not (tmp_path / "runs" / "E1" / "link").exists() and (target / "keep.txt").exists()


def test_a_second_run_on_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    from bnlab._files import FileLock
    with FileLock(tmp_path / ".E1.lock", "bnlab run E1 (the first one)"):
        with pytest.raises(bnlab.errors.UsageError, match="another bnlab run is writing .*the first one"):
            run_experiment("E1", profile="tiny", out=tmp_path, **QUIET)
    run_experiment("E1", profile="tiny", out=tmp_path, **QUIET)                  # free again


def test_reproduce_keeps_the_childs_log_and_its_traceback(tmp_path):
    """The child used to delete the log.txt the parent writes, and error.txt said only 'exit code 1'."""
    r = _bnlab("reproduce", "--profile", "tiny", "--only", "E1", "--jobs", "2", "--out", str(tmp_path),
               "--set", "data.path=" + str(tmp_path / "no-such-data"))
    assert r.returncode == 1
    log = (tmp_path / "E1" / "log.txt").read_text()
    error = (tmp_path / "E1" / "error.txt").read_text()
    assert "Traceback" in error and "DataError" in error and "no-such-data" in error
    assert error.startswith("exit code 2") and "bnlab: error: --data-dir" in log   # a data error: status 2
    ok = _bnlab("reproduce", "--profile", "tiny", "--only", "E1", "--jobs", "1", "--out", str(tmp_path))
    assert ok.returncode == 0 and not (tmp_path / "E1" / "error.txt").exists()
    assert "E1" in (tmp_path / "E1" / "log.txt").read_text()


@pytest.mark.parametrize("setting,field", [
    ("lr=nan", "lr"), ("lr=inf", "lr"), ("lr=-0.1", "lr"), ("init_std=nan", "init_std"),
    ("steps=0", "steps"), ("steps=1e20", "steps"), ("steps=2.5", "steps"), ("eval_every=-10", "eval_every"),
    ("batch=0", "batch"), ("batch=1", "batch"), ("seeds=0", "seeds"), ("widths=", "widths"),
    ("widths=784,0,10", "widths"), ("checkpoint_every=0", "checkpoint_every"), ("eval_every=100", "eval_every"),
    ("widths=784", "widths"), ("stepz=3", "stepz"), ("threads=0", "threads"),
])
def test_every_bad_setting_exits_2_naming_the_field_before_anything_runs(tmp_path, capsys, setting, field):
    rc = main(["run", "E1", "--profile", "tiny", "--out", str(tmp_path), "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("bnlab: error:") and field in err and len(err.splitlines()) == 1
    assert not (tmp_path / "E1").exists()


def test_widths_that_do_not_fit_the_data_are_a_usage_error(tmp_path, capsys):
    rc = main(["run", "E1", "--profile", "tiny", "--out", str(tmp_path), "--set", "widths=100,10"])
    err = capsys.readouterr().err
    assert rc == 2 and "784 values" in err


def test_errors_are_one_line_and_the_traceback_is_opt_in(tmp_path, capsys, monkeypatch):
    rc = main(["run", "E99", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("bnlab: error: unknown experiment 'E99'; known: E1") and len(err.splitlines()) == 1
    with pytest.raises(bnlab.errors.UsageError):
        main(["--debug", "run", "E99", "--out", str(tmp_path)])
    monkeypatch.setenv("BNLAB_DEBUG", "1")
    with pytest.raises(bnlab.errors.UsageError):
        main(["run", "E99", "--out", str(tmp_path)])
    monkeypatch.setenv("BNLAB_DEBUG", "0")
    assert main(["run", "E99", "--out", str(tmp_path)]) == 2


# -- input files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_files():
    src = data.resolve_data_dir(download=False)
    return {stem: data._find(src, stem) for stem in data.FILES.values()}


@pytest.mark.parametrize("stem", sorted(data.FILES.values()))
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "directory"])
def test_each_damaged_input_file_is_a_one_line_data_error(tmp_path, capsys, mnist_files, stem, damage):
    d = tmp_path / "mnist"
    d.mkdir()
    for other, path in mnist_files.items():
        if other != stem:
            os.symlink(path, d / path.name)                  # the intact files, as they are
    path = d / mnist_files[stem].name
    raw = mnist_files[stem].read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "flip":
        path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.mkdir()
    rc = main(["run", "E1", "--profile", "tiny", "--out", str(tmp_path / "runs"), "--data-dir", str(d), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("bnlab: error:") and len(err.splitlines()) == 1
    assert stem in err and "delete the file" not in err        # the user's file: replace it, not delete
    assert not (tmp_path / "runs" / "E1" / "result.json").exists()


def _idx(dims: tuple, code: int, payload: bytes) -> bytes:
    import struct
    return bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + payload


def _idx_dir(d: Path, **replace: bytes) -> Path:
    import numpy as np
    rng = np.random.default_rng(0)
    files = dict(train_images=_idx((20, 28, 28), 0x08, rng.integers(0, 256, 20 * 784).astype(np.uint8).tobytes()),
                 train_labels=_idx((20,), 0x08, rng.integers(0, 10, 20).astype(np.uint8).tobytes()),
                 test_images=_idx((10, 28, 28), 0x08, rng.integers(0, 256, 10 * 784).astype(np.uint8).tobytes()),
                 test_labels=_idx((10,), 0x08, rng.integers(0, 10, 10).astype(np.uint8).tobytes()))
    files.update(replace)
    d.mkdir(parents=True, exist_ok=True)
    for key, blob in files.items():
        (d / data.FILES[key]).write_bytes(blob)
    return d


@pytest.mark.parametrize("replace,match", [
    (dict(train_labels=_idx((20,), 0x0C, (b"\x00\x00\x01\x00") * 20)), "class indices"),       # 256 ≥ MAX? no: fits
    (dict(train_labels=_idx((20,), 0x0C, (b"\xff\xff\xff\xff") * 20)), "class indices"),       # −1
    (dict(train_labels=_idx((20,), 0x0D, b"\x3f\x80\x00\x00" * 20)), "integer class indices"),  # float labels
    (dict(train_images=_idx((20, 28, 28), 0x0B, b"\x01\x00" * 20 * 784)), "pixel values"),     # 256
    (dict(train_images=_idx((20, 28, 28), 0x09, b"\xff" * 20 * 784)), "pixel values"),         # −1 (int8)
    (dict(train_images=_idx((20, 28, 28), 0x0D, b"\x7f\xc0\x00\x00" * 20 * 784)), "pixel values"),   # NaN
    (dict(train_images=_idx((2**32 - 1, 2**32 - 1, 2**32 - 1), 0x08, b"")), "truncated or padded"),
    (dict(train_images=_idx((0, 28, 28), 0x08, b"")), "N ≥ 1"),
])
def test_idx_values_out_of_range_and_overflowing_headers_are_data_errors(tmp_path, replace, match):
    if match == "class indices" and replace["train_labels"][-4:] == b"\x00\x00\x01\x00":
        replace = dict(train_labels=_idx((20,), 0x0C, (b"\x00\x00\x27\x10") * 20))            # 10000
    d = _idx_dir(tmp_path / "idx", **replace)
    with pytest.raises(bnlab.DataError, match=match):
        data.load("idx", d)


def _python_for_nobody() -> str | None:
    """An interpreter of this Python version that user nobody can execute (the venv's may live
    under /root), or None."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, f"/usr/bin/{version}", f"/usr/local/bin/{version}"):
        path = Path(candidate).resolve()
        if path.exists() and all(os.stat(p).st_mode & 0o001 for p in [path, *path.parents]):
            return str(path)
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the child as another user")
def test_an_unreadable_data_directory_is_a_data_error(tmp_path):
    """Root reads everything, so the child runs as nobody: a directory it may not search once gave
    a raw PermissionError."""
    python = _python_for_nobody()
    if python is None:
        pytest.skip("no Python interpreter user nobody can run")
    d = _idx_dir(tmp_path / "locked" / "idx")
    os.chmod(tmp_path / "locked", 0o700)
    os.chmod(tmp_path, 0o755)
    code = ("from bnlab.lab import data; import bnlab\n"
            f"try:\n    data.load('idx', {str(d)!r})\nexcept bnlab.DataError as e:\n    print('DataError', e)\n")
    env = dict(os.environ, HOME="/tmp", BNLAB_KERNELS="0", PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120,
                       preexec_fn=lambda: (os.setgid(65534), os.setuid(65534)), env=env)
    if "ModuleNotFoundError" in r.stderr or "Permission denied" in r.stderr and "bnlab" not in r.stdout:
        pytest.skip(f"bnlab cannot be imported by user nobody here: {r.stderr.strip().splitlines()[-1:]}")
    assert r.stdout.startswith("DataError") and "cannot read" in r.stdout, r.stderr


# -- read-only and full directories (a tmpfs of our own: root only) -------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    mounts = []

    def make(options: str) -> Path:
        d = tmp_path / f"fs{len(mounts)}"
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
        mounts.append(d)
        return d

    yield make
    for d in mounts:
        subprocess.run(["umount", "-l", str(d)])


def test_a_read_only_output_directory_is_a_one_line_error(tmpfs):
    d = tmpfs("ro,size=1m")
    r = _bnlab("run", "E1", "--profile", "tiny", "--out", str(d / "runs"))
    assert r.returncode == 2 and r.stderr.startswith("bnlab: error:") and "Read-only" in r.stderr


def test_a_full_disk_fails_cleanly_and_leaves_no_half_written_file(tmpfs):
    d = tmpfs("size=256k")
    r = _bnlab("run", "E1", "--profile", "tiny", "--out", str(d))
    assert r.returncode != 0 and "No space left on device" in r.stderr and "Traceback" not in r.stderr
    for path in d.rglob("*"):
        assert not path.name.endswith(".tmp"), path                # temporaries are removed
        if path.suffix == ".json":
            json.loads(path.read_text())                          # every JSON that exists is whole
