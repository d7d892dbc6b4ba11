r"""NoisyBatchNorm: BN followed by non-stationary noise (Santurkar et al. 2018, App. Alg. 1).

To ask whether BN's benefit comes from stabilizing layer-input distributions, Santurkar et al.
add *time-varying* noise after BN so that every layer's input distribution shifts at every step
— more ICS than without BN — and observe the network still trains like BN. Per step t (each
training forward) and unit c::

    μ_t ~ U(−n_μ, n_μ),  σ_t ~ U(1, n_σ)                 (the step's shift and scale)

and per sample i (for convolutions every (n, h, w) position counts as a sample)::

    m ~ U(μ_t − r_μ, μ_t + r_μ),   s ~ N(σ_t, r_σ),   a_ic ← s·a_ic + m

with n_μ = 0.5, n_σ = 1.25, r_μ = r_σ = 0.1, applied to the BN output a = γx̂ + β, in training
only. The noise values are constants for the gradient.

**The random numbers** are a function of (``noise_seed``, step t, position): the counter-based
generator Philox4x32-10 (Salmon, Moraes, Dror & Shaw 2011, "Parallel random numbers: as easy as
1, 2, 3" — the generator of cuRAND and of torch's CUDA streams) keyed by the seed. Logical
element e of the (N, C, *) tensor (row-major index) belongs to pair j = ⌊e/2⌋; the block
Philox(counter = (j, t), key = seed) gives four 32-bit words w₀…w₃, and with U(w) = ⌊w/2⁸⌋·2⁻²⁴::

    z_2j, z_2j+1 = √(−2 ln(U(w₀) + 2⁻²⁴)) · (cos θ, sin θ),  θ = 2π·U(w₁)   (Box–Muller)
    v_2j, v_2j+1 = U(w₂), U(w₃)
    s = σ_t + r_σ·z,   m = μ_t − r_μ + 2r_μ·v

and unit c's μ_t = (2U(w₀) − 1)·n_μ, σ_t = 1 + U(w₁)·(n_σ − 1) from the counter (c, 2³²−1, t). So
the noise never consumes a global random stream, does not depend on memory layout, thread count
or device, is reproduced from two integers (saved as the module's extra state: a resumed run
continues the same noise), and the compiled CPU kernel draws it inside the pass that applies it.
:func:`nonstationary_noise` below is that definition in torch ops (any device); the kernel is
held equal to it in the tests.
"""

from __future__ import annotations

import math
import operator
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..batchnorm import BatchNorm1d, BatchNorm2d
from ..kernels import dispatch

__all__ = ["NoisyBatchNorm1d", "NoisyBatchNorm2d", "add_nonstationary_noise", "nonstationary_noise", "noise_draws",
           "philox4x32"]

_MASK32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57          # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85          # its key increments (Weyl sequence)
_U24 = 2.0 ** -24
_CHUNK = 1 << 22                            # values drawn at a time by the torch-op definition


def _mulhilo(a: Tensor, M: int) -> Tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit halves of a·M for int64 a holding 32-bit values: in 16-bit pieces of M so
    that no product leaves int64's range."""
    low = a * (M & 0xFFFF)                                    # < 2⁴⁸
    high = a * (M >> 16)                                      # < 2⁴⁸
    mid = low + ((high & 0xFFFF) << 16)                       # a·M = (high >> 16)·2³² + mid
    return (high >> 16) + (mid >> 32), mid & _MASK32


def philox4x32(counter: Tuple[Tensor, Tensor, Tensor, Tensor], key: Tuple[int, int],
               rounds: int = 10) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-``rounds`` (Salmon et al. 2011) of four int64 tensors holding 32-bit words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(rounds):
        h0, l0 = _mulhilo(c0, _M0)
        h1, l1 = _mulhilo(c2, _M1)
        c0, c1, c2, c3 = h1 ^ c1 ^ k0, l1, h0 ^ c3 ^ k1, l0
        k0, k1 = (k0 + _W0) & _MASK32, (k1 + _W1) & _MASK32
    return c0, c1, c2, c3


def _uniform(w: Tensor, dtype: torch.dtype) -> Tensor:
    return (w >> 8).to(dtype) * _U24                          # [0, 1) on a 2⁻²⁴ grid, exact


def _float(device) -> torch.dtype:
    """float64 where the device has it (the definition's Box–Muller), else float32."""
    return torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64


