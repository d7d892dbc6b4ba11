"""``bnlab reproduce``: every experiment, then the report.

Experiments run in worker processes (``--jobs``, default min(2, CPUs); each single-threaded),
each writing its own directory and log; a failing experiment is recorded (``error.txt``) and
the others go on. ``--resume`` keeps finished experiments of the same profile and resumes the
rest from their checkpoints. Finally ``report.html`` and ``summary.md`` are written.
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


def reproduce(profile: str = "quick", out: str | Path = "runs", only: Optional[Sequence[str]] = None,
              resume: bool = False, data_dir: Optional[str] = None, jobs: Optional[int] = None,
              overrides: Sequence[str] = (), progress: bool = True) -> int:
    """Run the experiments and write the report. Returns 0 if all ran, 1 if any failed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    experiments = all_experiments()
    if only:
        known = {e.id for e in experiments}
        unknown = [x for x in only if x not in known]
        if unknown:
            raise SystemExit(f"bnlab reproduce: unknown experiments {unknown}; known: {sorted(known)}")
        experiments = [e for e in experiments if e.id in only]
    ov = parse_overrides(overrides)
    jobs = jobs or min(2, os.cpu_count() or 1)
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
        env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        if jobs > 1:
            with open(log_path, "w") as log:
                rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        else:
            rc = subprocess.run(cmd, env=env).returncode
        error = out / e.id / "error.txt"
        if rc != 0:
            tail = log_path.read_text()[-4000:] if log_path.exists() and jobs > 1 else ""
            atomic_write_text(error, f"exit code {rc}\n{tail}")
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
