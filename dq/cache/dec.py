"""CacheQuant's decoupled error correction (DEC): per-channel least-squares fits, and the layer hook.

Cache error: at a cached step i the reused feature F_c (refreshed at step c) stands in for F_i; per step
and channel F_i ~ a F_c + b with a = Cov(F_c, F_i) / Var(F_c), b = E[F_i] - a E[F_c].
Quantization error: the first layers that consume the cached feature see it through quantized weights and
activations; per output channel W X ~ a (W_q Q(X)) + b, fitted on the inputs X those layers see on cached
steps and applied to their outputs on cached steps.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from torch import nn

from dq.cache.handle import CacheHandle

LAYER_HOOK = "dq_cachequant_dec_layer"


def channel_affine_fit(x: torch.Tensor, y: torch.Tensor, channel_dim: int, eps: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel least squares y ~ a x + b over all other dims: a = Cov/Var, b = mean(y) - a mean(x).

    Example:
        >>> x = torch.randn(4, 3, 8); a, b = channel_affine_fit(x, 2 * x + 1, channel_dim=1)   # a=2, b=1
    """
    c = x.shape[channel_dim]
    xs = x.movedim(channel_dim, 0).reshape(c, -1).double()
    ys = y.movedim(channel_dim, 0).reshape(c, -1).double()
    mx, my = xs.mean(1), ys.mean(1)
    var = ((xs - mx[:, None]) ** 2).mean(1)
    cov = ((xs - mx[:, None]) * (ys - my[:, None])).mean(1)
    a = torch.where(var > eps, cov / var.clamp_min(eps), torch.ones_like(var))
    b = my - a * mx
    return a.float(), b.float()


def channel_shift_fit(x: torch.Tensor, y: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean shift y ~ x + b (a fixed at 1): b = mean(y - x) over all other dims.

    The affine fit's slope a = Cov/Var shrinks towards the mean wherever F_c and F_i correlate weakly
    (a = 0.3-0.8 on ref-pixart's block residuals), which lowers the feature MSE but washes out the
    per-sample structure that later steps build on; the shift keeps it and corrects the drift only.

    Example:
        >>> x = torch.randn(4, 3, 8); a, b = channel_shift_fit(x, x + 1, channel_dim=1)   # a=1, b=1
    """
    c = x.shape[channel_dim]
    d = (y.double() - x.double()).movedim(channel_dim, 0).reshape(c, -1).mean(1)
    return torch.ones(c), d.float()


DEC_FITS = {"affine": channel_affine_fit, "shift": channel_shift_fit}


class OutputAffineHook(ModelHook):
    """Applies y -> a * y + b per output channel (dim 1) on cached steps only."""

    def __init__(self, handle: CacheHandle, scale: torch.Tensor, shift: torch.Tensor, channel_dim: int = 1) -> None:
        super().__init__()
        self.handle, self.scale, self.shift, self.channel_dim = handle, scale, shift, channel_dim

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        if self.handle.state().refresh:
            return output
        view = [1] * output.ndim
        view[self.channel_dim] = -1
        return output * self.scale.to(output).view(view) + self.shift.to(output).view(view)
