r"""Whitening inside the network: Decorrelated BN (ZCA, PCA) and IterNorm.

Ioffe & Szegedy §2 name full whitening of each layer's inputs as the ideal BN approximates
(per-feature standardization ignores correlations). Huang et al. 2018 (Decorrelated BN,
arXiv:1804.08450) whiten mini-batches inside the network, in groups of G features::

    Σ = (1/m) X_c X_cᵀ + εI = D Λ Dᵀ
    ZCA:  x̂ = D Λ^(−½) Dᵀ (x − μ)       the whitening closest to the identity
    PCA:  x̂ = Λ^(−½) Dᵀ (x − μ)          rotates onto the principal axes

then a per-feature affine γ, β. PCA's axes are only defined up to order and sign, and a new
batch's eigenvectors come out permuted and flipped ("stochastic axis swapping"), so successive
steps see differently-rotated features and training fails; ZCA is invariant to that ambiguity.
IterNorm (Huang et al. 2019, arXiv:1904.03441) avoids the eigendecomposition: with
Σ_N = Σ / tr(Σ), P₀ = I and P_k = ½(3P_{k−1} − P_{k−1}³ Σ_N), Σ^(−½) ≈ P_T / √tr(Σ).

Gradients. ZCA's whitening matrix is a matrix function, Σ^(−½), whose derivative in Σ's
eigenbasis is the Daleckii–Krein divided difference; for f(λ) = λ^(−½) it has the closed form
f[λ_i, λ_j] = −1/(s_i s_j (s_i + s_j)) with s = √λ, which stays finite as λ_i → λ_j — unlike
the eigenvector derivatives (∝ 1/(λ_i − λ_j)) of a generic eigh backward. PCA needs the
eigenvectors themselves and keeps that unstable backward (part of why it fails). IterNorm's
gradient flows through its T matrix iterations.

IterNorm's uncoupled Newton iteration converges quadratically once close (float64: ~1e-12 of
ZCA by T = 10 on a condition number of ~15) but amplifies round-off if run much longer — by
T ≈ 20–30 it diverges, in float32 sooner. The paper's T = 5 is far from that regime; keep T ≤ 10.

Inference: running mean and running whitening matrix (EMA with ``momentum``). Inputs (N, C, *):
spatial positions count as samples, as in BN.

``groups`` is the number of groups (``group_size`` sets the size instead); features are split
into contiguous groups of equal size.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..options import Whitening
from .. import definition as D
from .. import functional as BF
from ..errors import NonFiniteError
from ..kernels import dispatch
from ._grouped import differentiable_backward

__all__ = ["DecorrelatedBatchNorm", "IterNorm", "inv_sqrtm", "whitening_matrix", "iternorm_matrix",
           "group_covariance"]


class _InvSqrtm(torch.autograd.Function):
    """Σ^(−½) of symmetric positive definite matrices (..., G, G), stable backward."""

    @staticmethod
    def forward(ctx, sigma: Tensor) -> Tensor:
        lam, D = torch.linalg.eigh(sigma)                                   # ..., G ; ..., G, G
        s = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()
        ctx.save_for_backward(sigma, D, s)
        return D @ torch.diag_embed(1.0 / s) @ D.transpose(-1, -2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        sigma, D, s = ctx.saved_tensors
        if torch.is_grad_enabled():
            # a graph of the backward: D and s as functions of Σ (through eigh's own derivative), so
            # second derivatives see how the eigenbasis moves
            lam, D = torch.linalg.eigh(sigma)
            s = lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()
        sym = 0.5 * (grad + grad.transpose(-1, -2))
        M = D.transpose(-1, -2) @ sym @ D                                    # grad in the eigenbasis
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        K = -1.0 / (si * sj * (si + sj))                                     # f[λ_i, λ_j], f = λ^(−½)
        return D @ (M * K) @ D.transpose(-1, -2)


def inv_sqrtm(sigma: Tensor) -> Tensor:
    """Σ^(−½) for a batch of SPD matrices, with the divided-difference (Daleckii–Krein) backward."""
    return _InvSqrtm.apply(sigma)


def group_covariance(x: Tensor, groups: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """x (N, C, *) → (centered X (g, G, m), mean (g, G, 1), Σ = X Xᵀ/m + εI (g, G, G))."""
    C = x.shape[1]
    X = x.transpose(0, 1).reshape(C, -1)                                     # C, m
    m = X.shape[1]
    X = X.view(groups, C // groups, m)                                       # g, G, m
    mean = X.mean(-1, keepdim=True)                                          # g, G, 1
    Xc = X - mean
    eye = torch.eye(C // groups, dtype=x.dtype, device=x.device)
    sigma = Xc @ Xc.transpose(-1, -2) / m + eps * eye                        # g, G, G
    return Xc, mean, sigma


class _EighStable(torch.autograd.Function):
    """eigh with its eigenvector derivative regularized: where the usual backward has
    1/(λ_j − λ_i), this has (λ_j − λ_i)/((λ_j − λ_i)² + κ²), κ = 1e-3·mean(λ) — finite when two
    eigenvalues meet (the control that tells PCA's unstable gradient from its axis swapping)."""

    @staticmethod
    def forward(ctx, sigma: Tensor):
        lam, D = torch.linalg.eigh(sigma)
        ctx.save_for_backward(lam, D)
        return lam, D

    @staticmethod
    def backward(ctx, g_lam: Tensor, g_D: Tensor):
        lam, D = ctx.saved_tensors
        diff = lam.unsqueeze(-2) - lam.unsqueeze(-1)                        # [i, j] = λ_j − λ_i
        kappa = 1e-3 * lam.abs().mean(-1, keepdim=True).unsqueeze(-1)
        F = diff / (diff.square() + kappa.square())
        F.diagonal(dim1=-2, dim2=-1).zero_()
        inner = torch.diag_embed(g_lam if g_lam is not None else torch.zeros_like(lam))
        if g_D is not None:
            inner = inner + F * (D.transpose(-1, -2) @ g_D)
        grad = D @ inner @ D.transpose(-1, -2)
        return 0.5 * (grad + grad.transpose(-1, -2))


def _aligned(W: Tensor, reference: Tensor) -> Tensor:
    """W's rows (whitening axes) permuted and sign-flipped to match ``reference``'s rows one to one
    (greedy on |cosine|), per group: PCA without axis swapping. (g, G, G) each."""
    with torch.no_grad():
        a = W / W.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        b = reference / reference.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        sim = b @ a.transpose(-1, -2)                                        # [ref row, W row]
        g, G, _ = sim.shape
        order = torch.empty(g, G, dtype=torch.long)
        signs = torch.empty(g, G, dtype=W.dtype)
        score = sim.abs().clone()
        for _ in range(G):                                                   # greedy assignment
            flat = score.view(g, -1).argmax(-1)
            r, c = flat // G, flat % G
            rows = torch.arange(g)
            order[rows, r] = c
            signs[rows, r] = torch.sign(sim[rows, r, c]).where(sim[rows, r, c] != 0, torch.ones_like(signs[rows, r]))
            score[rows, r, :] = -1.0
            score[rows, :, c] = -1.0
    return W.gather(1, order.unsqueeze(-1).expand(-1, -1, W.shape[-1])) * signs.unsqueeze(-1)


def whitening_matrix(sigma: Tensor, method: str, reference: Optional[Tensor] = None) -> Tensor:
    """ZCA: D Λ^(−½) Dᵀ; PCA: Λ^(−½) Dᵀ (rows: principal axes, ascending eigenvalue). Two PCA controls:
    "pca_aligned" matches the axes' order and signs to ``reference`` (no axis swapping, the same
    eigenvector gradient), "pca_stablegrad" keeps PCA's axes with a regularized eigenvector gradient."""
    if method == "zca":
        return inv_sqrtm(sigma)
    if method in ("pca", "pca_aligned", "pca_stablegrad"):
        lam, D = _EighStable.apply(sigma) if method == "pca_stablegrad" else torch.linalg.eigh(sigma)
        W = torch.diag_embed(lam.clamp_min(torch.finfo(lam.dtype).tiny).rsqrt()) @ D.transpose(-1, -2)
        if method == "pca_aligned" and reference is not None:
            W = _aligned(W, reference)
        return W
    raise ValueError(f"whitening must be one of {WHITENINGS}, got {method!r}")


WHITENINGS = ("zca", "pca", "pca_aligned", "pca_stablegrad")


def iternorm_matrix(sigma: Tensor, T: int) -> Tensor:
    """Σ^(−½) ≈ P_T / √tr(Σ) by T Newton iterations on Σ_N = Σ / tr(Σ)."""
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None]       # g, 1, 1
    sigma_n = sigma / trace
    P = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    for _ in range(T):
        P = 1.5 * P - 0.5 * P @ P @ P @ sigma_n
    return P / trace.sqrt()