def noise_draws(first: int, n: int, seed: int, step: int, device=None) -> Tuple[Tensor, Tensor]:
    """(z, v) float32 for the logical elements first … first + n − 1: z standard normal, v uniform
    on [0, 1) (the module docstring's definition)."""
    seed, step = _uint64(seed, "seed"), _uint64(step, "step")
    key = (seed & _MASK32, seed >> 32)
    t0, t1 = step & _MASK32, step >> 32
    f = _float(device)
    j = torch.arange(first // 2, (first + n + 1) // 2, dtype=torch.int64, device=device)       # the pairs
    w = philox4x32((j & _MASK32, j >> 32, torch.full_like(j, t0), torch.full_like(j, t1)), key)
    r = torch.sqrt(-2 * torch.log(_uniform(w[0], f) + _U24))
    theta = 2 * math.pi * _uniform(w[1], f)
    lo = first % 2
    z = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), 1).flatten()[lo:lo + n].float()
    v = torch.stack((_uniform(w[2], f), _uniform(w[3], f)), 1).flatten()[lo:lo + n].float()
    return z, v


def nonstationary_noise(shape, seed: int, step: int, n_mu: float = 0.5, n_sigma: float = 1.25,
                        r_mu: float = 0.1, r_sigma: float = 0.1, device=None) -> Tuple[Tensor, Tensor]:
    """The step's noise (s, m), each float32 of ``shape`` = (N, C, *), contiguous (the definition
    in the module docstring, in torch ops)."""
    shape = tuple(shape)
    C, total = shape[1], math.prod(shape)
    seed, step = _uint64(seed, "seed"), _uint64(step, "step")
    key = (seed & _MASK32, seed >> 32)
    t0, t1 = step & _MASK32, step >> 32
    f = _float(device)
    c = torch.arange(C, dtype=torch.int64, device=device)
    w = philox4x32((c, torch.full_like(c, _MASK32), torch.full_like(c, t0), torch.full_like(c, t1)), key)
    mu0 = ((2 * _uniform(w[0], f) - 1) * n_mu - r_mu).float()                # μ_t − r_μ, per unit
    sigma = (1 + _uniform(w[1], f) * (n_sigma - 1)).float()                   # σ_t
    z = torch.empty(total, dtype=torch.float32, device=device)
    v = torch.empty(total, dtype=torch.float32, device=device)
    for first in range(0, total, _CHUNK):              # int64 temporaries bounded to a chunk's
        n = min(_CHUNK, total - first)
        z[first:first + n], v[first:first + n] = noise_draws(first, n, seed, step, device)
    unit = (1, C) + (1,) * (len(shape) - 2)
    return sigma.view(unit) + r_sigma * z.view(shape), mu0.view(unit) + 2 * r_mu * v.view(shape)


def _uint64(n, what: str) -> int:
    """A seed or step as the generator's unsigned 64-bit word (negative n: its two's complement)."""
    if isinstance(n, torch.Generator):
        raise TypeError("the noise is drawn from (seed, step) by a counter-based generator, not from a "
                        "torch.Generator: pass the layer's noise_seed and its step")
    n = operator.index(n)
    if not -(1 << 63) <= n < (1 << 64):
        raise ValueError(f"{what} must fit in 64 bits, got {n}")
    return n & 0xFFFFFFFFFFFFFFFF


def _int64(n, what: str = "seed") -> int:
    """The same 64 bits as a signed integer (what the kernel takes)."""
    n = _uint64(n, what)
    return n - (1 << 64) if n >= 1 << 63 else n


class _NoiseFn(torch.autograd.Function):
    """s·a + m on the compiled kernel (the noise drawn inside the pass); gradient dy·s."""

    @staticmethod
    def forward(ctx, a, module, seed, step, n_mu, n_sigma, r_mu, r_sigma):
        y, s = module.nonstationary_noise(a, seed, step, n_mu, n_sigma, r_mu, r_sigma, a.requires_grad)
        ctx.module = module
        ctx.save_for_backward(s)
        return y

    @staticmethod
    def backward(ctx, dy):
        s, = ctx.saved_tensors
        if torch.is_grad_enabled() or dy.stride() != s.stride() or type(dy) is not Tensor:
            da = dy * s.to(dy.dtype)                     # a graph of the backward, or another layout
        else:
            da = ctx.module.noise_grad(dy, s)
        return da, None, None, None, None, None, None, None


