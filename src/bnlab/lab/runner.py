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
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

import numpy as np
import torch

from .._progress import Progress
from .._version import __version__
from ..errors import DataError
from . import data as data_mod
from .config import config_to_dict, parse_overrides
from .._files import FileLock, LockBusy, clear_directory
from ..errors import UsageError
from .io import atomic_torch_save, atomic_write_json, atomic_write_text, read_json, write_metrics_csv
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


@contextmanager
def thread_limits(threads: int):
    """Every thread pool the run can use set to ``threads``: torch's intra-op pool and the BLAS
    libraries loaded in the process (NumPy's OpenBLAS reads OMP/OPENBLAS_NUM_THREADS only when it
    loads, which ``import bnlab`` has already done). Without this, ``bnlab run`` and ``bnlab
    reproduce`` (which sets those variables for its children) summed in different orders and
    differed in the 4th digit."""
    from threadpoolctl import threadpool_limits
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        with threadpool_limits(limits=max(1, int(threads))):
            yield
    finally:
        torch.set_num_threads(before)


def _unit_seed(experiment: str, unit: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{experiment}/{unit}".encode()).digest()[:4], "little")


def _load_unit(path: Path) -> dict:
    """A unit's checkpoint, read with weights_only=True: tensors and plain containers only, so a
    file planted in ``state/`` cannot run code when a run is resumed."""
    import pickle
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise DataError(f"--resume: {path} is not a checkpoint this run wrote ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); delete it, or rerun without "
                        f"--resume") from None


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
            data = data_mod.load(d.name, d.path or (self.data_dir if d.name == "mnist" else None))
            widths = getattr(self.cfg, "widths", None)
            if widths and (widths[0] != data.num_features or widths[-1] < data.num_classes):
                raise UsageError(
                    f"widths={','.join(map(str, widths))} do not fit {d.name} at {data.source}: its "
                    f"images have {data.num_features} values and its labels {data.num_classes} classes; "
                    f"--set widths={data.num_features},...,{data.num_classes}")
            self._data = data
        return self._data

    def record(self, step: int, seed: int, arm: str, metric: str, value: float, layer: Optional[str] = None) -> None:
        """One measurement; ``layer`` names the layer a per-layer metric belongs to (stored as
        ``metric@layer`` in metrics.csv's tidy rows)."""
        self.rows.append(dict(step=int(step), seed=int(seed), arm=str(arm),
                              metric=str(metric) if layer is None else f"{metric}@{layer}", value=float(value)))

    def _index(self) -> dict:
        """(metric, arm, seed) → [(step, value)] sorted by step, rebuilt when rows were added."""
        if getattr(self, "_indexed", -1) != len(self.rows):
            index: dict = {}
            for r in self.rows:
                index.setdefault((r["metric"], r["arm"], r["seed"]), []).append((r["step"], r["value"]))
            for v in index.values():
                v.sort(key=lambda sv: sv[0])
            self._index_cache, self._indexed = index, len(self.rows)
        return self._index_cache

    def select(self, metric: str, arm: Optional[str] = None, seed: Optional[int] = None,
               step: Optional[int] = None) -> list[dict]:
        return [r for r in self.rows if r["metric"] == metric and (arm is None or r["arm"] == arm)
                and (seed is None or r["seed"] == seed) and (step is None or r["step"] == step)]

    def series(self, metric: str, arm: str, seed: int, layer: Optional[str] = None) -> tuple[list[int], list[float]]:
        """(steps, values) of one seed's metric (of ``layer``, for per-layer metrics)."""
        pairs = self._index().get((metric if layer is None else f"{metric}@{layer}", arm, seed), [])
        return [s for s, _ in pairs], [v for _, v in pairs]

    def layers(self, metric: str, arm: str) -> list[str]:
        """The layers a per-layer metric was recorded for in ``arm``, in recording order."""
        prefix, seen = metric + "@", {}
        for (m, a, _seed) in self._index():
            if a == arm and m.startswith(prefix):
                seen.setdefault(m[len(prefix):], None)
        return list(seen)

    def at(self, metric: str, arm: str, step: int) -> list[float]:
        """The metric at ``step``, one value per seed in seed order (nan where a seed has none)."""
        out = []
        for seed in self.seeds:
            steps, values = self.series(metric, arm, seed)
            out.append(values[steps.index(step)] if step in steps else float("nan"))
        return out

    def seed_means(self, metric: str, arm: str) -> list[float]:
        """The metric averaged over its recorded steps, one value per seed (nan where none)."""
        out = []
        for seed in self.seeds:
            values = self.series(metric, arm, seed)[1]
            out.append(statistics.fmean(values) if values else float("nan"))
        return out

    def final(self, metric: str, arm: str) -> list[float]:
        """The metric's value at its last recorded step, one per seed in seed order (nan where a
        seed has none, so arms stay paired by seed)."""
        out = []
        for seed in self.seeds:
            values = self.series(metric, arm, seed)[1]
            out.append(values[-1] if values else float("nan"))
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
        saved = _load_unit(path) if (self.resume and path.exists()) else None
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


# Files in an experiment directory that belong to whoever launched the run, not to the run:
# ``bnlab reproduce`` writes the child's output to log.txt, so clearing the directory keeps it.
_LAUNCHER_FILES = ("log.txt",)


def run_experiment(eid: str, profile: str = "quick", out: str | Path = "runs", seeds: Optional[int] = None,
                   overrides: Sequence[str] | dict = (), resume: bool = False, data_dir: Optional[str] = None,
                   progress: bool = True, hooks: Sequence[Callable[[str, int], None]] = (),
                   log: Callable[[str], None] = print) -> dict:
    """Run one experiment end to end and write its directory; returns result.json's content.

    The directory ``out/<id>`` is locked for the run (a second run on it fails at once, naming the
    first); a symbolic link there is refused, never followed. On failure the traceback is written
    to ``out/<id>/error.txt`` before the exception propagates.
    """
    from . import dist as lab_dist
    distributed = lab_dist.init_from_env()
    try:
        result = _run_locked(eid, profile, out, seeds, overrides, resume, data_dir, progress, hooks, log)
        # every rank leaves the group together, once rank 0 has analyzed and written: a rank that
        # tore its gloo group down while rank 0 still held the connections aborted (SIGABRT) once
        # in a test run, after all its work was done
        lab_dist.barrier()
        return result
    finally:
        if distributed:
            lab_dist.shutdown()


def _run_locked(eid, profile, out, seeds, overrides, resume, data_dir, progress, hooks, log) -> dict:
    from . import dist as lab_dist
    experiment = get(eid)
    out_dir = Path(out) / experiment.id
    if out_dir.is_symlink():
        raise UsageError(f"{out_dir} is a symbolic link (to {os.readlink(out_dir)}); bnlab does not write "
                         f"or clear results through a link: remove it or choose another --out")
    if not lab_dist.is_main():
        return _run_experiment(experiment, profile, out_dir, seeds, overrides, resume, data_dir, progress,
                               hooks, log)
    try:
        with FileLock(Path(out) / f".{experiment.id}.lock", f"bnlab run {experiment.id} --out {out}"):
            return _run_experiment(experiment, profile, out_dir, seeds, overrides, resume, data_dir,
                                   progress, hooks, log)
    except LockBusy as e:
        raise UsageError(f"another bnlab run is writing {out_dir} ({e}): wait for it to finish or "
                         f"choose another --out") from None


def _check_resumable(out_dir: Path, cfg: Any) -> float:
    """Seconds already spent, after checking that ``out_dir`` was started with this very config
    (config.json is written before the first unit runs, so a killed run has it)."""
    saved = out_dir / "config.json"
    state = out_dir / "state"
    has_state = state.is_dir() and any(state.glob("*.pt"))
    if not saved.exists():
        if has_state:
            raise UsageError(f"--resume: {out_dir} has checkpoints but no config.json to check them "
                             f"against; rerun without --resume to start over")
        return 0.0
    if read_json(saved) != json.loads(json.dumps(config_to_dict(cfg))):
        raise UsageError(f"--resume: {out_dir} was started with a different config (see its "
                         f"config.json); rerun with the same --profile/--set/--seeds, or without "
                         f"--resume to start over")
    progress_file = state / "elapsed.json"
    return read_json(progress_file)["seconds"] if progress_file.exists() else 0.0


def _run_experiment(experiment, profile, out_dir: Path, seeds, overrides, resume, data_dir, progress, hooks,
                    log) -> dict:
    from . import dist as lab_dist
    main = lab_dist.is_main()
    ov = parse_overrides(overrides) if not isinstance(overrides, dict) else dict(overrides)
    if seeds is not None:
        ov["seeds"] = seeds
    cfg = experiment.config(profile, ov)
    previous = 0.0
    if main:
        if out_dir.exists() and not resume:
            clear_directory(out_dir, keep=_LAUNCHER_FILES)
        elif resume:
            previous = _check_resumable(out_dir, cfg)
            (out_dir / "error.txt").unlink(missing_ok=True)
    lab_dist.barrier()
    out_dir.mkdir(parents=True, exist_ok=True)
    if main:
        atomic_write_json(out_dir / "config.json", config_to_dict(cfg))
    ctx = RunContext(experiment, cfg, out_dir, resume, data_dir, progress, hooks, log)
    started = time.time()
    ctx.started_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))
    t0 = time.perf_counter()
    try:
        with thread_limits(cfg.threads):
            return _run_and_write(experiment, profile, cfg, ctx, out_dir, previous, started, t0)
    except (Exception, KeyboardInterrupt):
        if main:                                  # the traceback survives the process (reproduce reads it)
            import traceback
            atomic_write_text(out_dir / "error.txt", traceback.format_exc())
        raise


