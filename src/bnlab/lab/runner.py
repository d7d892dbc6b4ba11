"""Run an experiment: resolve its config, train in resumable units, write the results.

``DIR/<id>/`` receives ``result.json`` (experiment, claim, verdict, criterion, paper, measured,
numbers, config, git_sha, versions, seconds...), ``metrics.csv`` (tidy: step, seed, arm, metric,
value), ``config.json`` (the resolved config), the PNG figures, and ``state/`` (checkpoints).

A *unit* is one training run (e.g. one arm, all seeds batched). Every ``checkpoint_every`` steps
the runner saves, atomically, the unit's trainer state, the metrics it recorded so far and the
global RNG state; ``--resume`` reloads finished units and continues unfinished ones from their
last checkpoint. Trainers draw their data from their own generators, and the CPU runs single
threaded and deterministic, so a resumed run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import numpy as np
import torch

from .._progress import Progress
from .._version import __version__
from . import data as data_mod
from .config import config_to_dict, parse_overrides
from .io import (atomic_torch_save, atomic_write_json, read_json, remove_tree,
                 write_metrics_csv)
from .registry import Experiment, get

__all__ = ["Trainer", "RunContext", "run_experiment", "git_sha", "versions"]


class Trainer(Protocol):
    """What a resumable unit must offer."""

    def train_step(self, step: int) -> None: ...
    def evaluate(self, step: int) -> Iterable[tuple[int, str, str, float]]: ...   # (seed, arm, metric, value)
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


def git_sha() -> str:
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def versions() -> dict:
    return dict(bnlab=__version__, python=platform.python_version(), torch=torch.__version__,
                numpy=np.__version__, platform=platform.platform(), machine=platform.machine(),
                cpus=os.cpu_count(), torch_threads=torch.get_num_threads())


def _unit_seed(experiment: str, unit: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{experiment}/{unit}".encode()).digest()[:4], "little")


class RunContext:
    """What an experiment's run/analyze see: config, seeds, data, units, metrics, files."""

    def __init__(self, experiment: Experiment, cfg: Any, out_dir: Path, resume: bool,
                 data_dir: Optional[str] = None, progress: bool = True,
                 hooks: Sequence[Callable[[str, int], None]] = (), log: Callable[[str], None] = print):
        self.experiment = experiment
        self.cfg = cfg
        self.out_dir = out_dir
        self.state_dir = out_dir / "state"
        self.resume = resume
        self.data_dir = data_dir
        self.progress = progress
        self.hooks = list(hooks)
        self._log = log
        self.rows: list[dict] = []
        self.seeds = list(range(cfg.seeds))
        self._data = None

    # -- helpers -------------------------------------------------------------------------------
    def log(self, msg: str) -> None:
        from . import dist as lab_dist
        if lab_dist.is_main():
            self._log(f"[{self.experiment.id}] {msg}")

    def path(self, name: str) -> Path:
        return self.out_dir / name

    @property
    def data(self) -> data_mod.Dataset:
        if self._data is None:
            d = self.cfg.data
            self._data = data_mod.load(d.name, d.path or (self.data_dir if d.name == "mnist" else None))
        return self._data

    def record(self, step: int, seed: int, arm: str, metric: str, value: float) -> None:
        self.rows.append(dict(step=int(step), seed=int(seed), arm=str(arm), metric=str(metric),
                              value=float(value)))

    def select(self, metric: str, arm: Optional[str] = None, seed: Optional[int] = None,
               step: Optional[int] = None) -> list[dict]:
        return [r for r in self.rows if r["metric"] == metric and (arm is None or r["arm"] == arm)
                and (seed is None or r["seed"] == seed) and (step is None or r["step"] == step)]

    def series(self, metric: str, arm: str, seed: int) -> tuple[list[int], list[float]]:
        rows = sorted(self.select(metric, arm, seed), key=lambda r: r["step"])
        return [r["step"] for r in rows], [r["value"] for r in rows]

    def seed_means(self, metric: str, arm: str) -> list[float]:
        """The metric averaged over its recorded steps, one value per seed."""
        return [statistics.fmean(self.series(metric, arm, seed)[1]) for seed in self.seeds]

    def final(self, metric: str, arm: str) -> list[float]:
        """The metric's value at its last recorded step, one per seed."""
        out = []
        for seed in self.seeds:
            steps, values = self.series(metric, arm, seed)
            if values:
                out.append(values[-1])
        return out

    # -- resumable units -----------------------------------------------------------------------
    def _unit_path(self, name: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_.=" else "_" for c in name)
        return self.state_dir / f"{safe}.pt"

    def run_unit(self, name: str, make_trainer: Callable[[], Trainer], steps: int,
                 eval_steps: Iterable[int] = (), final_eval: bool = True) -> Trainer:
        """Train ``make_trainer()`` for ``steps`` steps, evaluating at ``eval_steps``.

        Resumable: checkpoints every cfg.checkpoint_every steps; a finished unit is reloaded
        (trainer state and metrics) instead of retrained.
        """
        path = self._unit_path(name)
        saved = torch.load(path, weights_only=False) if (self.resume and path.exists()) else None
        torch.manual_seed(_unit_seed(self.experiment.id, name))
        trainer = make_trainer()
        eval_at = set(int(s) for s in eval_steps)
        if final_eval:
            eval_at.add(steps)
        if saved is not None:
            trainer.load_state_dict(saved["trainer"])
            torch.set_rng_state(saved["rng"])
            self.rows.extend(saved["rows"])
            if saved["done"]:
                self.log(f"{name}: reloaded finished unit ({steps} steps)")
                return trainer
            start, rows = saved["step"], list(saved["rows"])
            self.log(f"{name}: resuming at step {start}/{steps}")
        else:
            start, rows = 0, []
            if 0 in eval_at:
                rows.extend(self._eval_rows(trainer, 0))
                self.rows.extend(rows)
        every = max(1, int(self.cfg.checkpoint_every))
        from . import dist as lab_dist
        bar = Progress(total=steps, desc=f"{self.experiment.id} {name}",
                       enabled=self.progress and lab_dist.is_main(), unit="step")
        bar.n = start
        try:
            for step in range(start + 1, steps + 1):
                trainer.train_step(step)
                if step in eval_at:
                    new = self._eval_rows(trainer, step)
                    rows.extend(new)
                    self.rows.extend(new)
                if step % every == 0 and step < steps:
                    self._save_unit(path, trainer, step, rows, done=False)
                bar.update(1)
                for hook in self.hooks:
                    hook(name, step)
        finally:
            bar.close()
        self._save_unit(path, trainer, steps, rows, done=True)
        return trainer

    def _eval_rows(self, trainer: Trainer, step: int) -> list[dict]:
        return [dict(step=step, seed=int(seed), arm=str(arm), metric=str(metric), value=float(value))
                for seed, arm, metric, value in trainer.evaluate(step)]

    def _save_unit(self, path: Path, trainer: Trainer, step: int, rows: list[dict], done: bool) -> None:
        from . import dist as lab_dist
        if not lab_dist.is_main():
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        atomic_torch_save(dict(trainer=trainer.state_dict(), step=step, rows=rows, done=done,
                               rng=torch.get_rng_state()), path)

    # -- other artifacts -----------------------------------------------------------------------
    def save_model(self, name: str, model: torch.nn.Module, spec: dict, meta: dict) -> Path:
        """A checkpoint ``bnlab recalibrate`` and ``torch.load`` understand (see lab.models)."""
        from .models import save_checkpoint
        return save_checkpoint(self.path(name), model, spec, meta)


def run_experiment(eid: str, profile: str = "quick", out: str | Path = "runs", seeds: Optional[int] = None,
                   overrides: Sequence[str] | dict = (), resume: bool = False, data_dir: Optional[str] = None,
                   progress: bool = True, hooks: Sequence[Callable[[str, int], None]] = (),
                   log: Callable[[str], None] = print) -> dict:
    """Run one experiment end to end and write its directory; returns result.json's content."""
    from . import dist as lab_dist
    distributed = lab_dist.init_from_env()
    try:
        result = _run_experiment(eid, profile, out, seeds, overrides, resume, data_dir, progress, hooks, log)
        # every rank leaves the group together, once rank 0 has analyzed and written: a rank that
        # tore its gloo group down while rank 0 still held the connections aborted (SIGABRT) once
        # in a test run, after all its work was done
        lab_dist.barrier()
        return result
    finally:
        if distributed:
            lab_dist.shutdown()


def _run_experiment(eid, profile, out, seeds, overrides, resume, data_dir, progress, hooks, log) -> dict:
    from . import dist as lab_dist
    main = lab_dist.is_main()
    experiment = get(eid)
    ov = parse_overrides(overrides) if not isinstance(overrides, dict) else dict(overrides)
    if seeds is not None:
        ov["seeds"] = seeds
    cfg = experiment.config(profile, ov)
    out_dir = Path(out) / experiment.id
    if main and out_dir.exists() and not resume:
        remove_tree(out_dir)
    lab_dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = 0.0
    progress_file = out_dir / "state" / "elapsed.json"
    if resume and progress_file.exists():
        previous = read_json(progress_file)["seconds"]
        saved_cfg = read_json(out_dir / "config.json") if (out_dir / "config.json").exists() else None
        if saved_cfg is not None and saved_cfg != json.loads(json.dumps(config_to_dict(cfg))):
            raise ValueError(f"--resume: {out_dir} was started with a different config; "
                             f"rerun without --resume to start over")
    if main:
        atomic_write_json(out_dir / "config.json", config_to_dict(cfg))
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.threads)))
    ctx = RunContext(experiment, cfg, out_dir, resume, data_dir, progress, hooks, log)
    started = time.time()
    t0 = time.perf_counter()
    try:
        ctx.log(f"{experiment.title} — profile {profile}, {cfg.seeds} seed(s)")
        try:
            experiment.run(cfg, ctx)
        finally:
            if main:
                (out_dir / "state").mkdir(parents=True, exist_ok=True)
                atomic_write_json(progress_file, dict(seconds=previous + time.perf_counter() - t0))
        lab_dist.barrier()
        if not main:                              # rank 0 analyzes and writes; the others are done
            return {}
        ctx.log("analysis and figures")
        verdict = experiment.analyze(cfg, ctx)
    finally:
        torch.set_num_threads(torch_threads)
    write_metrics_csv(out_dir / "metrics.csv", ctx.rows)
    seconds = previous + time.perf_counter() - t0
    result = dict(
        experiment=experiment.id, title=experiment.title, claim=experiment.claim,
        verdict=verdict.verdict, criterion=verdict.criterion, paper=experiment.paper,
        measured=verdict.measured, numbers=verdict.numbers, figures=verdict.figures,
        notes=verdict.notes, source=experiment.source, profile=profile, seeds=cfg.seeds,
        config=config_to_dict(cfg), git_sha=git_sha(), versions=dict(versions(), processes=lab_dist.world()),
        seconds=round(seconds, 2), started=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        command=" ".join(["bnlab"] + sys.argv[1:]) if sys.argv and "bnlab" in sys.argv[0] else None)
    atomic_write_json(out_dir / "result.json", result)
    ctx.log(f"{verdict.verdict.upper()}: {verdict.measured}  ({seconds:.1f}s)")
    return result
