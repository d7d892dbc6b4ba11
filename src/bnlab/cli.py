"""The ``bnlab`` command line."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from ._version import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bnlab",
        description="Batch Normalization from the math to the measurement.")
    parser.add_argument("--version", action="version", version=f"bnlab {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: BNLAB_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="train a small sigmoid MLP on MNIST with and without BN")
    demo.add_argument("--steps", type=int, default=3000)
    demo.add_argument("--data-dir", default=None)
    demo.set_defaults(func=_demo)

    lst = sub.add_parser("list", help="the lab's experiments and the claims they test")
    lst.set_defaults(func=_list)

    run = sub.add_parser("run", help="run one experiment: DIR/<id>/result.json, metrics.csv, figures")
    run.add_argument("experiment", help="experiment id, e.g. E1")
    _add_run_args(run)
    run.add_argument("--seeds", type=int, default=None, help="number of seeds (overrides the profile)")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field (typed), e.g. --set steps=2000 --set data.path=DIR")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its checkpoints")
    run.add_argument("--nproc", type=int, default=1,
                     help="train in N processes (torchrun, gloo, DDP + SyncBatchNorm); one result directory")
    run.set_defaults(func=_run)

    rep = sub.add_parser("reproduce", help="run every experiment and write report.html and summary.md")
    _add_run_args(rep)
    rep.add_argument("--only", default=None, help="comma-separated experiment ids, e.g. E1,E3")
    rep.add_argument("--resume", action="store_true", help="keep finished experiments, resume the rest")
    rep.add_argument("--jobs", type=int, default=None,
                     help="experiments run in parallel processes (default: min(2, CPUs))")
    rep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field in every experiment that has it")
    rep.add_argument("--executor", default="local", choices=["local", "ray"],
                     help="local: --jobs child processes here; ray: one Ray task per experiment (bnlab[ray])")
    rep.add_argument("--ray-address", default=None,
                     help="the Ray cluster to use (default: RAY_ADDRESS, else a local Ray instance)")
    rep.set_defaults(func=_reproduce)

    crit = sub.add_parser("criteria", help="the lab's declared verdict criteria, their hashes and lock status")
    crit.add_argument("--lock", action="store_true",
                      help="write docs/results/criteria.lock (a changed criterion needs its criteria-changes.md entry)")
    crit.add_argument("--only", default=None, help="comma-separated experiment ids")
    crit.set_defaults(func=_criteria)

    rec = sub.add_parser("recalibrate", help="replace a checkpoint's running BN statistics by exact "
                                             "population statistics over the training data")
    rec.add_argument("checkpoint", help="a lab checkpoint, a state_dict (with --model), or a pickled "
                                        "nn.Module (with --trust-checkpoint)")
    rec.add_argument("--out", required=True, help="where to write the recalibrated checkpoint")
    rec.add_argument("--data", default="mnist", choices=["mnist", "idx"])
    rec.add_argument("--data-dir", default=None)
    rec.add_argument("--batch-size", type=int, default=None,
                     help="batch size of the statistics pass (default: the checkpoint's training batch, else 60)")
    rec.add_argument("--num-batches", type=int, default=None)
    rec.add_argument("--upstream", default="population", choices=["population", "batch"])
    rec.add_argument("--estimator", default="pooled", choices=["pooled", "algorithm2"])
    rec.add_argument("--correction", default="unbiased", choices=["unbiased", "biased"])
    rec.add_argument("--input-shape", default=None, help="e.g. 784 or 1,28,28 (default: detected)")
    rec.add_argument("--model", default=None, metavar="MODULE:FUNCTION",
                     help="a function returning the nn.Module the checkpoint's state_dict loads into "
                          "(MODULE importable from here, or a file.py)")
    rec.add_argument("--loader", default=None, metavar="MODULE:FUNCTION",
                     help="a function returning the training batches (a DataLoader), instead of --data")
    rec.add_argument("--eval-loader", default=None, metavar="MODULE:FUNCTION",
                     help="with --loader: (x, y) batches for the accuracy before/after")
    rec.add_argument("--trust-checkpoint", action="store_true",
                     help="allow a whole pickled nn.Module: loading it RUNS CODE from the file "
                          "(only for files you made); lab checkpoints never need it")
    rec.set_defaults(func=_recalibrate)

    from .bench import BENCHMARKS
    bench = sub.add_parser("bench", help="benchmarks, each against a baseline in the same process",
                           description="\n".join(f"{b.name}: {b.help}" for b in BENCHMARKS.values()),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("what", nargs="?", default="batchnorm", choices=list(BENCHMARKS),
                       help="which benchmark (default: batchnorm)")
    bench.add_argument("--threads", default=None,
                       help="comma-separated thread counts (default 1,2 for batchnorm, 2 for chain; the "
                            "other benchmarks use the last one)")
    bench.add_argument("--modes", default="fwd,fwdbwd,eval")
    bench.add_argument("--quick", action="store_true", help="small shapes, few repeats (a smoke run)")
    bench.add_argument("--block", type=int, default=5,
                       help="batchnorm: consecutive calls per implementation per turn (1: call-by-call alternation)")
    bench.add_argument("--malloc", choices=["default", "keep"], default="default",
                       help="batchnorm, passes: keep = glibc never returns freed memory to the OS, so torch's fresh "
                            "outputs do not page-fault (torch.nn at its best, as with jemalloc/tcmalloc)")
    bench.add_argument("--ablate", action="store_true",
                       help="chain: also time bnlab with dx-over-dy switched off, in the same turns")
    bench.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    bench.add_argument("--json", default=None, help="write the rows to this JSON file")
    bench.set_defaults(func=_bench)

    kern = sub.add_parser("kernels", help="the compiled CPU kernels and the Triton GPU kernels: status, build")
    kern.add_argument("--build", action="store_true",
                      help="compile the CPU kernels now (~1 minute, once per machine) instead of on first use")
    kern.add_argument("--verbose", action="store_true", help="show the compiler's output")
    kern.set_defaults(func=_kernels)
    return parser


def _kernels(args) -> int:
    import importlib.util
    import time
    from . import kernels
    print(f"CPU kernels: source {kernels.SOURCE}")
    print(f"  build directory {kernels.build_dir()}")
    if not kernels.enabled():
        print("  disabled by BNLAB_KERNELS=0")
    if args.build:
        t0 = time.perf_counter()
        try:
            kernels.build(verbose=args.verbose)
        except Exception as e:
            print(f"  build failed: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        print(f"  built (or loaded from the cache) in {time.perf_counter() - t0:.1f} s")
    mod = kernels.load()
    print(f"  status: {'available' if mod is not None else 'unavailable: ' + str(kernels.failure())}")
    info = kernels.cache_info()
    print(f"  pooled output memory: {info['regions']} regions, {info['bytes'] / 2**20:.1f} MiB "
          f"(cap {info['cap'] / 2**20:.0f} MiB, env BNLAB_KERNEL_CACHE_MB)")
    has_triton = importlib.util.find_spec("triton") is not None
    import torch
    gpu = torch.cuda.is_available()
    print(f"Triton kernels (CUDA tensors): triton {'installed' if has_triton else 'not installed'}, "
          f"CUDA {'available: ' + torch.cuda.get_device_name() if gpu else 'not available'}"
          + ("" if gpu else " — tested on CPU through TRITON_INTERPRET=1 (tests/test_triton.py)"))
    return 0 if mod is not None or not kernels.enabled() else 1


def _bench(args) -> int:
    from . import bench
    return bench.run(args.what, args)


def _add_run_args(p) -> None:
    p.add_argument("--profile", default="quick", choices=["tiny", "quick", "paper"],
                   help="quick: minutes, same mechanism; paper: the paper's scale where a CPU allows")
    p.add_argument("--out", default="runs", help="output directory (default: runs/)")
    p.add_argument("--data-dir", default=None, help="directory with the MNIST IDX files")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _criteria(args) -> int:
    from .lab import criteria as C
    from .lab.registry import all_parts
    if args.lock:
        parts = C.write_lock(all_parts())
        print(f"locked {len(parts)} criteria in {C.LOCK_PATH}")
        return 0
    only = {x.strip().upper() for x in args.only.split(",")} if args.only else None
    lock, changes = C.read_lock(), C.read_changes()
    stale = 0
    for pid, c, h in all_parts():
        if only and pid.split(".")[0] not in only:
            continue
        entry = lock.get(pid)
        if entry is None:
            status = "not locked"
        elif entry["hash"] == h:
            status = f"locked {entry['locked']}"
        elif h in changes.get(pid, []):
            status = "changed (recorded in criteria-changes.md; relock)"
        else:
            status = "CHANGED, NOT RECORDED"
            stale += 1
        print(f"{pid}  [{h}]  {status}\n    {c.claim}\n    {c.describe()}")
    return 1 if stale else 0


def _list(args) -> int:
    from .lab.registry import all_experiments
    for e in all_experiments():
        print(f"{e.id:>4}  {e.title}\n      claim: {e.claim}")
    return 0


def _run(args) -> int:
    if args.nproc > 1:
        import subprocess
        argv, skip = [], False
        for a in args._argv:                        # the same command, minus --nproc
            if skip:
                skip = False
                continue
            if a == "--nproc":
                skip = True
                continue
            if not a.startswith("--nproc="):
                argv.append(a)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "bnlab", *argv]
        return subprocess.run(cmd).returncode
    from pathlib import Path

    from .lab.runner import run_experiment
    result = run_experiment(args.experiment, profile=args.profile, out=args.out, seeds=args.seeds,
                            overrides=args.overrides, resume=args.resume, data_dir=args.data_dir,
                            progress=not args.quiet)
    if not result:                                  # a rank other than 0 under --nproc: rank 0 reports
        return 0
    where = Path(args.out) / result["experiment"]
    figures = len(result.get("figures", []))
    print(f"bnlab run: {result['experiment']} {result['verdict']}; wrote {where}/ (result.json, metrics.csv, "
          f"config.json, {figures} figure(s))")
    return 0


def _reproduce(args) -> int:
    from .lab.reproduce import reproduce
    only = [x.strip().upper() for x in args.only.split(",")] if args.only else None
    return reproduce(profile=args.profile, out=args.out, only=only, resume=args.resume,
                     data_dir=args.data_dir, jobs=args.jobs, overrides=args.overrides,
                     progress=not args.quiet, executor=args.executor, ray_address=args.ray_address)


def _recalibrate(args) -> int:
    from .lab.recalibrate import recalibrate
    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    recalibrate(args.checkpoint, args.out, data=args.data, data_dir=args.data_dir,
                batch_size=args.batch_size, num_batches=args.num_batches, upstream=args.upstream,
                estimator=args.estimator, correction=args.correction, input_shape=shape,
                trust_code=args.trust_checkpoint, model=args.model, loader=args.loader,
                eval_loader=args.eval_loader)
    return 0


def _demo(args) -> int:
    from .lab import demo
    demo.run(steps=args.steps, data_dir=args.data_dir)
    return 0


def _exit_status(e: BaseException) -> int:
    """2 for usage and data errors (the command cannot run as given: a bad argument or file, a
    directory that cannot be written), 1 for failures (including a disk that fills up)."""
    import errno
    from .errors import DataError, UsageError
    if isinstance(e, (UsageError, DataError)):
        return 2
    if isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT,
                                              errno.ENOTDIR, errno.EISDIR):
        return 2
    return 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line. Errors are one line, ``bnlab: error: <message>``, with exit status 2 for
    usage and data errors and 1 for failures; ``--debug`` or ``BNLAB_DEBUG=1`` shows the traceback."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)            # argparse's own usage errors: its message, status 2
    args._argv = argv
    if args.command is None:
        parser.print_help()
        return 0
    debug = args.debug or os.environ.get("BNLAB_DEBUG", "") not in ("", "0")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("bnlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        from .errors import BnlabError
        message = str(e).strip() or type(e).__name__
        if not isinstance(e, (BnlabError, OSError)):
            message = f"{type(e).__name__}: {message} (--debug shows where)"
        print(f"bnlab: error: {' '.join(message.split())}", file=sys.stderr)
        return _exit_status(e)


if __name__ == "__main__":
    sys.exit(main())
