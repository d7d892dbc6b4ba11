r"""FrozenBatchNorm: batch norm with everything fixed — the inference transform only.

y = (x − running_mean) · weight / √(running_var + ε) + bias, with weight, bias, running_mean and
running_var all *buffers*: nothing learns, nothing updates, in any mode. The usual choice for
fine-tuning detection backbones with small batches (detectron2, torchvision's
FrozenBatchNorm2d). Works on any (N, C, *) input. Loads a BatchNorm state_dict (its
``num_batches_tracked`` is accepted and dropped; affine=False layers load as γ = 1, β = 0).
``bnlab.convert(model, to="frozen")`` swaps every BN layer for one; a norm-act layer (BN, then
``drop`` and ``act`` modules, as timm's BatchNormAct2d) becomes one with the same ``drop`` and
``act``: y = act(drop(BN_eval(x))), the layout of timm's FrozenBatchNormAct2d.
"""

from __future__ import annotations

import torch
from typing import Optional

from torch import Tensor, nn
from torch.nn import functional as F

from .. import functional as BF

__all__ = ["FrozenBatchNorm"]


class FrozenBatchNorm(nn.Module):
    def __init__(self, num_features: int, eps: float = 1e-5, device=None, dtype=None, *,
                 act: Optional[nn.Module] = None, drop: Optional[nn.Module] = None) -> None:
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        if act is not None or drop is not None:
            self.drop = drop if drop is not None else nn.Identity()
            self.act = act if act is not None else nn.Identity()

    def tail_modules(self) -> tuple[nn.Module, ...]:
        """The modules applied after the normalization, in order (none for plain BN)."""
        return (self.drop, self.act) if "act" in self._modules else ()

    def forward(self, x: Tensor) -> Tensor:
        if isinstance(x, torch.fx.Proxy):                 # FX: torch's op, which its tools know
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            BF.check_input(x, self.num_features)
            y = BF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                              training=False, eps=self.eps)
        for m in self.tail_modules():
            y = m(y)
        return y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        for name, default in (("weight", 1.0), ("bias", 0.0)):       # from an affine=False BN
            if prefix + name not in state_dict:
                state_dict[prefix + name] = torch.full_like(getattr(self, name), default)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"
