"""QuantSplitConv2d: a conv whose input is a concatenation cat([h, skip]) quantized as two halves.

Q-Diffusion's split shortcut: in a UNet decoder the resnet input is cat([h, skip], dim=1) and the two
halves have activation (and matching weight) ranges up to ~200x apart, so one scale for the whole
input wastes the grid on one half. This layer keeps two activation quantizers and two weight
quantizers (the weight split along input channels at the same point). The split point is a layer
option, so a saved checkpoint rebuilds it.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from dq.errors import DQError
from dq.nn.base import SCALE_DTYPE
from dq.nn.quant_conv import QuantConv2d
from dq.nn.quantizer import ActQuantizer, WeightQuantizer
from dq.nn.swap import QUANT_LAYER_TYPES
from dq.quant import Progressive, QuantSpec
from dq.quant.storage import dequantize_stored, encode_codes, storage_shape_dtype
from dq.sizes import tensors_bytes

_HALVES = ("", "_skip")  # buffer-name suffixes of the h half and the skip half


class QuantSplitConv2d(QuantConv2d):
    """nn.Conv2d over cat([h, skip]) with separate quantizers for input channels [:split] and [split:].

    Example:
        >>> conv = nn.Conv2d(96, 32, 1)                    # h has 64 channels, skip 32
        >>> layer = QuantSplitConv2d.from_float(conv, QuantSpec("int4", PerChannel()), None, split=64)
        >>> y = layer(torch.randn(1, 96, 8, 8))
    """

    kind = "split_conv2d"

    def __init__(self, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None, split: int) -> None:
        if conv.groups != 1:
            raise DQError(f"a split-input conv needs groups=1, got groups={conv.groups}; do not split this layer.")
        if not 0 < split < conv.in_channels:
            raise DQError(f"split point {split} must lie strictly inside the {conv.in_channels} input channels.")
        if isinstance(weight_spec.granularity, Progressive):
            raise DQError("split-input convs take per-channel or per-group weights, not progressive groups; skip the split (split_shortcut: false).")
        self.split = int(split)
        super().__init__(conv, weight_spec, act_spec)

    def _init_quantizers(self, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> None:
        kh, kw = self.kernel_size
        self.weight_quantizer = WeightQuantizer(weight_spec, self.out_channels, self.split * kh * kw)
        self.weight_quantizer_skip = WeightQuantizer(weight_spec, self.out_channels, (self.in_channels - self.split) * kh * kw)
        self.act_quantizer = ActQuantizer(act_spec)
        self.act_quantizer_skip = ActQuantizer(act_spec)

    def _adopt(self, module: nn.Module) -> None:
        super()._adopt(module)
        self.weight_quantizer_skip.to(module.weight.device)
        self.act_quantizer_skip.to(module.weight.device)

    @classmethod
    def wrap(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None, split: int = 0, **options) -> "QuantSplitConv2d":
        """A QuantSplitConv2d sharing `conv`'s parameters, split at input channel `split`."""
        layer = cls(conv, weight_spec, act_spec, split)
        layer.apply_options(**options)
        return layer

    def apply_options(self, act_groups: int = 1, **unknown) -> None:
        super().apply_options(act_groups=act_groups, **unknown)
        if act_groups != 1:
            self.act_quantizer_skip.set_groups(int(act_groups), device=self.weight_quantizer.scale.device)

    def layer_options(self) -> dict:
        return {**super().layer_options(), "split": self.split}

    # -- the two halves ---------------------------------------------------------------------------
    def weight_quantizers(self) -> tuple[WeightQuantizer, WeightQuantizer]:
        return self.weight_quantizer, self.weight_quantizer_skip

    def weight_halves_2d(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The float weight's two input-channel halves, each flattened to [out, half*kh*kw]."""
        a, b = w[:, : self.split], w[:, self.split :]
        return a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)

    def init_weight_scales(self) -> None:
        for wq, half in zip(self.weight_quantizers(), self.weight_halves_2d(self._parameters["weight"].detach())):
            wq.init_minmax(half)

    def fake_quantized_weight(self) -> torch.Tensor:
        w = self._parameters["weight"]
        halves = [wq(h) for wq, h in zip(self.weight_quantizers(), self.weight_halves_2d(w))]
        kh, kw = self.kernel_size
        return torch.cat([h.reshape(w.shape[0], -1, kh, kw) for h in halves], dim=1)

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if not self.act_quantizer.enabled:
            return x
        a, b = x[:, : self.split], x[:, self.split :]
        a = self.act_quantizer(a.movedim(1, -1)).movedim(-1, 1)
        b = self.act_quantizer_skip(b.movedim(1, -1)).movedim(-1, 1)
        return torch.cat([a, b], dim=1)

    # -- deploy: one packed tensor (and scales) per half -------------------------------------------
    @torch.no_grad()
    def deploy(self) -> None:
        if self.deployed:
            return
        halves = self.weight_halves_2d(self._parameters["weight"].detach())
        del self._parameters["weight"]
        for suffix, wq, half in zip(_HALVES, self.weight_quantizers(), halves):
            self.register_buffer(f"qweight{suffix}", encode_codes(wq.grid(half), wq.spec.format))
            wq.rounding = None
            self.register_buffer(f"weight_scale{suffix}", wq.scale.to(SCALE_DTYPE))
            self.register_buffer(f"weight_zero{suffix}", None if wq.zero is None else wq.zero.to(SCALE_DTYPE))
            wq.scale, wq.zero = None, None

    def allocate_deployed(self, device: torch.device | str = "cpu") -> None:
        del self._parameters["weight"]
        for suffix, wq in zip(_HALVES, self.weight_quantizers()):
            shape, dtype = storage_shape_dtype(wq.spec.format, wq.out_features, wq.in_features)
            self.register_buffer(f"qweight{suffix}", torch.empty(shape, dtype=dtype, device=device))
            self.register_buffer(f"weight_scale{suffix}", torch.empty(tuple(wq.scale.shape), dtype=SCALE_DTYPE, device=device))
            zero = None if wq.zero is None else torch.empty(tuple(wq.zero.shape), dtype=SCALE_DTYPE, device=device)
            self.register_buffer(f"weight_zero{suffix}", zero)
            wq.scale, wq.zero = None, None

    def dequantized_weight(self) -> torch.Tensor:
        kh, kw = self.kernel_size
        halves = []
        for suffix, wq in zip(_HALVES, self.weight_quantizers()):
            w2d = dequantize_stored(
                getattr(self, f"qweight{suffix}"), getattr(self, f"weight_scale{suffix}"),
                getattr(self, f"weight_zero{suffix}"), wq.spec.format, wq.in_features,
            )
            halves.append(w2d.reshape(self.out_channels, -1, kh, kw))
        return torch.cat(halves, dim=1).to(self.weight_dtype)

    def deployed_weight_tiles(self, rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """One tile: the two halves' weights dequantized and joined along the input channels."""
        yield slice(None), self.dequantized_weight().reshape(self.weight_2d_shape)

    def weight_nbytes(self) -> int:
        if not self.deployed:
            return super().weight_nbytes()
        names = [f"{n}{s}" for s in _HALVES for n in ("qweight", "weight_scale", "weight_zero")]
        return tensors_bytes([getattr(self, n) for n in names])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, split={self.split}"


QUANT_LAYER_TYPES[QuantSplitConv2d.kind] = QuantSplitConv2d