class _NewtonFn(torch.autograd.Function):
    """:func:`iternorm_matrix` on the compiled kernels: the T iterations of every group in one
    call, the vector-Jacobian product through them in one more (newton_inv_sqrt[_backward]). A
    graph of the backward (create_graph) differentiates the definition instead."""

    @staticmethod
    def forward(ctx, sigma, T, module):
        W, P = module.newton_inv_sqrt(sigma, T)
        ctx.module, ctx.T = module, T
        ctx.save_for_backward(sigma, P)
        return W

    @staticmethod
    def backward(ctx, dW):
        sigma, P = ctx.saved_tensors
        if torch.is_grad_enabled():                     # through the definition, sigma's graph kept
            dS, = torch.autograd.grad(iternorm_matrix(sigma, ctx.T), sigma, dW, create_graph=True)
            return dS, None, None
        return ctx.module.newton_inv_sqrt_backward(dW, sigma, P), None, None


def _newton_kernels(sigma: Tensor):
    """The compiled module when it takes sigma ((g, G, G) float32/float64 on the CPU), else None."""
    return dispatch.compiled_for(sigma, "newton_inv_sqrt") \
        if sigma.dtype in (torch.float32, torch.float64) and sigma.dim() == 3 else None


def _newton(sigma: Tensor, T: int) -> Tensor:
    """iternorm_matrix(sigma, T), on the compiled kernels where they take sigma."""
    module = _newton_kernels(sigma)
    if module is None:
        return iternorm_matrix(sigma, T)
    return _NewtonFn.apply(sigma, T, module)


