"""The lab's models: MLPs whose independent seeds train as one batched computation.

An experiment with S seeds builds one model whose every weight has a leading seed axis: a
linear layer holds W (S, in, out) and multiplies (S, N, in) activations with one batched
matmul; a normalization layer built for S·C features sees the (S, N, C) activations as
(N, S·C), so each seed's features get their own statistics. Seeds never mix: losses are summed
over seeds (so each seed's gradient is its own loss's), and the optimizers used (SGD with
momentum/weight decay, Adam) act elementwise. Training S seeds this way costs one Python step
instead of S — the difference between minutes and an hour for E1 at the paper's scale.

``to_plain(model, seed)`` extracts one seed as an ordinary ``nn.Sequential`` of nn.Linear and
bnlab layers, so the library's tools (population_statistics, fold, probes) apply to it, and
``save_checkpoint``/``load_checkpoint`` store it with the spec to rebuild it (``bnlab
recalibrate``).
"""

from __future__ import annotations

import math
import pickle
from typing import Any, Callable, Dict, Optional

import torch
from torch import Tensor, nn

from .. import batchnorm as bn_mod
from ..probes.base import register_activation
from ..errors import DataError
from .io import atomic_torch_save

__all__ = ["BatchedLinear", "SeedBatched", "Activation", "build_mlp", "build_cnn", "BatchedCNN", "to_plain", "NORMS",
           "register_norm", "init_weight", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "bnlab-model/1"


# ----------------------------------------------------------------------------------------------
# Initializations (Glorot & Bengio 2010; He et al. 2015)
# ----------------------------------------------------------------------------------------------

def init_weight(shape: tuple[int, ...], fan_in: int, fan_out: int, scheme: str, std: float,
                generator: torch.Generator) -> Tensor:
    """normal: N(0, std²) (Ioffe Fig. 1's "small Gaussian"); standard: U[±1/√fan_in];
    glorot: U[±√(6/(fan_in+fan_out))]; he: N(0, 2/fan_in)."""
    if scheme == "normal":
        return torch.randn(shape, generator=generator) * std
    if scheme == "standard":
        a = 1.0 / math.sqrt(fan_in)
        return (torch.rand(shape, generator=generator) * 2 - 1) * a
    if scheme == "glorot":
        a = math.sqrt(6.0 / (fan_in + fan_out))
        return (torch.rand(shape, generator=generator) * 2 - 1) * a
    if scheme == "he":
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
    raise ValueError(f"unknown init {scheme!r}: normal, standard, glorot or he")


# ----------------------------------------------------------------------------------------------
# Seed-batched layers
# ----------------------------------------------------------------------------------------------

class BatchedLinear(nn.Module):
    """y[s] = x[s] @ W[s] + b[s] for S seeds. W (S, in, out), b (S, 1, out).

    Shape: (S, N, in) → (S, N, out); a shared (N, in) input broadcasts to every seed.
    """

    def __init__(self, seeds: int, in_features: int, out_features: int, bias: bool = True,
                 init: str = "normal", std: float = 0.1, generators: Optional[list] = None) -> None:
        super().__init__()
        self.seeds, self.in_features, self.out_features = seeds, in_features, out_features
        gens = generators or [torch.Generator().manual_seed(s) for s in range(seeds)]
        w = torch.stack([init_weight((in_features, out_features), in_features, out_features,
                                     init, std, g) for g in gens])
        self.weight = nn.Parameter(w)                                     # S, in, out
        self.bias = nn.Parameter(torch.zeros(seeds, 1, out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:                                                  # shared input
            y = torch.matmul(x, self.weight)                              # S, N, out
            return y + self.bias if self.bias is not None else y
        if self.bias is not None:
            return torch.baddbmm(self.bias, x, self.weight)
        return torch.bmm(x, self.weight)

    def extra_repr(self) -> str:
        return f"seeds={self.seeds}, {self.in_features} → {self.out_features}, bias={self.bias is not None}"


class SeedBatched(nn.Module):
    """Apply a per-feature layer built for S·C features to (S, N, C): each seed its own stats."""

    def __init__(self, layer: nn.Module, seeds: int) -> None:
        super().__init__()
        self.layer, self.seeds = layer, seeds

    def forward(self, x: Tensor) -> Tensor:
        S, N, C = x.shape
        y = self.layer(x.transpose(0, 1).reshape(N, S * C))               # N, S·C
        return y.view(N, S, C).transpose(0, 1)                            # S, N, C


class Activation(nn.Module):
    FUNCS: Dict[str, Callable[[Tensor], Tensor]] = {
        "sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu,
        "softsign": nn.functional.softsign, "identity": lambda x: x,
    }

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in self.FUNCS:
            raise ValueError(f"unknown activation {name!r}: {sorted(self.FUNCS)}")
        self.name = name

    def forward(self, x: Tensor) -> Tensor:
        return self.FUNCS[self.name](x)

    def extra_repr(self) -> str:
        return self.name


register_activation(Activation, lambda module: module.name)      # the probes see it as an activation


# Normalization layers by name: factory(num_features, seeds, **kwargs) -> module on (N, C).
# ``seeds`` is how many seeds share the layer (its features are S contiguous blocks of C); a
# per-feature layer ignores it, a layer that couples features (ℓp, whitening) must not couple
# blocks.
def _norms() -> Dict[str, Callable[..., nn.Module]]:
    from .. import variants as V
    return {
        "bn": lambda c, seeds=1, **kw: bn_mod.BatchNorm1d(c, **kw),
        "torch_bn": lambda c, seeds=1, **kw: nn.BatchNorm1d(c, **kw),
        "detached_mean": lambda c, seeds=1, **kw: V.DetachedNorm(c, center=True, scale=False, **kw),
        "detached_meanstd": lambda c, seeds=1, **kw: V.DetachedNorm(c, center=True, scale=True, **kw),
        "noisy_bn": lambda c, seeds=1, **kw: V.NoisyBatchNorm1d(c, **kw),
        "noise_only": lambda c, seeds=1, **kw: V.NoisyBatchNorm1d(c, batchnorm=False, **kw),
        "lp1": lambda c, seeds=1, **kw: V.LpNorm1d(c, p=1, groups=seeds, **kw),
        "lp2": lambda c, seeds=1, **kw: V.LpNorm1d(c, p=2, groups=seeds, **kw),
        "lpinf": lambda c, seeds=1, **kw: V.LpNorm1d(c, p="inf", groups=seeds, **kw),
        "ghost": lambda c, seeds=1, **kw: V.GhostBatchNorm1d(c, **kw),
        "renorm": lambda c, seeds=1, **kw: V.BatchRenorm1d(c, **kw),
        # whitening groups of ``group_size`` features: a multiple of it per seed keeps seeds apart
        "zca": lambda c, seeds=1, group_size=20, **kw: V.DecorrelatedBatchNorm(c, whitening="zca", group_size=group_size, **kw),
        "pca": lambda c, seeds=1, group_size=20, **kw: V.DecorrelatedBatchNorm(c, whitening="pca", group_size=group_size, **kw),
        "pca_aligned": lambda c, seeds=1, group_size=20, **kw: V.DecorrelatedBatchNorm(
            c, whitening="pca_aligned", group_size=group_size, **kw),
        "pca_stablegrad": lambda c, seeds=1, group_size=20, **kw: V.DecorrelatedBatchNorm(
            c, whitening="pca_stablegrad", group_size=group_size, **kw),
        "iternorm": lambda c, seeds=1, group_size=20, **kw: V.IterNorm(c, group_size=group_size, **kw),
    }


NORMS: Dict[str, Callable[..., nn.Module]] = _norms()
_NOISY = ("noisy_bn", "noise_only")              # norms drawing random noise: one stream per layer


def register_norm(name: str, factory: Callable[..., nn.Module]) -> None:
    NORMS[name] = factory


class MLPBlock(nn.Module):
    """linear → (norm) → activation, with an optional identity shortcut: act(h + f(h))."""

    def __init__(self, linear: nn.Module, norm: Optional[nn.Module], activation: str,
                 residual: bool = False) -> None:
        super().__init__()
        self.linear, self.norm, self.act = linear, norm, Activation(activation)
        self.residual = residual

    def pre_activation(self, h: Tensor) -> Tensor:
        z = self.linear(h)
        if self.norm is not None:
            z = self.norm(z)
        return h + z if self.residual else z

    def forward(self, h: Tensor) -> Tensor:
        return self.act(self.pre_activation(h))


class BatchedMLP(nn.Module):
    """Seed-batched MLP: blocks of linear → norm → activation, then a linear readout.

    Input (N, in) shared by all seeds or (S, N, in); output (S, N, classes).
    """

    def __init__(self, spec: dict, seeds: int) -> None:
        super().__init__()
        self.spec, self.seeds = dict(spec), seeds
        widths = list(spec["widths"])
        norm = spec.get("norm", "none")
        norm_kwargs = dict(spec.get("norm_kwargs", {}))
        residual_from = spec.get("residual_from", None)      # first block index with shortcuts
        gens = [torch.Generator().manual_seed(int(spec.get("init_seed", 0)) * 1000 + s) for s in range(seeds)]
        blocks = []
        for i, (fan_in, fan_out) in enumerate(zip(widths[:-2], widths[1:-1])):
            has_norm = norm != "none"
            linear = BatchedLinear(seeds, fan_in, fan_out, bias=not has_norm or not spec.get("drop_bias", True),
                                   init=spec.get("init", "normal"), std=spec.get("init_std", 0.1),
                                   generators=gens)
            kwargs = dict(norm_kwargs)
            if norm in _NOISY:                   # independent noise per layer (and per init_seed)
                kwargs.setdefault("noise_seed", 1000 * int(spec.get("init_seed", 0)) + i)
            layer = SeedBatched(NORMS[norm](seeds * fan_out, seeds=seeds, **kwargs), seeds) \
                if has_norm else None
            residual = residual_from is not None and i >= residual_from and fan_in == fan_out
            blocks.append(MLPBlock(linear, layer, spec.get("activation", "sigmoid"), residual))
        self.blocks = nn.ModuleList(blocks)
        self.readout = BatchedLinear(seeds, widths[-2], widths[-1], bias=True,
                                     init=spec.get("init", "normal"), std=spec.get("init_std", 0.1),
                                     generators=gens)

    def forward(self, x: Tensor, capture: Optional[list] = None) -> Tensor:
        h = x
        for block in self.blocks:
            z = block.pre_activation(h)
            if capture is not None:
                capture.append(z)
            h = block.act(z)
        return self.readout(h)


def build_mlp(spec: dict, seeds: int) -> BatchedMLP:
    """spec: widths, activation, norm (a NORMS key or "none"), norm_kwargs, init, init_std,
    init_seed, residual_from, drop_bias (BN makes the preceding bias redundant, Ioffe §3.2)."""
    return BatchedMLP(spec, seeds)


# ----------------------------------------------------------------------------------------------
# Seed-batched convolutional nets (He et al. 2015, §4.2's CIFAR design, scaled to MNIST)
# ----------------------------------------------------------------------------------------------

class BatchedCNN(nn.Module):
    """S seeds of a He-et-al.-style CNN in one computation: every convolution is grouped by seed
    (groups = S over S·C channels) and every BN normalizes S·C channels, each seed its own.

    A 3×3 stem to ``widths[0]`` channels, then one stage per width with ``blocks`` basic blocks
    each — two 3×3 conv → BN → ReLU layers, the second's ReLU after the (optional) identity
    shortcut (option A: the shortcut of a downsampling block subsamples and zero-pads channels, so
    plain and residual nets have the same parameters) — stride 2 at each new stage, then global
    average pooling and a linear readout per seed. Depth: 2·blocks·stages + 2 layers.

    Input (S, N, H·W) flat images (each seed its own batch) or (N, H·W) shared; output (S, N, K).
    """

    def __init__(self, spec: dict, seeds: int) -> None:
        super().__init__()
        self.spec, self.seeds = dict(spec), seeds
        S = seeds
        widths, self.side = list(spec["widths"]), int(spec.get("side", 28))
        self.pool = int(spec.get("pool", 1))                    # average-pool the input first (CPU budget)
        bn, self.residual = spec.get("norm", "bn") == "bn", bool(spec.get("residual", False))
        gens = [torch.Generator().manual_seed(int(spec.get("init_seed", 0)) * 1000 + s) for s in range(S)]

        def conv(cin: int, cout: int, stride: int) -> nn.Conv2d:
            layer = nn.Conv2d(S * cin, S * cout, 3, stride=stride, padding=1, groups=S, bias=not bn)
            with torch.no_grad():                               # He init per seed: N(0, 2/fan_in)
                std = math.sqrt(2.0 / (cin * 9))
                layer.weight.copy_(torch.cat([torch.randn((cout, cin, 3, 3), generator=g) * std for g in gens]))
                if layer.bias is not None:
                    layer.bias.zero_()
            return layer

        def norm(c: int) -> nn.Module:
            return bn_mod.BatchNorm2d(S * c) if bn else nn.Identity()

        self.stem, self.stem_norm = conv(1, widths[0], 1), norm(widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(int(spec["blocks"])):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(nn.ModuleDict(dict(conv1=conv(cin, w, stride), norm1=norm(w),
                                                 conv2=conv(w, w, 1), norm2=norm(w))))
                blocks[-1].shape = (cin, w, stride)
                cin = w
        self.blocks = nn.ModuleList(blocks)
        self.readout = BatchedLinear(S, cin, int(spec.get("classes", 10)), init="standard", generators=gens)

    def _shortcut(self, h: Tensor, cin: int, cout: int, stride: int) -> Tensor:
        if stride == 1 and cin == cout:
            return h
        N, _, H, W = h.shape
        h = h[:, :, ::stride, ::stride].reshape(N, self.seeds, cin, *h.shape[2:] if stride == 1 else
                                                h[:, :, ::stride, ::stride].shape[2:])
        pad = torch.zeros(N, self.seeds, cout - cin, *h.shape[3:], dtype=h.dtype, device=h.device)
        return torch.cat([h, pad], dim=2).reshape(N, self.seeds * cout, *h.shape[3:])

    def forward(self, x: Tensor) -> Tensor:
        S, side = self.seeds, self.side
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(S, -1, -1)
        N = x.shape[1]
        h = x.transpose(0, 1).reshape(N, S, side, side)                          # N, S, H, W
        if self.pool > 1:
            h = nn.functional.avg_pool2d(h, self.pool)
        h = torch.relu(self.stem_norm(self.stem(h)))
        for block in self.blocks:
            cin, cout, stride = block.shape
            z = torch.relu(block["norm1"](block["conv1"](h)))
            z = block["norm2"](block["conv2"](z))
            if self.residual:
                z = z + self._shortcut(h, cin, cout, stride)
            h = torch.relu(z)
        C = h.shape[1] // S
        h = h.mean((2, 3)).view(N, S, C).transpose(0, 1)                          # S, N, C
        return self.readout(h)


def build_cnn(spec: dict, seeds: int) -> BatchedCNN:
    """spec: widths (one per stage), blocks (per stage), residual, norm ("bn" or "none"), pool,
    init_seed."""
    return BatchedCNN(spec, seeds)


# ----------------------------------------------------------------------------------------------
# One seed as an ordinary model; checkpoints
# ----------------------------------------------------------------------------------------------

class PlainBlock(nn.Module):
    def __init__(self, linear: nn.Linear, norm: Optional[nn.Module], activation: str, residual: bool):
        super().__init__()
        self.linear, self.norm, self.act, self.residual = linear, norm, Activation(activation), residual

    def forward(self, h: Tensor) -> Tensor:
        z = self.linear(h)
        if self.norm is not None:
            z = self.norm(z)
        return self.act(h + z if self.residual else z)


def build_plain(spec: dict) -> nn.Sequential:
    """The ordinary (unbatched) model of ``spec`` with default initialization."""
    return to_plain(BatchedMLP(spec, 1), 0)


@torch.no_grad()
def _slice_norm(norm: nn.Module, seed: int, channels: int, spec: dict, seeds: int) -> nn.Module:
    """The seed's own layer. Any tensor whose leading size is ``seeds`` × the single-seed layer's
    (per-feature vectors, per-seed scales, per-group whitening matrices) contributes the seed's
    block; everything else (scalars, counters) is copied."""
    sub = NORMS[spec["norm"]](channels, seeds=1, **dict(spec.get("norm_kwargs", {})))
    for name, t in list(norm.named_parameters(recurse=False)) + list(norm.named_buffers(recurse=False)):
        target = getattr(sub, name, None)
        if target is None or t is None:
            continue
        if t.dim() and target.dim() and t.shape[0] == seeds * target.shape[0] and t.shape[1:] == target.shape[1:]:
            k = target.shape[0]
            target.copy_(t[seed * k:(seed + 1) * k])
        else:
            target.copy_(t)
    if hasattr(norm, "get_extra_state") and type(norm).get_extra_state is not nn.Module.get_extra_state:
        sub.set_extra_state(norm.get_extra_state())
    return sub


@torch.no_grad()
def to_plain(model: BatchedMLP, seed: int) -> nn.Sequential:
    """Seed ``seed`` of a batched MLP as nn.Sequential(blocks..., nn.Linear) (same outputs)."""
    spec = model.spec
    layers = []
    for block in model.blocks:
        lin = block.linear
        linear = nn.Linear(lin.in_features, lin.out_features, bias=lin.bias is not None)
        linear.weight.copy_(lin.weight[seed].t())
        if lin.bias is not None:
            linear.bias.copy_(lin.bias[seed, 0])
        norm = _slice_norm(block.norm.layer, seed, lin.out_features, spec, model.seeds) \
            if block.norm is not None else None
        layers.append(PlainBlock(linear, norm, block.act.name, block.residual))
    ro = model.readout
    readout = nn.Linear(ro.in_features, ro.out_features)
    readout.weight.copy_(ro.weight[seed].t())
    readout.bias.copy_(ro.bias[seed, 0])
    layers.append(readout)
    plain = nn.Sequential(*layers)
    plain.train(model.training)
    return plain


def save_checkpoint(path, model: nn.Module, spec: dict, meta: dict) -> Any:
    """Save an ordinary model as {format, spec, state_dict, meta}; load with load_checkpoint."""
    atomic_torch_save(dict(format=CHECKPOINT_FORMAT, spec=spec, state_dict=model.state_dict(),
                           meta=meta), path)
    return path


def load_checkpoint(path, trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Load a lab checkpoint (rebuilt from its spec) or, with ``trust_code=True``, any
    torch.save'd module.

    Files are read with ``torch.load(weights_only=True)``: tensors and plain containers only, so
    a file cannot run code while it is read. A lab checkpoint is such a file. A whole pickled
    ``nn.Module`` is not — unpickling it imports and runs whatever the file names — so it loads
    only when the caller says the file is trusted (``bnlab recalibrate --trust-checkpoint``).

    Returns (model, info) where info holds "spec"/"meta" for lab checkpoints ({} otherwise).
    Raises DataError for a file that is neither, or that needs ``trust_code`` to load.
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_code:
            raise DataError(
                f"{path}: refusing to unpickle it — it holds Python objects beyond tensors (a whole "
                f"pickled nn.Module, or something else), and loading those runs code from the "
                f"file. If you made this file, pass --trust-checkpoint (API: trust_code=True); "
                f"otherwise save the model as a lab checkpoint or a state_dict") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise DataError(f"{path}: not a readable torch file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
    if isinstance(obj, nn.Module):
        return obj, {"kind": "module"}
    if isinstance(obj, dict) and {"trainer", "step", "rows"} <= set(obj):
        raise DataError(f"{path}: a run's resume state (a batch of seeds mid-training), not a model; the "
                        f"lab writes its trained networks as model_<arm>_seed<k>.pt in the experiment's "
                        f"directory")
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        model = build_plain(obj["spec"])
        model.load_state_dict(obj["state_dict"])
        return model, {"kind": "lab", "spec": obj["spec"], "meta": obj.get("meta", {})}
    raise DataError(f"{path}: not a bnlab lab checkpoint ({CHECKPOINT_FORMAT}) nor a torch.save'd "
                    f"nn.Module (a bare state_dict needs the model's code to rebuild it)")
