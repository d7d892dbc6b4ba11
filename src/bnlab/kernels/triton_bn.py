"""Triton kernels for Batch Normalization on GPUs: training forward, backward and eval, for
(N, C, *) contiguous (NCHW) and channels_last / (N, C) layouts.

The backend interface of bnlab.kernels (``forward_train``, ``forward_eval``,
``backward_train``), so the dispatch sends CUDA tensors here as it sends CPU tensors to C++. The design follows the memory floor: statistics and gradient sums in one
read of the tensor(s) — per (channel, chunk) partial (count, mean, M2) with the corrected
two-pass algorithm inside each block, merged exactly in float64 — and one elementwise pass for
the output (y = x·α + b, dx = dy·k1 + x·k2 + k3). Two addressing schemes: NCHW walks each
channel's contiguous runs; channels_last and (N, C) load [rows × channels] tiles so that loads
along the contiguous channel axis coalesce.

Tested on CPU through Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_triton.py);
benchmarked on a GPU by benchmarks/gpu_bench.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..definition import merge_moments, update_running_stats

__all__ = ["forward_train", "forward_eval", "backward_train", "supported"]

BLOCK = 1024
TILE_M, TILE_C = 32, 32


def _layout(x: Tensor) -> tuple[int, int, int, int, int, int, bool]:
    """(N, C, L, sN, sC, sL, rows): rows=True when channels are the contiguous axis."""
    N, C = x.shape[0], x.shape[1]
    L = x.numel() // max(1, N * C)
    if x.dim() == 2 or L == 1:
        return N, C, 1, C, 1, 0, True
    if x.is_contiguous():
        return N, C, L, C * L, L, 1, False
    # channels_last (3-D spatial or 2-D): element (n, c, l) sits at n·C·L + l·C + c
    return N, C, L, C * L, 1, C, True


def supported(x: Tensor) -> bool:
    return x.is_cuda or x.device.type == "cpu"


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@triton.jit
def _stats_ncl(x_ptr, cnt_ptr, mean_ptr, m2_ptr, L, C, sN, sC, per, total, K,
               BLOCK: tl.constexpr, ACC: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1)
    start = k * per
    stop = tl.minimum(start + per, total)
    acc = tl.zeros([BLOCK], dtype=ACC)
    for off in range(start, stop, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < stop
        v = tl.load(x_ptr + (i // L) * sN + c * sC + (i % L), mask=m, other=0.0).to(ACC)
        acc += v
    cnt = tl.maximum(stop - start, 0)
    mean = tl.sum(acc, axis=0) / tl.maximum(cnt, 1).to(ACC)
    dev = tl.zeros([BLOCK], dtype=ACC)
    dsum = tl.zeros([BLOCK], dtype=ACC)
    for off in range(start, stop, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < stop
        v = tl.load(x_ptr + (i // L) * sN + c * sC + (i % L), mask=m, other=0.0).to(ACC)
        d = tl.where(m, v - mean, 0.0)
        dsum += d
        dev += d * d
    ds = tl.sum(dsum, axis=0)
    n = tl.maximum(cnt, 1).to(ACC)
    tl.store(cnt_ptr + c * K + k, cnt.to(ACC))
    tl.store(mean_ptr + c * K + k, mean + ds / n)                       # corrected two-pass
    tl.store(m2_ptr + c * K + k, tl.sum(dev, axis=0) - ds * ds / n)


@triton.jit
def _stats_rows(x_ptr, cnt_ptr, mean_ptr, m2_ptr, M, C, per, K,
                TILE_M: tl.constexpr, TILE_C: tl.constexpr, ACC: tl.constexpr):
    cb = tl.program_id(0)
    k = tl.program_id(1)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    cm = cols < C
    start = k * per
    stop = tl.minimum(start + per, M)
    acc = tl.zeros([TILE_C], dtype=ACC)
    for r0 in range(start, stop, TILE_M):
        rows = r0 + tl.arange(0, TILE_M)
        m = (rows[:, None] < stop) & cm[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(ACC)
        acc += tl.sum(v, axis=0)
    cnt = tl.maximum(stop - start, 0)
    n = tl.maximum(cnt, 1).to(ACC)
    mean = acc / n
    dev = tl.zeros([TILE_C], dtype=ACC)
    dsum = tl.zeros([TILE_C], dtype=ACC)
    for r0 in range(start, stop, TILE_M):
        rows = r0 + tl.arange(0, TILE_M)
        m = (rows[:, None] < stop) & cm[None, :]
        v = tl.load(x_ptr + rows[:, None] * C + cols[None, :], mask=m, other=0.0).to(ACC)
        d = tl.where(m, v - mean[None, :], 0.0)
        dsum += tl.sum(d, axis=0)
        dev += tl.sum(d * d, axis=0)
    tl.store(cnt_ptr + cols * K + k, tl.zeros([TILE_C], dtype=ACC) + cnt.to(ACC), mask=cm)
    tl.store(mean_ptr + cols * K + k, mean + dsum / n, mask=cm)
    tl.store(m2_ptr + cols * K + k, dev - dsum * dsum / n, mask=cm)


@triton.jit
def _grad_sums_ncl(dy_ptr, x_ptr, mean_ptr, s1_ptr, s2_ptr, L, C, sN, sC, per, total, K,
                   BLOCK: tl.constexpr, ACC: tl.constexpr):
    c = tl.program_id(0)
    k = tl.program_id(1)
    mu = tl.load(mean_ptr + c).to(ACC)
    start = k * per
    stop = tl.minimum(start + per, total)
    a1 = tl.zeros([BLOCK], dtype=ACC)
    a2 = tl.zeros([BLOCK], dtype=ACC)
    for off in range(start, stop, BLOCK):
        i = off + tl.arange(0, BLOCK)
        m = i < stop
        addr = (i // L) * sN + c * sC + (i % L)
        g = tl.load(dy_ptr + addr, mask=m, other=0.0).to(ACC)
        v = tl.load(x_ptr + addr, mask=m, other=0.0).to(ACC)
        a1 += g
        a2 += tl.where(m, g * (v - mu), 0.0)
    tl.store(s1_ptr + c * K + k, tl.sum(a1, axis=0))
    tl.store(s2_ptr + c * K + k, tl.sum(a2, axis=0))


@triton.jit
def _grad_sums_rows(dy_ptr, x_ptr, mean_ptr, s1_ptr, s2_ptr, M, C, per, K,
                    TILE_M: tl.constexpr, TILE_C: tl.constexpr, ACC: tl.constexpr):
    cb = tl.program_id(0)
    k = tl.program_id(1)
    cols = cb * TILE_C + tl.arange(0, TILE_C)
    cm = cols < C
    mu = tl.load(mean_ptr + cols, mask=cm, other=0.0).to(ACC)
    start = k * per
    stop = tl.minimum(start + per, M)
    a1 = tl.zeros([TILE_C], dtype=ACC)
    a2 = tl.zeros([TILE_C], dtype=ACC)
    for r0 in range(start, stop, TILE_M):
        rows = r0 + tl.arange(0, TILE_M)
        m = (rows[:, None] < stop) & cm[None, :]
        addr = rows[:, None] * C + cols[None, :]
        g = tl.load(dy_ptr + addr, mask=m, other=0.0).to(ACC)
        v = tl.load(x_ptr + addr, mask=m, other=0.0).to(ACC)
        a1 += tl.sum(g, axis=0)
        a2 += tl.sum(tl.where(m, g * (v - mu[None, :]), 0.0), axis=0)
    tl.store(s1_ptr + cols * K + k, a1, mask=cm)
    tl.store(s2_ptr + cols * K + k, a2, mask=cm)


@triton.jit
def _affine(x_ptr, y_ptr, alpha_ptr, beta_ptr, n, C, c_div, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """y = x·α[c] + b[c] over the flat (dense) storage; c = (offset // c_div) % C."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    c = (o // c_div) % C
    x = tl.load(x_ptr + o, mask=m, other=0.0).to(ACC)
    a = tl.load(alpha_ptr + c, mask=m, other=0.0)
    b = tl.load(beta_ptr + c, mask=m, other=0.0)
    tl.store(y_ptr + o, (x * a + b).to(y_ptr.dtype.element_ty), mask=m)


@triton.jit
def _dx(dy_ptr, x_ptr, dx_ptr, k1_ptr, k2_ptr, k3_ptr, n, C, c_div, BLOCK: tl.constexpr, ACC: tl.constexpr):
    """dx = dy·k1[c] + x·k2[c] + k3[c]."""
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < n
    c = (o // c_div) % C
    g = tl.load(dy_ptr + o, mask=m, other=0.0).to(ACC)
    x = tl.load(x_ptr + o, mask=m, other=0.0).to(ACC)
    k1 = tl.load(k1_ptr + c, mask=m, other=0.0)
    k2 = tl.load(k2_ptr + c, mask=m, other=0.0)
    k3 = tl.load(k3_ptr + c, mask=m, other=0.0)
    tl.store(dx_ptr + o, (g * k1 + x * k2 + k3).to(dx_ptr.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

def _chunks(C: int, total: int, unit: int) -> int:
    """Programs per channel: enough to fill the device (~1024 programs), at least one unit each."""
    return max(1, min(triton.cdiv(1024, max(1, C)), triton.cdiv(total, unit)))


def _acc(x: Tensor) -> tuple[torch.dtype, object]:
    """Accumulation dtype (torch, triton): float64 for float64 inputs, float32 otherwise."""
    return (torch.float64, tl.float64) if x.dtype == torch.float64 else (torch.float32, tl.float32)


def _partial_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    N, C, L, sN, sC, sL, rows = _layout(x)
    total = N * L
    dev = x.device
    acc, ACC = _acc(x)
    if rows:
        K = _chunks(triton.cdiv(C, TILE_C), total, TILE_M)
        per = triton.cdiv(total, K)
        cnt, mean, m2 = (torch.empty(C, K, device=dev, dtype=acc) for _ in range(3))
        _stats_rows[(triton.cdiv(C, TILE_C), K)](x, cnt, mean, m2, total, C, per, K, TILE_M=TILE_M, TILE_C=TILE_C, ACC=ACC)
    else:
        K = _chunks(C, total, BLOCK)
        per = triton.cdiv(total, K)
        cnt, mean, m2 = (torch.empty(C, K, device=dev, dtype=acc) for _ in range(3))
        _stats_ncl[(C, K)](x, cnt, mean, m2, L, C, sN, sC, per, total, K, BLOCK=BLOCK, ACC=ACC)
    return cnt.double(), mean.double(), m2.double()


def _coeff(t: Optional[Tensor], C: int, fill: float, device) -> Tensor:
    return torch.full((C,), fill, dtype=torch.float64, device=device) if t is None else t.detach().double()


def _c_div(x: Tensor) -> int:
    N, C, L, sN, sC, sL, rows = _layout(x)
    return 1 if rows else L


def _elementwise_affine(x: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    acc, ACC = _acc(x)
    _affine[(triton.cdiv(n, BLOCK),)](x, y, alpha.to(acc).contiguous(), beta.to(acc).contiguous(), n,
                                      x.shape[1], _c_div(x), BLOCK=BLOCK, ACC=ACC)
    return y


def forward_train(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, act: int = 0,
                  slope: float = 0.0, running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                  momentum: float = 0.0, unbiased: bool = True):
    """(y, mean, var, invstd); updates the running statistics when given."""
    if act != 0:
        raise NotImplementedError("the Triton path fuses no activation")
    C = x.shape[1]
    _, mu, M2 = merge_moments(*_partial_stats(x), dim=1)         # the chunks' (n, μ, M2), exactly
    n = x.numel() // C                                   # values per channel, known on the host
    var = M2 / n
    invstd = torch.rsqrt(var + eps)
    alpha = invstd * _coeff(weight, C, 1.0, x.device)
    beta = _coeff(bias, C, 0.0, x.device) - mu * alpha
    y = _elementwise_affine(x, alpha, beta)
    update_running_stats(running_mean, running_var, mu, var, n, momentum, "unbiased" if unbiased else "biased")
    acc, _ = _acc(x)
    return y, mu.to(acc), var.to(acc), invstd.to(acc)


def forward_eval(x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Optional[Tensor],
                 bias: Optional[Tensor], eps: float, act: int = 0, slope: float = 0.0) -> Tensor:
    if act != 0:
        raise NotImplementedError("the Triton path fuses no activation")
    C = x.shape[1]
    invstd = torch.rsqrt(running_var.double() + eps)
    alpha = invstd * _coeff(weight, C, 1.0, x.device)
    beta = _coeff(bias, C, 0.0, x.device) - running_mean.double() * alpha
    return _elementwise_affine(x, alpha, beta)


def backward_train(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Optional[Tensor]):
    """(dx, dγ, dβ) of training-mode BN (bnlab.kernels.torch_ops.backward_train derives the form)."""
    if dy.stride() != x.stride() or dy.dtype != x.dtype:
        dy = torch.empty_like(x).copy_(dy)               # x's dtype and (dense) memory layout
    N, C, L, sN, sC, sL, rows = _layout(x)
    total = N * L
    acc, ACC = _acc(x)
    mean_acc = mean.to(acc).contiguous()
    if rows:
        K = _chunks(triton.cdiv(C, TILE_C), total, TILE_M)
        per = triton.cdiv(total, K)
        s1, s2 = (torch.empty(C, K, device=x.device, dtype=acc) for _ in range(2))
        _grad_sums_rows[(triton.cdiv(C, TILE_C), K)](dy, x, mean_acc, s1, s2, total, C, per, K,
                                                      TILE_M=TILE_M, TILE_C=TILE_C, ACC=ACC)
    else:
        K = _chunks(C, total, BLOCK)
        per = triton.cdiv(total, K)
        s1, s2 = (torch.empty(C, K, device=x.device, dtype=acc) for _ in range(2))
        _grad_sums_ncl[(C, K)](dy, x, mean_acc, s1, s2, L, C, sN, sC, per, total, K, BLOCK=BLOCK, ACC=ACC)
    sum_dy, sum_dy_xmu = s1.double().sum(1), s2.double().sum(1)
    inv = invstd.double()
    m = float(total)
    scale = inv * _coeff(weight, C, 1.0, x.device)
    kk = inv * inv * sum_dy_xmu / m
    k1, k2, k3 = scale, -scale * kk, -scale * sum_dy / m + scale * kk * mean.double()
    dx = torch.empty_like(x)
    n = x.numel()
    _dx[(triton.cdiv(n, BLOCK),)](dy, x, dx, k1.to(acc).contiguous(), k2.to(acc).contiguous(),
                                  k3.to(acc).contiguous(), n, C, _c_div(x), BLOCK=BLOCK, ACC=ACC)
    return dx, (sum_dy_xmu * inv).to(acc), sum_dy.to(acc)