def add_nonstationary_noise(a: Tensor, seed: int, step: int, n_mu: float = 0.5, n_sigma: float = 1.25,
                            r_mu: float = 0.1, r_sigma: float = 0.1) -> Tensor:
    """a (N, C, *) → s·a + m with the noise of (seed, step) (see the module docstring). The noise
    is float32; the product is formed in a's dtype (float32 for half precision)."""
    if a.dim() < 2:
        raise ValueError(f"noise needs input (N, C, ...), got shape {tuple(a.shape)}")
    seed, step = _int64(seed, "seed"), _int64(step, "step")
    module = dispatch.compiled_for(a, "nonstationary_noise") if a.dtype in (torch.float32, torch.float64) else None
    if module is not None and dispatch._dense(a):
        return _NoiseFn.apply(a, module, seed, step, n_mu, n_sigma, r_mu, r_sigma)
    s, m = nonstationary_noise(a.shape, seed, step, n_mu, n_sigma, r_mu, r_sigma, a.device)
    dtype = a.dtype if a.dtype in (torch.float32, torch.float64) else torch.float32
    return torch.addcmul(m.to(dtype), a.to(dtype), s.to(dtype)).to(a.dtype)


class _NoisyMixin:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 *, n_mu: float = 0.5, n_sigma: float = 1.25, r_mu: float = 0.1, r_sigma: float = 0.1,
                 noise_seed: int = 0, batchnorm: bool = True, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.n_mu, self.n_sigma, self.r_mu, self.r_sigma = n_mu, n_sigma, r_mu, r_sigma
        _uint64(noise_seed, "noise_seed")
        self.noise_seed = operator.index(noise_seed)
        self.batchnorm = batchnorm          # False: noise only (Santurkar's "standard + noise")
        # training forwards so far (the counter's step): a buffer, so that it moves with the module
        # and DataParallel's first replica advances the original's; saved as extra state
        self.register_buffer("_noise_step", torch.zeros((), dtype=torch.int64, device=device), persistent=False)

    @property
    def noise_step(self) -> int:
        return int(self._noise_step)

    @noise_step.setter
    def noise_step(self, step: int) -> None:
        self._noise_step.fill_(_int64(step, "step"))

    @property
    def _eval_is_bn(self) -> bool:
        """Eval adds no noise: BN's output, unless the layer is noise alone (batchnorm=False)."""
        return self.batchnorm

    def reseed(self, seed: Optional[int] = None) -> None:
        """Restart the noise stream at step 0 — of ``seed`` (which becomes the layer's
        ``noise_seed``), or of the layer's ``noise_seed``."""
        if seed is not None:
            _uint64(seed, "seed")
            self.noise_seed = operator.index(seed)
        self.noise_step = 0

    def forward(self, input: Tensor) -> Tensor:
        out = super().forward(input) if self.batchnorm else input
        if self.training:
            out = add_nonstationary_noise(out, self.noise_seed, self.noise_step, self.n_mu, self.n_sigma,
                                          self.r_mu, self.r_sigma)
            self._noise_step.add_(1)
        return out

    def get_extra_state(self):
        return {"noise_seed": self.noise_seed, "noise_step": self.noise_step}

    def set_extra_state(self, state) -> None:
        if not state:
            return
        if "noise_step" in state and "noise_seed" in state:
            _uint64(state["noise_seed"], "seed")
            self.noise_seed, self.noise_step = operator.index(state["noise_seed"]), state["noise_step"]
        elif "generator" in state:          # a torch.Generator's stream (bnlab 0.2 and before): not continued
            warnings.warn("NoisyBatchNorm: this checkpoint's noise came from a torch.Generator, which this "
                          "version no longer uses; the noise restarts at the layer's noise_seed", stacklevel=2)
            self.noise_step = 0
        else:
            raise ValueError(f"NoisyBatchNorm: unrecognized extra state {sorted(state)}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        extra = prefix + "_extra_state"
        if extra in missing_keys:            # a plain BN checkpoint: keep the current noise stream
            missing_keys.remove(extra)

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", noise=(n_mu={self.n_mu}, n_sigma={self.n_sigma}, "
                f"r_mu={self.r_mu}, r_sigma={self.r_sigma}, seed={self.noise_seed})"
                + ("" if self.batchnorm else ", batchnorm=False"))


class NoisyBatchNorm1d(_NoisyMixin, BatchNorm1d):
    """BatchNorm1d followed by Santurkar's non-stationary noise (training only)."""


class NoisyBatchNorm2d(_NoisyMixin, BatchNorm2d):
    """BatchNorm2d followed by Santurkar's non-stationary noise; H, W count as samples."""
