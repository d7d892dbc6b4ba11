"""``bnlab reproduce``: every experiment, then the report.

Each experiment runs as ``bnlab run <id>`` in a child process, single-threaded, writing its own
directory and log; a failing experiment is recorded (``error.txt``) and the others go on.
``--resume`` keeps finished experiments of the same profile and resumes the rest from their
checkpoints. Finally ``report.html`` and ``summary.md`` are written.

Executors: ``local`` (default) runs ``--jobs`` children at a time on this machine; ``ray`` hands
each child to a Ray task (``pip install bnlab[ray]``) — a local Ray instance with ``--jobs`` CPUs,
or the cluster at ``--ray-address``/``RAY_ADDRESS``, whose workers must see the same ``--out``
path (a shared filesystem) and have bnlab installed. The children are the same commands either
way, so results, logs, resume and atomic writes are identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Optional, Sequence

from .._progress import format_seconds
from .._files import FileLock, LockBusy
from ..errors import UsageError
from .config import parse_overrides
from .io import atomic_write_text, read_json
from .registry import all_experiments
from .report import write_report

__all__ = ["reproduce"]


def _overrides_for(experiment, overrides: dict[str, str]) -> list[str]:
    """Only the --set keys this experiment's config has (e.g. data.path applies to all)."""
    cfg = experiment.Config()
    keep = []
    for key, value in overrides.items():
        target = cfg
        ok = True
        for part in key.split("."):
            if not hasattr(target, part):
                ok = False
                break
            target = getattr(target, part)
        if ok:
            keep.append(f"{key}={value}")
    return keep


def _finished(out: Path, eid: str, profile: str) -> bool:
    f = out / eid / "result.json"
    return f.exists() and read_json(f).get("profile") == profile


def _run_logged(cmd: list[str], log_path: Path, echo: bool) -> int:
    """Run ``cmd`` with its stdout and stderr written to ``log_path`` (and echoed to ours)."""
    # every process of the lab runs with the same BLAS/OpenMP thread settings (cli.main sets them
    # for `bnlab run` too), so reproduce and run give bit-identical numbers
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert proc.stdout is not None
        while True:
            chunk = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
            if not chunk:
                break
            log.write(chunk)
            log.flush()
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
        return proc.wait()


EXECUTORS = ("local", "ray")


def _ray_runner(jobs: int, address: Optional[str]):
    """A function running ``_run_logged`` as a Ray task (one CPU each), after connecting to the
    cluster at ``address`` (or RAY_ADDRESS) or starting a local instance with ``jobs`` CPUs."""
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs Ray: pip install 'bnlab[ray]'") from None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not ray.is_initialized():
        kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=jobs, **kwargs)
    task = ray.remote(num_cpus=1, max_retries=0)(_run_logged)
    return lambda cmd, log_path, echo: ray.get(task.remote(cmd, log_path, False))


def reproduce(profile: str = "quick", out: str | Path = "runs", only: Optional[Sequence[str]] = None,
              resume: bool = False, data_dir: Optional[str] = None, jobs: Optional[int] = None,
              overrides: Sequence[str] = (), progress: bool = True, executor: str = "local",
              ray_address: Optional[str] = None) -> int:
    """Run the experiments and write the report. Returns 0 if all ran, 1 if any failed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    experiments = all_experiments()
    if only:
        known = {e.id for e in experiments}
        unknown = [x for x in only if x not in known]
        if unknown:
            raise UsageError(f"reproduce: unknown experiments {unknown}; known: {sorted(known)}")
        experiments = [e for e in experiments if e.id in only]
    ov = parse_overrides(overrides)
    if jobs is not None and jobs < 1:
        raise UsageError(f"--jobs {jobs}: need at least 1")
    if executor not in EXECUTORS:
        raise UsageError(f"--executor {executor!r}: choose from {EXECUTORS}")
    jobs = jobs or min(2, os.cpu_count() or 1)
    for e in experiments:                # refuse what would fail in every child, before any runs
        e.config(profile, parse_overrides(_overrides_for(e, ov)))
        if (out / e.id).is_symlink():
            raise UsageError(f"{out / e.id} is a symbolic link; bnlab does not write or clear results "
                             f"through a link: remove it or choose another --out")
    try:
        with FileLock(out / ".reproduce.lock", f"bnlab reproduce --out {out}"):
            run_child = _ray_runner(jobs, ray_address) if executor == "ray" else _run_logged
            return _reproduce(experiments, profile, out, only, resume, data_dir, jobs, ov, progress, run_child)
    except LockBusy as e:
        raise UsageError(f"another bnlab reproduce is writing {out} ({e}): wait for it to finish or "
                         f"choose another --out") from None


def _reproduce(experiments, profile, out: Path, only, resume, data_dir, jobs: int, ov: dict,
               progress: bool, run_child=_run_logged) -> int:
    todo = [e for e in experiments if not (resume and _finished(out, e.id, profile))]
    skipped = len(experiments) - len(todo)
    print(f"bnlab reproduce: {len(todo)} experiment(s), profile {profile}, {jobs} in parallel"
          + (f", {skipped} already finished" if skipped else ""), flush=True)
    t0 = time.perf_counter()

    def run_one(e) -> tuple[str, int, float]:
        cmd = [sys.executable, "-m", "bnlab", "run", e.id, "--profile", profile, "--out", str(out)]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        if resume:
            cmd.append("--resume")
        for item in _overrides_for(e, ov):
            cmd += ["--set", item]
        if jobs > 1 or not progress:
            cmd.append("--quiet")
        (out / e.id).mkdir(parents=True, exist_ok=True)
        log_path = out / e.id / "log.txt"
        start = time.perf_counter()
        # the child keeps log.txt when it clears its directory (runner._LAUNCHER_FILES); with one
        # job its output also goes to this terminal
        rc = run_child(cmd, log_path, jobs == 1)
        error = out / e.id / "error.txt"
        if rc != 0:
            # the child wrote its traceback to error.txt when it could (an exception); a process
            # killed by a signal could not, and then the log's tail is what there is
            child = error.read_text() if error.exists() else ""
            tail = log_path.read_text(errors="replace")[-4000:] if log_path.exists() else ""
            atomic_write_text(error, f"exit code {rc}\n\n" + (child or f"last output:\n{tail}"))
        elif error.exists():
            error.unlink()
        return e.id, rc, time.perf_counter() - start

    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(run_one, e): e for e in todo}
        for fut in as_completed(futures):
            eid, rc, secs = fut.result()
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {out / eid})"
            verdict = ""
            if rc == 0 and (out / eid / "result.json").exists():
                verdict = " → " + read_json(out / eid / "result.json")["verdict"]
            else:
                failed.append(eid)
            print(f"  {eid}: {status}{verdict} in {format_seconds(secs)}", flush=True)

    only_ids = [e.id for e in experiments]
    from .report import collect_results
    results = collect_results(out, only_ids)
    command = "bnlab reproduce --profile " + profile + (f" --only {','.join(only)}" if only else "")
    html_path, md_path = write_report(out, results, command=command)
    print(f"bnlab reproduce: {len(todo) - len(failed)}/{len(todo)} ran in "
          f"{format_seconds(time.perf_counter() - t0)}; report: {html_path}, {md_path}", flush=True)
    return 1 if failed else 0
