r"""Population statistics for inference (Ioffe & Szegedy 2015, Algorithm 2), exactly.

At test time BN must normalize with statistics of the training *population*, not of the test
batch. Training only leaves an exponential moving average behind, which lags the weights and
is noisy at small batch sizes. :func:`population_statistics` replaces it by the exact estimate:
it runs the model over training batches, measures every BN layer's input, and writes

    E[x]   = (1/n) Σ x                      over all n values per feature seen
    Var[x] = M2 / (n − 1)                    (correction="unbiased"; M2/n with "biased")

where (n, mean, M2) are merged batch by batch with Chan et al.'s update in float64, weighting
every batch by its number of values per feature (N·H·W for convolutions). This pooled estimate
does not depend on how the data are split into batches. ``estimator="algorithm2"`` gives the
paper's literal formula instead — E_B[μ_B] and m/(m−1)·E_B[σ²_B], batches weighted by their size
— which omits the spread of the batch means between batches; the two agree in expectation
for i.i.d. batches and differ by O(1/m) on a given data set.

Upstream layers. With ``upstream="batch"`` (default) the model runs in training mode, as in
training and in Algorithm 2: every BN layer normalizes with the batch's own statistics while its
input is measured (dropout and other train-mode behaviour stay active; the global RNG is
forked, so training's random stream is not advanced). With ``upstream="population"`` the model
runs in eval mode and the layers are measured in order of their BN depth — layers whose inputs
depend on no other BN layer first, then those depending only on them, … — each depth's
statistics fixed before the next is measured. The result is exactly the statistics of the
inference network, independent of the batch split, at the cost of one pass per depth. Depths
are found by a one-batch probe that tags each BN output and asks autograd which tags reach each
BN input; if that probe cannot run, layers are measured one per pass in execution order.

Everything the function changes (training flags, buffers while measuring, hooks, RNG) is
restored in ``finally`` — on error the model is exactly as it was. Under ``torch.distributed``
the per-rank (n, mean, M2) are all-gathered and merged in rank order, so every rank ends with
bit-identical statistics equal to the single-process estimate over the union of the data.
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import Tensor, nn

from .options import Estimator, Upstream, VarCorrection
from ._progress import Progress
from .batchnorm import is_batchnorm
from .errors import BnlabError, ModeError
from .isolation import isolated
from .definition import batch_moments, merge_moments, values_per_channel

__all__ = ["population_statistics", "train_eval_gap", "PopulationMoments", "LayerStatistics",
           "default_forward", "batchnorm_layers"]

ESTIMATORS = ("pooled", "algorithm2")
UPSTREAM = ("batch", "population")
CORRECTIONS = ("unbiased", "biased")


# ----------------------------------------------------------------------------------------------
# Moments of the population: (count, mean, M2) per channel and Algorithm 2's sums, merged exactly
# ----------------------------------------------------------------------------------------------

@dataclass
class PopulationMoments:
    """Per-channel count n, mean and M2 = Σ(x − mean)², in float64.

    Also accumulates Algorithm 2's literal sums: Σ_B m_B·μ_B, Σ_B m_B·σ²_B (biased),
    Σ_B m_B·m_B/(m_B − 1)·σ²_B (unbiased per batch), Σ_B m_B over batches with m_B > 1.
    """

    count: float
    mean: Tensor
    m2: Tensor
    batches: int = 0
    alg2_weight: float = 0.0
    alg2_var_biased: Optional[Tensor] = None
    alg2_var_unbiased: Optional[Tensor] = None

    @staticmethod
    def empty(channels: int) -> "PopulationMoments":
        z = torch.zeros(channels, dtype=torch.float64)
        return PopulationMoments(0.0, z.clone(), z.clone(), 0, 0.0, z.clone(), z.clone())

    @staticmethod
    @torch.no_grad()
    def of_batch(x: Tensor) -> "PopulationMoments":
        """Two-pass moments of one batch x (N, C, *) in float64."""
        x = x.detach().to(torch.float64)
        m = values_per_channel(x)
        mean, biased = batch_moments(x)
        m2 = biased * m
        unbiased = m2 / (m - 1) if m > 1 else torch.zeros_like(m2)
        weight = float(m) if m > 1 else 0.0
        return PopulationMoments(float(m), mean, m2, 1, weight, biased * weight, unbiased * weight)

    def merge(self, other: "PopulationMoments") -> "PopulationMoments":
        """Chan's parallel update (bnlab.definition.merge_moments): exact for any split of the data."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        counts = torch.tensor([[self.count], [other.count]], dtype=torch.float64)
        n, mean, m2 = merge_moments(counts, torch.stack([self.mean, other.mean]), torch.stack([self.m2, other.m2]))
        return PopulationMoments(float(n[0]), mean, m2, self.batches + other.batches,
                       self.alg2_weight + other.alg2_weight,
                       self.alg2_var_biased + other.alg2_var_biased,
                       self.alg2_var_unbiased + other.alg2_var_unbiased)

    def estimate(self, estimator: Estimator = "pooled", correction: VarCorrection = "unbiased") -> tuple[Tensor, Tensor]:
        """(E[x], Var[x]) by the pooled formula or Algorithm 2's literal one."""
        if self.count == 0:
            raise BnlabError("no values were measured for this layer")
        if estimator == "pooled":
            denom = self.count - 1 if correction == "unbiased" else self.count
            return self.mean, self.m2 / max(denom, 1.0)
        if self.alg2_weight == 0:
            raise BnlabError("Algorithm 2 needs batches with more than one value per feature")
        acc = self.alg2_var_unbiased if correction == "unbiased" else self.alg2_var_biased
        return self.mean, acc / self.alg2_weight

    # flat float64 form for torch.distributed
    def pack(self) -> Tensor:
        head = torch.tensor([self.count, float(self.batches), self.alg2_weight], dtype=torch.float64)
        return torch.cat([head, self.mean, self.m2, self.alg2_var_biased, self.alg2_var_unbiased])

    @staticmethod
    def unpack(flat: Tensor, channels: int) -> "PopulationMoments":
        c = channels
        count, batches, w = flat[0].item(), int(flat[1].item()), flat[2].item()
        mean, m2 = flat[3:3 + c].clone(), flat[3 + c:3 + 2 * c].clone()
        vb, vu = flat[3 + 2 * c:3 + 3 * c].clone(), flat[3 + 3 * c:3 + 4 * c].clone()
        return PopulationMoments(count, mean, m2, batches, w, vb, vu)


