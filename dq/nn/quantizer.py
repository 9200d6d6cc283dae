"""Quantizer modules: hold a QuantSpec and its scales, and fake-quantize tensors in simulate mode."""

from __future__ import annotations

import torch
from torch import nn

from dq.errors import DQError
from dq.quant import PerChannel, PerGroup, PerTensor, QuantSpec, dynamic_range, fake_quantize, grid_ste, scales_from_range
from dq.quant.storage import expand_groups


def _scale_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, int]:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return 1, 1
    if isinstance(g, PerChannel):
        return out_features, 1
    if isinstance(g, PerGroup):
        return out_features, in_features // g.group_size
    raise DQError(f"weights cannot use granularity {g}; use tensor, channel or group.")


class WeightQuantizer(nn.Module):
    """Quantizes a weight flattened to [out, in]; scales are [rows, groups] buffers (min-max at init)."""

    def __init__(self, spec: QuantSpec, out_features: int, in_features: int) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = out_features, in_features
        shape = _scale_shape(spec, out_features, in_features)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero", None if spec.symmetric else torch.zeros(shape))

    @torch.no_grad()
    def init_minmax(self, w2d: torch.Tensor) -> None:
        """Round-to-nearest scales from the weight's min and max per group."""
        lo, hi = dynamic_range(w2d.float(), self.spec)
        scale, zero = scales_from_range(lo, hi, self.spec)
        self.scale = scale.reshape(self.scale.shape).to(self.scale.device)
        if self.zero is not None:
            self.zero = zero.reshape(self.zero.shape).to(self.scale.device)

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point expanded to [out, in]."""
        s = expand_groups(self.scale, self.out_features, self.in_features)
        z = None if self.zero is None else expand_groups(self.zero, self.out_features, self.in_features)
        return s, z

    def grid(self, w2d: torch.Tensor) -> torch.Tensor:
        """Grid values (codes) of the weight, nearest rounding; calibrators may override this."""
        s, z = self.expanded()
        v = w2d.float() / s + (0 if z is None else z)
        return self.spec.fmt.round(v)

    def forward(self, w2d: torch.Tensor) -> torch.Tensor:
        s, z = self.expanded()
        z = torch.zeros_like(s) if z is None else z
        q = grid_ste(w2d.float() / s + z, self.spec)
        return ((q - z) * s).to(w2d.dtype)


class ActQuantizer(nn.Module):
    """Quantizes layer inputs [..., channels]: dynamic per token, or static with calibrated scales."""

    def __init__(self, spec: QuantSpec | None) -> None:
        super().__init__()
        self.spec = spec
        static = spec is not None and not spec.dynamic
        self.register_buffer("scale", torch.zeros(1, 1) if static else None)
        self.register_buffer("zero", torch.zeros(1, 1) if static and not spec.symmetric else None)

    @property
    def enabled(self) -> bool:
        return self.spec is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None:
            return x
        if self.spec.dynamic:
            return fake_quantize(x, self.spec)
        if not bool((self.scale > 0).all()):
            raise DQError(
                "a static activation quantizer has no calibrated scale; this recipe needs calibration data "
                "(pass calib=dq.CalibConfig(...)) or use a recipe with dynamic activations."
            )
        return fake_quantize(x, self.spec, self.scale, self.zero)
