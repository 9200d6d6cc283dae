"""QuantConv2d: an nn.Conv2d whose weight and input are quantized."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from dq.kernels.reference import buffer_allocator, weight_tile_rows, weight_tiles
from dq.nn.base import QuantLayerMixin
from dq.quant import QuantSpec, cast, fake_quantize_channels


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d with quantized weight (flattened to [out, in/groups*kh*kw]) and quantized input.

    Activation granularity is over channels: a "token" is one pixel of one image. The deployed
    forward unpacks the weight into reused float buffers, whole or a tile of output channels at a time
    (dq.kernels.reference.weight_tiles), and runs the float convolution (no low-bit conv kernel yet).
    """

    kind = "conv2d"

    def __new__(cls, *args, **kwargs):
        # PEFT builds a conv LoRA's factors as `type(base_layer)(in, r, kernel, stride, padding, bias=False)`:
        # torch's own signature (channels first) gets the plain nn.Conv2d those factors are.
        if args and isinstance(args[0], int):
            return nn.Conv2d(*args, **kwargs)
        return super().__new__(cls)

    def __init__(self, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None) -> None:
        super().__init__(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            stride=conv.stride,
            padding=conv.padding,
            dilation=conv.dilation,
            groups=conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
            device="meta",
        )
        self._init_quantizers(weight_spec, act_spec)
        self._adopt(conv)

    @classmethod
    def wrap(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None, **options) -> "QuantConv2d":
        """A QuantConv2d sharing `conv`'s parameters (weight scales not yet set)."""
        layer = cls(conv, weight_spec, act_spec)
        layer.apply_options(**options)
        return layer

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @property
    def weight_2d_shape(self) -> tuple[int, int]:
        kh, kw = self.kernel_size
        return self.out_channels, self.in_channels // self.groups * kh * kw

    def _quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        aq = self.act_quantizer
        if not aq.enabled:
            return x
        if aq.spec.dynamic and not aq.bypass and not torch.is_grad_enabled():
            # The same values as the quantizer gives, without a channels-last copy, into a reused buffer.
            out = buffer_allocator(x.device)("conv_input", tuple(x.shape), torch.float32, x.device)
            return fake_quantize_channels(x, aq.spec, out)
        return aq(x.movedim(1, -1)).movedim(-1, 1)

    def deployed_weight_tiles(self, rows: int) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
        """(output-channel slice, float weight operand [channels, in/groups*kh*kw], per-channel scale for the
        output or None), `rows` output channels at a time (0: all at once; dq.kernels.reference.weight_tiles)."""
        return weight_tiles(self.qweight, self.weight_scale, self.weight_zero, self.weight_quantizer.spec.format,
                            self.weight_2d_shape[1], rows, self.weight_channel_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deployed:
            return self._conv_forward(self._quantize_input(x), self.fake_quantized_weight(), self.bias)
        xq = self._quantize_input(x)
        cpu_tiles = x.device.type == "cpu" and not torch.is_grad_enabled() and self.groups == 1
        rows = weight_tile_rows(xq.numel() * 4, self.out_channels, self.weight_2d_shape[1]) if cpu_tiles else 0
        parts = [self._conv_rows(xq, sl, w, scale) for sl, w, scale in self.deployed_weight_tiles(rows)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _conv_rows(self, xq: torch.Tensor, rows: slice, w2d: torch.Tensor, out_scale: torch.Tensor | None) -> torch.Tensor:
        """The output channels `rows`; a per-channel weight scale multiplies the (smaller) output, not the weight."""
        w = cast(w2d.reshape(-1, *self.weight_shape[1:]), xq.dtype)
        bias = None if self.bias is None else self.bias[rows]
        if out_scale is None:
            return self._conv_forward(xq, w, bias)
        y = self._conv_forward(xq, w, None).mul_(cast(out_scale, xq.dtype).view(1, -1, 1, 1))
        return y if bias is None else y.add_(bias.view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"
