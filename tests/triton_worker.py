"""Runs in a subprocess with TRITON_INTERPRET=1 and BNLAB_KERNELS=triton (tests/test_triton.py):
every bnlab BN call on CPU tensors then goes through the Triton kernels, interpreted on the CPU.
Compares them with the readable definition (bnlab.kernels disabled) and with torch.nn."""

import sys

import torch
from torch import nn

import bnlab
from bnlab import functional as BF
from bnlab import kernels

sys.path.insert(0, __file__.rsplit('/', 1)[0])
from conftest import TOLERANCES  # noqa: E402

# relative to max(1, |reference|): the outputs' table, float32 × 1.5 (Triton sums in another order)
TOL = {dtype: tol["out"][0] * (1.5 if dtype == torch.float32 else 1.0) for dtype, tol in TOLERANCES.items()}
SHAPES = [((7, 5), None), ((13, 3, 17), None), ((5, 6, 7, 9), None), ((5, 6, 7, 9), torch.channels_last),
          ((3, 4, 5, 6, 7), None), ((3, 4, 5, 6, 7), torch.channels_last_3d), ((70, 40), None),
          ((2, 70, 3, 3), torch.channels_last), ((40, 2, 30, 30), None)]   # the last: many chunks/channel


def close(a, b, tol, what):
    err = (a.double() - b.double()).abs().max().item() / max(1.0, b.double().abs().max().item())
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
    return err


def both(fn):
    before = kernels.calls["forward_train"] + kernels.calls["backward_train"] + kernels.calls["forward_eval"]
    fast = fn()
    after = kernels.calls["forward_train"] + kernels.calls["backward_train"] + kernels.calls["forward_eval"]
    assert after > before, "the Triton path was not taken"
    with kernels.disabled():
        ref = fn()
    return fast, ref


def check_functional(shape, fmt, dtype):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    dy = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)
    if fmt is not None:
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    C = shape[1]
    pdt = dtype if dtype == torch.float64 else torch.float32
    w = (torch.rand(C, generator=g, dtype=torch.float64) + 0.5).to(pdt)
    b = torch.randn(C, generator=g, dtype=torch.float64).to(pdt)

    def train():
        rm, rv = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
        xx, ww, bb = x.clone().requires_grad_(), w.clone().requires_grad_(), b.clone().requires_grad_()
        y = BF.batch_norm(xx, rm, rv, ww, bb, True, 0.3, 1e-3)
        y.backward(dy)
        return y.detach(), xx.grad, ww.grad, bb.grad, rm, rv, y.stride() == x.stride()

    def evaluate():
        g2 = torch.Generator().manual_seed(2)
        rm, rv = torch.randn(C, generator=g2).to(pdt), torch.rand(C, generator=g2).to(pdt) + 0.5
        return (BF.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-3),)

    fast, ref = both(train)
    tol = TOL[dtype]
    for name, a, r in zip(("y", "dx", "dgamma", "dbeta", "running_mean", "running_var"), fast[:6], ref[:6]):
        close(a, r, tol, f"{shape} {fmt} {dtype} {name}")
    assert fast[6], f"{shape} {fmt}: output layout differs from the input's"
    (ye,), (re,) = both(evaluate)
    close(ye, re, tol, f"{shape} {fmt} {dtype} eval y")


def check_modules():
    """bnlab.BatchNorm{1,2,3}d on the Triton path against torch.nn, train and eval."""
    for dim, shape in ((1, (16, 6)), (2, (8, 4, 5, 5)), (3, (4, 3, 3, 4, 5))):
        torch.manual_seed(0)
        ours = getattr(bnlab, f"BatchNorm{dim}d")(shape[1]).double()
        ref = getattr(nn, f"BatchNorm{dim}d")(shape[1]).double()
        ref.load_state_dict(ours.state_dict())
        for step in range(3):
            x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = ours(xa), ref(xb)
            dy = torch.randn_like(ya)
            ya.backward(dy)
            yb.backward(dy)
            close(ya, yb, 1e-10, f"BatchNorm{dim}d y")
            close(xa.grad, xb.grad, 1e-10, f"BatchNorm{dim}d dx")
            close(ours.weight.grad, ref.weight.grad, 1e-10, f"BatchNorm{dim}d dgamma")
        for k in ("running_mean", "running_var", "num_batches_tracked"):
            close(ours.state_dict()[k], ref.state_dict()[k], 1e-12, f"BatchNorm{dim}d {k}")
        ours.eval(), ref.eval()
        x = torch.randn(*shape, dtype=torch.float64)
        close(ours(x), ref(x), 1e-10, f"BatchNorm{dim}d eval")


def main() -> int:
    assert kernels.backend() == "triton"
    for shape, fmt in SHAPES:
        for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
            check_functional(shape, fmt, dtype)
    check_modules()
    # the fused BN+activation module has no Triton kernel: it must fall back, not fail
    m = bnlab.BatchNormAct2d(3, activation="leaky_relu").double()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    m(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    print("triton path ok", dict(kernels.calls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