@dataclass
class LayerStatistics:
    """What population_statistics measured for one BN layer."""

    name: str
    count: int                      # values per feature measured (Σ over batches of N·H·W)
    batches: int
    mean: Tensor                    # E[x] (float64)
    var: Tensor                     # Var[x] (float64)
    depth: Optional[int] = None     # BN depth (upstream="population")
    previous_mean: Optional[Tensor] = None
    previous_var: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------
# Model plumbing
# ----------------------------------------------------------------------------------------------

def default_forward(model: nn.Module, batch: Any) -> Any:
    """How a batch reaches the model: a tensor → model(x); (x, y, ...) → model(x); dict → model(**d)."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise BnlabError("an empty tuple/list batch: pass forward=... to say how it reaches the model")
        return model(batch[0])
    if isinstance(batch, dict):
        return model(**batch)
    raise BnlabError(f"cannot feed a batch of type {type(batch).__name__} to the model: pass "
                     f"forward=lambda model, batch: ... to population_statistics")


def batchnorm_layers(model: nn.Module, include_frozen: bool = False) -> "OrderedDict[str, nn.Module]":
    """BN layers (torch.nn's and bnlab's) that keep running statistics, by qualified name."""
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not is_batchnorm(m) or id(m) in seen:
            continue
        seen.add(id(m))
        if m.running_mean is None or m.running_var is None:
            continue                                     # track_running_stats=False: nothing to set
        if getattr(m, "frozen", False) and not include_frozen:
            continue
        found[name or "<root>"] = m
    return found


class _SkipBatch(BaseException):
    """Raised from a hook to abandon a batch with one value per feature (no statistics)."""


class _StopForward(BaseException):
    """Raised from a hook once every layer measured in this pass has seen the batch."""


@contextmanager
def _preserved(model: nn.Module):
    """Training flags, buffers and RNG as they were, on exit (bnlab.isolation.isolated)."""
    with isolated(model):
        yield


def _iterate(batches: Iterable, num_batches: Optional[int]) -> Iterator:
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            return
        yield batch


def _total(batches: Iterable, num_batches: Optional[int]) -> Optional[int]:
    n = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    if num_batches is not None:
        return num_batches if n is None else min(n, num_batches)
    return n


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

def _measure_pass(model: nn.Module, batches: Iterable, layers: "OrderedDict[str, nn.Module]",
                  forward: Callable, num_batches: Optional[int], progress: bool, desc: str,
                  stop_after: Optional[int] = None, keep_batch_moments: bool = False,
                  skip_single: bool = True,
                  ) -> tuple[dict[str, PopulationMoments], dict[str, list[PopulationMoments]], int]:
    """One pass over the batches, recording each listed layer's input moments.

    ``skip_single``: abandon batches with one value per feature (a train-mode model cannot
    normalize them); in eval mode they are ordinary data and are merged like any other.
    """
    totals = {name: PopulationMoments.empty(m.num_features) for name, m in layers.items()}
    per_batch: dict[str, list[PopulationMoments]] = {name: [] for name in layers}
    pending: dict[str, PopulationMoments] = {}
    calls = [0]

    def make_hook(name: str, module: nn.Module):
        def hook(mod, args):
            x = args[0]
            if skip_single and values_per_channel(x) == 1:
                raise _SkipBatch
            if x.shape[1] != module.num_features:
                raise ModeError(f"{name}: input has {x.shape[1]} channels, the layer {module.num_features}")
            if x.numel() > 0:
                moments = PopulationMoments.of_batch(x)
                pending[name] = pending[name].merge(moments) if name in pending else moments
            calls[0] += 1
            if stop_after is not None and calls[0] >= stop_after:
                raise _StopForward
        return hook

    handles = [m.register_forward_pre_hook(make_hook(name, m)) for name, m in layers.items()]
    skipped = 0
    try:
        with torch.no_grad():
            for batch in Progress(_iterate(batches, num_batches), total=_total(batches, num_batches),
                                  desc=desc, enabled=progress, unit="batch"):
                pending.clear()
                calls[0] = 0
                try:
                    forward(model, batch)
                except _SkipBatch:
                    skipped += 1
                    continue
                except _StopForward:
                    pass
                for name, moments in pending.items():
                    totals[name] = totals[name].merge(moments)
                    if keep_batch_moments:
                        per_batch[name].append(moments)
    finally:
        for h in handles:
            h.remove()
    return totals, per_batch, skipped


def _allreduce_moments(totals: dict[str, PopulationMoments], layers: "OrderedDict[str, nn.Module]",
                       process_group=None) -> dict[str, PopulationMoments]:
    """Gather every rank's moments and merge them in rank order (identical on all ranks)."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return totals
    world = dist.get_world_size(process_group)
    if world == 1:
        return totals
    names = list(layers)
    flat = torch.cat([totals[n].pack() for n in names])
    device = torch.device("cpu")
    if dist.get_backend(process_group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flat = flat.to(device)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=process_group)
    merged: dict[str, PopulationMoments] = {}
    for rank_flat in gathered:
        rank_flat = rank_flat.cpu()
        offset = 0
        for n in names:
            c = layers[n].num_features
            size = 3 + 4 * c
            m = PopulationMoments.unpack(rank_flat[offset:offset + size], c)
            merged[n] = merged[n].merge(m) if n in merged else m
            offset += size
    return merged


