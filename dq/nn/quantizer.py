"""Quantizer modules: hold a QuantSpec and its scales, and fake-quantize tensors in simulate mode."""

from __future__ import annotations

import torch
from torch import nn

from dq.errors import DQError
from dq.quant import PerChannel, PerGroup, PerTensor, Progressive, QuantSpec, dynamic_range, fake_quantize, grid_ste, scales_from_range
from dq.quant.progressive import int8_weight, progressive_codes, progressive_scales
from dq.quant.storage import expand_groups


def _scale_shape(spec: QuantSpec, out_features: int, in_features: int) -> tuple[int, int]:
    g = spec.granularity
    if isinstance(g, PerTensor):
        return 1, 1
    if isinstance(g, PerChannel):
        return out_features, 1
    if isinstance(g, (PerGroup, Progressive)):
        return out_features, in_features // g.group_size
    raise DQError(f"weights cannot use granularity {g}; use tensor, channel or group.")


class WeightQuantizer(nn.Module):
    """Quantizes a weight flattened to [out, in]; scales are [rows, groups] buffers (min-max at init).

    Progressive specs (QServe, dq.quant.progressive) also keep the per-channel scale s1 (`channel_scale`
    [out, 1]); `scale` and `zero` then hold the integer group scales s2 and zeros z.
    """

    def __init__(self, spec: QuantSpec, out_features: int, in_features: int) -> None:
        super().__init__()
        self.spec = spec
        self.out_features, self.in_features = out_features, in_features
        shape = _scale_shape(spec, out_features, in_features)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero", None if spec.symmetric else torch.zeros(shape))
        self.register_buffer("channel_scale", torch.ones(out_features, 1) if self.progressive else None)
        # Calibration switches: `bypass` passes the float weight through (the FP reference during
        # reconstruction); `rounding` (e.g. AdaRound) replaces nearest rounding in grid() and forward().
        # Neither is part of the state dict: deploy bakes the learned rounding into the packed codes.
        self.bypass = False
        self.rounding: object | None = None

    @property
    def progressive(self) -> bool:
        return isinstance(self.spec.granularity, Progressive)

    @torch.no_grad()
    def init_minmax(self, w2d: torch.Tensor) -> None:
        """Round-to-nearest scales from the weight's min and max per group."""
        if self.progressive:
            s1, s2, z = progressive_scales(w2d, self.spec.granularity.group_size)
            device = self.scale.device
            self.channel_scale, self.scale, self.zero = s1.to(device), s2.to(device), z.to(device)
            return
        lo, hi = dynamic_range(w2d.float(), self.spec)
        scale, zero = scales_from_range(lo, hi, self.spec)
        self.scale = scale.reshape(self.scale.shape).to(self.scale.device)
        if self.zero is not None:
            self.zero = zero.reshape(self.zero.shape).to(self.scale.device)

    def expanded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scale and zero point expanded to [out, in] (progressive: the effective scale s1 * s2)."""
        scale = self.scale * self.channel_scale if self.progressive else self.scale
        s = expand_groups(scale, self.out_features, self.in_features)
        z = None if self.zero is None else expand_groups(self.zero, self.out_features, self.in_features)
        return s, z

    def grid(self, w2d: torch.Tensor) -> torch.Tensor:
        """Grid values (codes) of the weight: nearest rounding, or the learned `rounding` when set."""
        if self.progressive:
            self._check_progressive()
            return progressive_codes(w2d, self.channel_scale, self.scale, self.zero)
        s, z = self.expanded()
        if self.rounding is not None:
            return self.rounding.grid(w2d.float(), s, z, self.spec)
        v = w2d.float() / s + (0 if z is None else z)
        return self.spec.fmt.round(v)

    def forward(self, w2d: torch.Tensor) -> torch.Tensor:
        if self.bypass:
            return w2d
        if self.progressive:
            wq = (int8_weight(self.grid(w2d), self.scale, self.zero) * self.channel_scale).to(w2d.dtype)
            return w2d + (wq - w2d).detach()  # straight-through
        s, z = self.expanded()
        if self.rounding is not None:
            q = self.rounding.quantize(w2d.float(), s, z, self.spec)
            return ((q - (0 if z is None else z)) * s).to(w2d.dtype)
        z = torch.zeros_like(s) if z is None else z
        q = grid_ste(w2d.float() / s + z, self.spec)
        return ((q - z) * s).to(w2d.dtype)


    def _check_progressive(self) -> None:
        if self.rounding is not None:
            raise DQError("progressive weights round to nearest (QServe's two levels); learned rounding (AdaRound) does not apply.")


class ActQuantizer(nn.Module):
    """Quantizes layer inputs [..., channels]: dynamic per token, or static with calibrated scales.

    A static quantizer may hold one (scale, zero) per timestep group (`groups` > 1): buffers `scale`
    and `zero` are then [groups, 1, 1] and `timestep_ranges` [groups, 2] holds the calibrated
    timestep interval of each group. `group` (set per denoiser call by dq.calib.timestep's hook, an
    int or a per-row LongTensor) selects the parameters; it is not saved.
    """

    def __init__(self, spec: QuantSpec | None, groups: int = 1) -> None:
        super().__init__()
        self.spec = spec
        self.bypass = False
        self.group: int | torch.Tensor | None = None
        self.register_buffer("scale", None)
        self.register_buffer("zero", None)
        self.register_buffer("timestep_ranges", None)
        self.set_groups(groups)

    @property
    def static(self) -> bool:
        return self.spec is not None and not self.spec.dynamic

    @property
    def groups(self) -> int:
        return 1 if self.timestep_ranges is None else int(self.timestep_ranges.shape[0])

    def set_groups(self, groups: int, device: torch.device | str | None = None) -> None:
        """(Re)allocate `groups` parameter sets (uncalibrated); 1 = one static scale."""
        if groups < 1:
            raise DQError(f"timestep groups must be >= 1, got {groups}.")
        if groups > 1 and not self.static:
            raise DQError("timestep groups need static activation scales; dynamic (token) activations have none to group.")
        if not self.static:
            return
        device = device if device is not None else (self.scale.device if self.scale is not None else "cpu")
        shape = (1, 1) if groups == 1 else (groups, 1, 1)
        self.scale = torch.zeros(shape, device=device)
        self.zero = None if self.spec.symmetric else torch.zeros(shape, device=device)
        self.timestep_ranges = None if groups == 1 else torch.zeros(groups, 2, device=device)
        self.group = None

    @property
    def enabled(self) -> bool:
        return self.spec is not None

    def _group_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        """(scale, zero, per_row) of the selected group; per_row when each batch row has its own group."""
        if self.timestep_ranges is None:
            return self.scale, self.zero, False
        g = self.group
        if g is None:
            raise DQError(
                "this activation quantizer has per-timestep scales but no timestep group was selected; "
                "call the denoiser (its timestep hook selects the group), not the layer alone."
            )
        if isinstance(g, int):
            return self.scale[g], None if self.zero is None else self.zero[g], False
        if g.numel() != x.shape[0]:
            raise DQError(
                f"the batch mixes timesteps of different groups ({g.numel()} rows) but this layer's input has "
                f"{x.shape[0]} rows; run one timestep per denoiser call."
            )
        view = (-1,) + (1,) * (x.dim() - 1)
        return self.scale[g].reshape(view), None if self.zero is None else self.zero[g].reshape(view), True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is None or self.bypass:
            return x
        if self.spec.dynamic:
            return fake_quantize(x, self.spec)
        if not bool((self.scale > 0).all()):
            raise DQError(
                "a static activation quantizer has no calibrated scale; this recipe needs calibration data "
                "(pass calib=dq.CalibConfig(...)) or use a recipe with dynamic activations."
            )
        scale, zero, per_row = self._group_params(x)
        if per_row:  # one parameter set per batch row: quantize elementwise against broadcast scales
            z = torch.zeros_like(scale) if zero is None else zero
            q = grid_ste(x.float() / scale + z, self.spec)
            return ((q - z) * scale).to(x.dtype)
        return fake_quantize(x, self.spec, scale, zero)