def _views(x: Tensor, xc: Tensor, groups: int):
    """The data as batched matrices without copies: ("ncl", (N·g, G, L)) for contiguous (N, C, *)
    input — each sample's group is a contiguous G × L block — or ("rows", (g, G, M)) for 2-D and
    channels_last input, whose M rows of C values hold each group's G columns at stride C."""
    N, C = x.shape[:2]
    G = C // groups
    if x.dim() >= 3 and x.is_contiguous():
        return "ncl", xc.reshape(N * groups, G, -1)
    if x.dim() == 2 and x.is_contiguous():
        return "rows", xc.view(N, groups, G).permute(1, 2, 0)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return "rows", xc.permute(0, 2, 3, 1).reshape(-1, groups, G).permute(1, 2, 0)
    return None, None


def _viewable(x: Tensor) -> bool:
    """Whether :func:`_views` takes x (without building the views): contiguous, or 4-D channels_last."""
    return x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))


class _WhitenFn(torch.autograd.Function):
    """Training whitening y = γ·W(Σ)·(x − μ) + β with the data-sized products on the input's own
    layout, and a backward written out:

        dY = γ·dy,   Σ_g dY X_cᵀ → dW (and dγ = Σ_j W_ij (Σ dy X_cᵀ)_ij),   dΣ = W'(Σ)ᵀ[dW]
        dx = Wᵀ(dY − mean dY) + (dΣ + dΣᵀ)·X_c / m

    with W'(Σ)ᵀ the vector-Jacobian product of the small matrix function (ZCA's stable divided
    differences, PCA's eigenvectors, IterNorm's iterations), taken on the (g, G, G) matrices
    only — by autograd, or for IterNorm by the kernels (``matrix`` returns W and that product).
    Where the compiled kernels take x (:func:`_kernels`) the step is four passes (4.5·G
    multiply-adds per value) with the glue on the small matrices done in the same calls:
    whiten_moments (μ and Σ, one pass shifted by ``shift`` — the running mean — where that is
    close enough), whiten_apply, whiten_grad_sums and whiten_grad_x; elsewhere torch's batched
    products on x − μ. A create_graph backward differentiates the readable forward instead."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps, matrix, reference, shift=None):
        N, C = x.shape[:2]
        G = C // groups
        m = D.values_per_channel(x)
        k = _kernels(x)
        kind = xc = A = None
        if k is not None:                       # one read of x, no centered copy
            mean, sigma, finite = k.whiten_moments(x, shift, G, eps)         # C ; g, G, G
        else:
            mean = x.mean(dim=D.reduction_dims(x))                           # C
            xc = x - D.channel_view(mean, x)                                 # x's layout
            kind, A = _views(x, xc, groups)
            gram = torch.bmm(A, A.transpose(1, 2))
            if kind == "ncl":
                gram = gram.view(N, groups, G, G).sum(0)                     # g, G, G
            sigma = gram / m + eps * torch.eye(G, dtype=x.dtype, device=x.device)
            finite = bool(torch.isfinite(sigma).all())
        if not finite:
            raise NonFiniteError("whitening: NaN/Inf in the input — its covariance has no eigendecomposition "
                                 "or inverse square root; no statistics were updated")
        # the small matrix function and its vector-Jacobian product for the backward (a graph on
        # the (g, G, G) matrices, or IterNorm's kernel): one eigendecomposition per step, and the
        # backward differentiates the very function the forward applied (PCA's axis alignment
        # reads the running matrix, which the step then updates)
        W, vjp = matrix(sigma.detach())                                      # g, G, G; dW ↦ dΣ
        if k is not None:
            y = k.whiten_apply(x, W, weight, bias, mean)                     # diag(γ)W·(x − μ) + β
        else:
            Wg = W * weight.detach().reshape(groups, G, 1) if weight is not None else W    # diag(γ)·W
            y = _apply(kind, A, Wg, bias.detach().reshape(groups, G) if bias is not None else None, x, N, groups, G)
        ctx.save_for_backward(x, mean if k is not None else xc, W, weight, bias)
        ctx.k, ctx.kind, ctx.groups, ctx.m, ctx.reference, ctx.x_shape = k, kind, groups, m, reference, x.shape
        ctx.vjp = vjp
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mean, W)
        return y, mean, W

    @staticmethod
    def backward(ctx, dy, _dmean, _dW):
        if dy is None:
            return (None,) * 8
        x, saved, W, weight, bias = ctx.saved_tensors     # saved: the mean (kernels) or x − μ (torch)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():                     # a graph of the backward: the definition's
            return differentiable_backward(ctx.reference, (x, weight, bias), (need_x, need_w, need_b), dy) \
                + (None,) * 5
        if ctx.k is not None:                           # Σ dy·(x − μ)ᵀ and Σ dy in one read of dy and x
            dW, dweight, dbeta = ctx.k.whiten_grad_sums(dy, x, saved, W, weight)   # g, G, G ; C ; C
            dx = ctx.k.whiten_grad_x(dy, x, saved, W, weight, ctx.vjp(dW), dbeta) if need_x else None
        else:
            dx, dweight, dbeta = _backward_torch(ctx, dy, saved, W, weight, need_x)
        return (dx, dweight.to(weight.dtype) if need_w and weight is not None else None,
                dbeta.to(bias.dtype) if need_b and bias is not None else None, None, None, None, None, None)


def _backward_torch(ctx, dy: Tensor, xc: Tensor, W: Tensor, weight: Optional[Tensor], need_x: bool):
    """_WhitenFn's backward on torch's batched products: (dx or None, dγ or None, dβ)."""
    groups, kind, m = ctx.groups, ctx.kind, ctx.m
    N, C = ctx.x_shape[:2]
    G = C // groups
    dy = dy.contiguous(memory_format=torch.channels_last) if kind == "rows" and dy.dim() == 4 else dy.contiguous()
    _, A = _views(xc, xc, groups)
    _, Dv = _views(dy, dy, groups)
    P = torch.bmm(Dv, A.transpose(1, 2))                                            # Σ dy·X_cᵀ
    if kind == "ncl":
        P = P.view(N, groups, G, G).sum(0)                                          # g, G, G
    dbeta = dy.sum(dim=D.reduction_dims(dy))                                        # C
    gamma = weight.detach().reshape(groups, G, 1) if weight is not None else None
    dweight = (W * P).sum(-1).reshape(C) if weight is not None else None
    if not need_x:
        return None, dweight, dbeta
    dS = ctx.vjp(P * gamma if gamma is not None else P)
    S = (dS + dS.transpose(1, 2)) / m                                               # g, G, G
    Wg = W * gamma if gamma is not None else W
    shift = -(Wg.transpose(1, 2) @ (dbeta / m).reshape(groups, G, 1))               # −Wᵀ mean(dY), g, G, 1
    return _backward_x(kind, Dv, A, Wg, S, shift, dy, N, groups, G), dweight, dbeta


def _kernels(x: Tensor):
    """The compiled CPU module when it takes x (float32/float64, contiguous or channels_last), else None.
    Its whitening entries read x in its own layout once per pass (float64 sums): torch's batched
    products needed x − μ materialized, a broadcast copy of β into the output and copies of the
    transposed operands."""
    return dispatch.compiled_for(x, "whiten_moments") if x.dtype in (torch.float32, torch.float64) else None


def _graph_backward(dy: Tensor, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], G: int, eps: float,
                    kind: int, T: int, need_x: bool, need_w: bool, need_b: bool) -> tuple:
    """The whitening node's backward as a differentiable graph (create_graph=True, called by the
    C++ node ``whiten_train``): the gradients of the readable forward — ZCA's :func:`inv_sqrtm`
    (kind 0), IterNorm's :func:`iternorm_matrix` (kind 1) or PCA's eigh (kind 2) — rebuilt from x."""
    matrix = inv_sqrtm if kind == 0 else (lambda s: iternorm_matrix(s, T)) if kind == 1 else \
        (lambda s: whitening_matrix(s, "pca"))
    return differentiable_backward(lambda x, w, b: _readable_forward(x, w, b, x.shape[1] // G, eps, matrix),
                                   (x, weight, bias), (need_x, need_w, need_b), dy)


def _readable_forward(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], groups: int, eps: float,
                      matrix) -> Tensor:
    """y = γ·W(Σ)·(x − μ) + β on torch's operations, W = ``matrix``(Σ): the definition a create_graph
    backward differentiates (no buffer updates)."""
    Xc, _, sigma = group_covariance(x, groups, eps)
    y = (matrix(sigma) @ Xc).reshape(x.shape[1], x.shape[0], *x.shape[2:]).transpose(0, 1)
    return D.affine(y, weight, bias)


def _node_kernels(x: Tensor):
    """The compiled module when it has the whitening node and takes x, with the graph backward the
    node calls registered."""
    k = dispatch.compiled_for(x, "whiten_train") if x.dtype in (torch.float32, torch.float64) else None
    if k is not None and not _node_kernels.registered:
        k.set_whiten_graph_backward(_graph_backward)
        _node_kernels.registered = True
    return k


_node_kernels.registered = False


def _apply(kind, A, Wg, beta, x, N, groups, G):
    """y = Wg·X_c + β in x's layout."""
    if kind == "ncl":
        Wb = Wg.unsqueeze(0).expand(N, -1, -1, -1).reshape(N * groups, G, G)
        if beta is not None:
            bias_b = beta.unsqueeze(0).expand(N, -1, -1).reshape(N * groups, G, 1)
            y = torch.baddbmm(bias_b, Wb, A)
        else:
            y = torch.bmm(Wb, A)
        return y.view(x.shape)
    # rows: (g, M, G) = X_cᵀ·Wgᵀ per group, then one pass back to rows of C with β added
    Y = torch.bmm(A.transpose(1, 2), Wg.transpose(1, 2))                      # g, M, G
    rows = Y.transpose(0, 1)                                                  # M, g, G (a view)
    out = rows + beta.unsqueeze(0) if beta is not None else rows.contiguous()
    if x.dim() == 2:
        return out.reshape(x.shape)
    Nn, C, H, Wd = x.shape
    return out.reshape(Nn, H, Wd, C).permute(0, 3, 1, 2)                      # channels_last