def _run_and_write(experiment, profile, cfg, ctx, out_dir: Path, previous: float, started: float,
                   t0: float) -> dict:
    from . import dist as lab_dist
    main = lab_dist.is_main()
    progress_file = out_dir / "state" / "elapsed.json"
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
    write_metrics_csv(out_dir / "metrics.csv", ctx.rows)
    seconds = previous + time.perf_counter() - t0
    v = verdict.to_dict()
    result = dict(
        experiment=experiment.id, title=experiment.title, claim=experiment.claim,
        verdict=verdict.verdict, rule=v["rule"], parts=v["parts"], checks=v["checks"],
        criterion=verdict.criterion, paper=experiment.paper, departures=verdict.departures,
        measured=verdict.measured, numbers=verdict.numbers, figures=verdict.figures,
        notes=verdict.notes, source=experiment.source, profile=profile, seeds=cfg.seeds,
        criteria_hashes={p.id: p.hash for p in verdict.parts},
        config=config_to_dict(cfg), git_sha=git_sha(), versions=dict(versions(), processes=lab_dist.world()),
        seconds=round(seconds, 2), started=ctx.started_iso,
        command=" ".join(["bnlab"] + sys.argv[1:]) if sys.argv and "bnlab" in sys.argv[0] else None)
    atomic_write_json(out_dir / "result.json", result)
    ctx.log(f"{verdict.verdict.upper()}: {verdict.measured}  ({seconds:.1f}s)")
    return result