def _bn_depths(model: nn.Module, batch: Any, layers: "OrderedDict[str, nn.Module]",
               forward: Callable) -> tuple["OrderedDict[str, int]", dict[str, int]]:
    """BN depth of each layer: 0 if its input depends on no BN layer, else 1 + max over those.

    Tags each BN output with ``output + tag`` (tag: a zero scalar requiring grad) and asks
    autograd which tags each BN input's graph reaches. Returns (depths, calls per forward).
    Raises ModeError if the layers cannot be ordered.
    """
    tags = {name: torch.zeros((), dtype=torch.float64, requires_grad=True) for name in layers}
    inputs: dict[str, list[Tensor]] = {name: [] for name in layers}
    order: list[str] = []

    def pre_hook(name):
        def hook(mod, args):
            inputs[name].append(args[0])
            if name not in order:
                order.append(name)
        return hook

    def post_hook(name):
        def hook(mod, args, out):
            return out + tags[name].to(out.dtype)
        return hook

    handles = []
    for name, m in layers.items():
        handles.append(m.register_forward_pre_hook(pre_hook(name)))
        handles.append(m.register_forward_hook(post_hook(name)))
    try:
        with torch.enable_grad():
            forward(model, batch)
        depth: "OrderedDict[str, int]" = OrderedDict()
        tag_names = list(tags)
        for name in order:
            deps: set[str] = set()
            for x in inputs[name]:
                if not x.requires_grad:
                    continue
                grads = torch.autograd.grad(x.sum(), [tags[t] for t in tag_names],
                                            retain_graph=True, allow_unused=True)
                deps |= {t for t, g in zip(tag_names, grads) if g is not None}
            if name in deps:
                raise ModeError(f"{name} feeds its own input (a BN layer called in a loop): "
                                f"upstream='population' cannot order it; use upstream='batch'")
            missing = [d for d in deps if d not in depth]
            if missing:
                raise ModeError(f"{name} depends on BN layers measured after it: {missing}")
            depth[name] = 1 + max((depth[d] for d in deps), default=-1)
        return depth, {name: len(inputs[name]) for name in layers}
    finally:
        for h in handles:
            h.remove()


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def population_statistics(model: nn.Module, batches: Iterable, *, num_batches: Optional[int] = None,
                          forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                          correction: VarCorrection = "unbiased", progress: bool = True,
                          upstream: Upstream = "batch", estimator: Estimator = "pooled",
                          process_group: Optional[Any] = None) -> "OrderedDict[str, LayerStatistics]":
    """Set every BN layer's running_mean/running_var to exact population statistics.

    Args:
        model: any module holding torch.nn or bnlab batch-norm layers (mixed is fine).
        batches: training batches (a DataLoader, a list...); re-iterable for upstream="population".
        num_batches: use at most this many batches.
        forward: ``forward(model, batch)``; default: tensor → model(x), (x, y) → model(x),
            dict → model(**batch).
        correction: "unbiased" (Algorithm 2: n/(n−1)) or "biased".
        progress: show a progress bar on stderr.
        upstream: "batch" (upstream BN layers use batch statistics, as in training) or
            "population" (measure depth by depth: the exact inference network's statistics).
        estimator: "pooled" (Chan-merged over all values, split-invariant) or "algorithm2"
            (the paper's E_B[μ_B], m/(m−1)·E_B[σ²_B]).
        process_group: torch.distributed group to merge over (default: the world, if initialized).

    Returns:
        OrderedDict name → LayerStatistics, in execution order. Layers that never ran keep
        their statistics (a warning names them); frozen bnlab layers and layers without running
        statistics are left alone. A model without BN layers is a no-op (with a warning).

    Raises:
        ValueError: for bad options or an empty ``batches``.
        BnlabError: when every batch had a single value per feature (batches of one are
            skipped: their statistics are undefined).
    """
    if correction not in CORRECTIONS:
        raise ValueError(f"correction must be one of {CORRECTIONS}, got {correction!r}")
    if upstream not in UPSTREAM:
        raise ValueError(f"upstream must be one of {UPSTREAM}, got {upstream!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    forward = forward or default_forward
    layers = batchnorm_layers(model)
    if not layers:
        warnings.warn("population_statistics: the model has no batch-norm layer with running "
                      "statistics; nothing to do", stacklevel=2)
        return OrderedDict()
    if upstream == "population" and iter(batches) is batches:   # a one-shot iterator
        batches = list(_iterate(batches, num_batches))
        num_batches = None

    with _preserved(model):
        if upstream == "batch":
            model.train()
            totals, _, skipped = _measure_pass(model, batches, layers, forward, num_batches,
                                               progress, "population statistics")
            totals = _allreduce_moments(totals, layers, process_group)
            depths: dict[str, Optional[int]] = {name: None for name in layers}
            estimates = _estimates(totals, layers, estimator, correction, skipped)
        else:
            estimates, depths = _population_mode(model, batches, layers, forward, num_batches,
                                                 progress, estimator, correction, process_group)
    # the buffers are restored; now write the estimates
    result: "OrderedDict[str, LayerStatistics]" = OrderedDict()
    with torch.no_grad():
        for name, (moments, mean, var) in estimates.items():
            m = layers[name]
            previous = (m.running_mean.detach().double().clone(), m.running_var.detach().double().clone())
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            result[name] = LayerStatistics(name, int(moments.count), moments.batches, mean, var,
                                           depths.get(name), *previous)
    never = [n for n in layers if n not in estimates]
    if never:
        warnings.warn(f"population_statistics: these BN layers never ran and keep their "
                      f"statistics: {never}", stacklevel=2)
    return result


def _estimates(totals: dict[str, PopulationMoments], layers, estimator: str, correction: str,
               skipped: int) -> "OrderedDict[str, tuple[PopulationMoments, Tensor, Tensor]]":
    out: "OrderedDict[str, tuple[PopulationMoments, Tensor, Tensor]]" = OrderedDict()
    measured = [n for n, m in totals.items() if m.count > 0]
    if not measured:
        if skipped:
            raise BnlabError(f"all {skipped} batches had a single value per feature: batch "
                             f"statistics of one value are undefined; use batches of ≥ 2")
        raise ValueError("population_statistics got no batches: pass a non-empty loader")
    for name in measured:
        mean, var = totals[name].estimate(estimator, correction)
        out[name] = (totals[name], mean, var)
    if skipped:
        warnings.warn(f"population_statistics skipped {skipped} batch(es) with a single value "
                      f"per feature", stacklevel=3)
    return out


def _population_mode(model, batches, layers, forward, num_batches, progress, estimator,
                     correction, process_group):
    """Measure depth by depth with the model in eval mode; fix each depth before the next."""
    model.eval()
    first = next(iter(_iterate(batches, num_batches)), None)
    if first is None:
        raise ValueError("population_statistics got no batches: pass a non-empty loader")
    calls: dict[str, int] = {}
    try:
        depths, calls = _bn_depths(model, first, layers, forward)
    except ModeError:
        raise
    except Exception as e:   # the probe could not run (no autograd graph...): one layer per pass
        warnings.warn(f"BN depth probe failed ({e}); measuring one layer per pass", stacklevel=3)
        order: list[str] = []
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: order.append(n) if n not in order else None)
                 for n, m in layers.items()]
        try:
            with torch.no_grad():
                forward(model, first)
        finally:
            for h in hooks:
                h.remove()
        depths = OrderedDict((n, i) for i, n in enumerate(order))
    estimates: "OrderedDict[str, tuple[PopulationMoments, Tensor, Tensor]]" = OrderedDict()
    for level in sorted(set(depths.values())):
        names = [n for n, d in depths.items() if d == level]
        level_layers = OrderedDict((n, layers[n]) for n in names)
        # Nothing after this depth's layers matters in this pass: stop the forward once they
        # have all seen the batch (when the probe showed each runs exactly once per forward).
        once = all(calls.get(n) == 1 for n in names)
        totals, _, skipped = _measure_pass(model, batches, level_layers, forward, num_batches,
                                           progress, f"population statistics, BN depth {level}",
                                           stop_after=len(names) if once else None,
                                           skip_single=False)
        totals = _allreduce_moments(totals, level_layers, process_group)
        level_estimates = _estimates(totals, level_layers, estimator, correction, skipped)
        with torch.no_grad():     # fix this depth before measuring the next
            for n, (_, mean, var) in level_estimates.items():
                layers[n].running_mean.copy_(mean.to(layers[n].running_mean.dtype))
                layers[n].running_var.copy_(var.to(layers[n].running_var.dtype))
        estimates.update(level_estimates)
    return estimates, dict(depths)