def _backward_x(kind, Dv, A, Wg, S, shift, dy, N, groups, G):
    """dx = Wgᵀ·dY + S·X_c + shift in dy's layout."""
    if kind == "ncl":
        WbT = Wg.transpose(1, 2).unsqueeze(0).expand(N, -1, -1, -1).reshape(N * groups, G, G)
        Sb = S.unsqueeze(0).expand(N, -1, -1, -1).reshape(N * groups, G, G)
        shift_b = shift.unsqueeze(0).expand(N, -1, -1, -1).reshape(N * groups, G, 1)
        dx = torch.baddbmm(shift_b, WbT, Dv)
        dx.baddbmm_(Sb, A)
        return dx.view(dy.shape)
    T = torch.bmm(Dv.transpose(1, 2), Wg)                                     # g, M, G: dYᵀ·Wg
    T.baddbmm_(A.transpose(1, 2), S)                                          # + X_cᵀ·S (S symmetric)
    out = T.transpose(0, 1) + shift.reshape(groups, G).unsqueeze(0)           # M, g, G
    if dy.dim() == 2:
        return out.reshape(dy.shape)
    Nn, C, H, Wd = dy.shape
    return out.reshape(Nn, H, Wd, C).permute(0, 3, 1, 2)


class _Whitening(nn.Module):
    def __init__(self, num_features: int, groups: int = 1, eps: float = 1e-5, momentum: float = 0.1,
                 affine: bool = True, track_running_stats: bool = True, group_size: Optional[int] = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"eps must be positive (it keeps Σ + εI invertible), got {eps}")
        if momentum is None or not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if group_size is not None:
            if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
                raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
            if num_features % group_size:
                raise ValueError(f"num_features {num_features} is not a multiple of group_size {group_size}")
            groups = num_features // group_size
        if groups < 1 or num_features % groups:
            raise ValueError(f"num_features {num_features} must split into {groups} equal groups")
        G = num_features // groups
        factory = dict(device=device, dtype=dtype)
        self.num_features, self.groups, self.eps, self.momentum = num_features, groups, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine else None
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_whitening", torch.eye(G, **factory).repeat(groups, 1, 1))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_whitening", None)
            self.register_buffer("num_batches_tracked", None)

    def _matrix(self, sigma: Tensor) -> Tensor:
        raise NotImplementedError

    def _node(self) -> Optional[tuple[int, int]]:
        """(kind, T) when the compiled node (``whiten_train``) carries this layer's matrix function:
        0 for ZCA with groups of ≤ 16, 1 for IterNorm, 2 for PCA; else None (the step runs
        :class:`_WhitenFn`)."""
        return None

    def _matrix_vjp(self, sigma: Tensor):
        """(W(Σ), dW ↦ dΣ): the small matrix function and its vector-Jacobian product, here by
        autograd through a graph of :meth:`_matrix` on the (g, G, G) matrices, kept for the
        backward (which may run more than once: retain_graph)."""
        with torch.enable_grad():
            s = sigma.requires_grad_()
            W = self._matrix(s)
        return W.detach(), lambda dW: torch.autograd.grad(W, s, dW, retain_graph=True)[0]

    def forward(self, x: Tensor) -> Tensor:
        BF.check_input(x, self.num_features)
        C = self.num_features
        if x.numel() == 0:                       # nothing to whiten (N = 0): no statistics change
            return D.affine(x * 1.0, self.weight, self.bias)
        if (self.training or self.running_mean is None) and x.dtype in (torch.float32, torch.float64) \
                and _viewable(x) and not dispatch.traced(x):
            BF.check_batch_size(x)
            node = self._node()
            k = _node_kernels(x) if node is not None else None
            if k is not None:                   # the whole step in one C++ autograd node
                update = self.training and self.running_mean is not None
                try:
                    return k.whiten_train(x, self.weight, self.bias, C // self.groups, self.eps, *node,
                                          self.running_mean if self.training else None,
                                          self.running_mean if update else None,
                                          self.running_whitening if update else None,
                                          self.num_batches_tracked if update else None, self.momentum)
                except RuntimeError as e:
                    if "whitening: NaN/Inf" in str(e):
                        raise NonFiniteError(str(e).splitlines()[0]) from None
                    raise
            y, mean, W = _WhitenFn.apply(x, self.weight, self.bias, self.groups, self.eps, self._matrix_vjp,
                                         self._reference, self.running_mean if self.training else None)
            if self.training and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                    self.running_whitening.lerp_(W.to(self.running_whitening.dtype), self.momentum)
            return y
        if self.training or self.running_mean is None:
            BF.check_batch_size(x)
            Xc, mean, sigma = group_covariance(x, self.groups, self.eps)
            if not torch.isfinite(sigma).all():
                raise NonFiniteError(
                    f"{type(self).__name__}: NaN/Inf in the input — its covariance has no "
                    f"eigendecomposition or inverse square root; no statistics were updated")
            W = self._matrix(sigma)                                          # g, G, G
            Y = W @ Xc                                                       # g, G, m
            if self.training and self.running_mean is not None:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    self.running_mean.lerp_(mean.reshape(C), self.momentum)
                    self.running_whitening.lerp_(W.detach(), self.momentum)
        else:
            if _viewable(x) and x.dtype in (torch.float32, torch.float64) and not dispatch.traced(x):
                k = _kernels(x)
                operands = [t for t in (x, self.weight, self.bias, self.running_whitening, self.running_mean)
                            if t is not None]
                if k is not None and not (torch.is_grad_enabled() and any(t.requires_grad for t in operands)):
                    # y = diag(γ)·W·(x − μ) + β: one pass on x's own layout (no autograd node)
                    return k.whiten_apply(x, self.running_whitening, self.weight, self.bias, self.running_mean)
                # = Wg·x + (β − Wg·μ): one batched product on x's own layout
                kind, A = _views(x, x, self.groups)
                G = C // self.groups
                W = self.running_whitening.to(x.dtype)
                Wg = W * self.weight.reshape(self.groups, G, 1) if self.weight is not None else W
                shift = -(Wg @ self.running_mean.to(x.dtype).reshape(self.groups, G, 1)).squeeze(-1)   # g, G
                beta = shift + self.bias.reshape(self.groups, G) if self.bias is not None else shift
                return _apply(kind, A, Wg, beta, x, x.shape[0], self.groups, G)
            X = x.transpose(0, 1).reshape(C, -1).view(self.groups, C // self.groups, -1)
            Y = self.running_whitening @ (X - self.running_mean.view(self.groups, -1, 1))
        rest = x.shape[2:]
        y = Y.reshape(C, x.shape[0], *rest).transpose(0, 1)                  # N, C, *
        return D.affine(y, self.weight, self.bias).contiguous()

    def _reference(self, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
        """The readable training forward (no buffer updates): what a create_graph backward differentiates."""
        return _readable_forward(x, weight, bias, self.groups, self.eps, self._matrix)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, groups={self.groups} (size {self.num_features // self.groups}), "
                f"eps={self.eps}, momentum={self.momentum}, affine={self.affine}")


class DecorrelatedBatchNorm(_Whitening):
    """Decorrelated BN (Huang et al. 2018): ZCA or PCA whitening of feature groups per batch."""

    def __init__(self, num_features: int, groups: int = 1, whitening: Whitening = "zca", eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, track_running_stats: bool = True,
                 group_size: Optional[int] = None, device=None, dtype=None) -> None:
        if whitening not in WHITENINGS:
            raise ValueError(f"whitening must be one of {WHITENINGS}, got {whitening!r}")
        super().__init__(num_features, groups, eps, momentum, affine, track_running_stats, group_size,
                         device, dtype)
        self.whitening = whitening

    def _matrix(self, sigma: Tensor) -> Tensor:
        reference = self.running_whitening.detach() if self.running_whitening is not None else \
            torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
        return whitening_matrix(sigma, self.whitening, reference)

    def _node(self) -> Optional[tuple[int, int]]:
        """ZCA with groups of ≤ 16 runs on the node: Σ^(−½) by the kernels' Jacobi eigendecomposition
        (``zca_inv_sqrt``: with its backward about half torch's eigh alone for 32 groups of 16; from
        G = 32 on its O(G³) sweeps are slower, and eigh stays) with :class:`_InvSqrtm`'s
        divided-difference backward; _InvSqrtm stays the definition the tests hold it to. PCA keeps
        LAPACK's eigh — its output depends on the eigenvectors' order and signs — and the node runs
        it and autograd through it exactly as the definition does. The PCA controls (aligned axes,
        regularized gradient) keep the Python step."""
        if self.whitening == "zca":
            return (0, 0) if self.num_features // self.groups <= 16 else None
        return (2, 0) if self.whitening == "pca" else None

    def extra_repr(self) -> str:
        return super().extra_repr() + f", whitening={self.whitening!r}"


class IterNorm(_Whitening):
    """IterNorm (Huang et al. 2019): whitening by T Newton iterations, no eigendecomposition."""

    def __init__(self, num_features: int, groups: int = 1, T: int = 5, eps: float = 1e-5,
                 momentum: float = 0.1, affine: bool = True, track_running_stats: bool = True,
                 group_size: Optional[int] = None, device=None, dtype=None) -> None:
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise ValueError(f"T (Newton iterations) must be an integer ≥ 1, got {T!r}")
        super().__init__(num_features, groups, eps, momentum, affine, track_running_stats, group_size,
                         device, dtype)
        self.T = T

    def _matrix(self, sigma: Tensor) -> Tensor:
        return _newton(sigma, self.T)

    def _matrix_vjp(self, sigma: Tensor):
        """The iterations and their backward straight on the kernels where they take Σ."""
        module = _newton_kernels(sigma)
        if module is None:
            return super()._matrix_vjp(sigma)
        W, P = module.newton_inv_sqrt(sigma, self.T)
        return W, lambda dW: module.newton_inv_sqrt_backward(dW, sigma, P)

    def _node(self) -> Optional[tuple[int, int]]:
        return 1, self.T

    def extra_repr(self) -> str:
        return super().extra_repr() + f", T={self.T}"