# ----------------------------------------------------------------------------------------------
# Diagnostics
# ----------------------------------------------------------------------------------------------

@dataclass
class GapReport:
    """Per BN layer: running vs population statistics, and typical batch vs population."""

    rows: list[dict] = field(default_factory=list)

    def __str__(self) -> str:
        head = (f"{'layer':<28} {'|run-pop| mean/σ':>17} {'|log run/pop var|':>18} "
                f"{'|batch-pop| mean/σ':>19} {'|log batch/pop var|':>20}")
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(f"{r['layer']:<28} {r['running_mean_shift']:>17.4f} "
                         f"{r['running_var_log_ratio']:>18.4f} {r['batch_mean_shift']:>19.4f} "
                         f"{r['batch_var_log_ratio']:>20.4f}")
        return "\n".join(lines)


def train_eval_gap(model: nn.Module, batches: Iterable, *, num_batches: Optional[int] = None,
                   forward: Optional[Callable] = None, progress: bool = False) -> GapReport:
    """How far each BN layer's running statistics are from its population statistics.

    Measures with upstream="batch" (as in training), changes nothing in the model, and reports
    per layer (averaged over channels, in units of the population std σ):

      running_mean_shift     mean |running_mean − E[x]| / σ
      running_var_log_ratio  mean |log(running_var / Var[x])|
      batch_mean_shift       mean over batches of mean |μ_B − E[x]| / σ      (typical batch)
      batch_var_log_ratio    mean over batches of mean |log(s²_B / Var[x])|  (unbiased s²_B)

    A running statistic much farther from the population than a typical batch is (ratio ≫ 1)
    is the signature of a stale EMA; recalibrate with population_statistics.
    """
    forward = forward or default_forward
    layers = batchnorm_layers(model)
    report = GapReport()
    if not layers:
        return report
    with _preserved(model):
        model.train()
        totals, per_batch, skipped = _measure_pass(model, batches, layers, forward, num_batches,
                                                   progress, "train/eval gap", keep_batch_moments=True)
    for name, m in layers.items():
        t = totals[name]
        if t.count < 2:
            continue
        mean, var = t.estimate("pooled", "unbiased")
        std = var.clamp_min(1e-12).sqrt()
        running_mean = m.running_mean.detach().double()
        running_var = m.running_var.detach().double().clamp_min(1e-12)
        batch_shift = [((b.mean - mean).abs() / std).mean().item() for b in per_batch[name]]
        batch_var = [(torch.log((b.m2 / (b.count - 1)).clamp_min(1e-12) / var.clamp_min(1e-12))
                      .abs().mean().item()) for b in per_batch[name] if b.count > 1]
        report.rows.append(dict(
            layer=name,
            running_mean_shift=((running_mean - mean).abs() / std).mean().item(),
            running_mean_shift_max=((running_mean - mean).abs() / std).max().item(),
            running_var_log_ratio=torch.log(running_var / var.clamp_min(1e-12)).abs().mean().item(),
            batch_mean_shift=float(sum(batch_shift) / len(batch_shift)) if batch_shift else math.nan,
            batch_var_log_ratio=float(sum(batch_var) / len(batch_var)) if batch_var else math.nan,
            batches=len(per_batch[name]), count=int(t.count)))
    return report
