"""QuantConv2d: an nn.Conv2d whose weight and input are quantized."""

from __future__ import annotations

import torch
from torch import nn

from dq.kernels.reference import buffer_allocator, weight_operand
from dq.nn.base import QuantLayerMixin
from dq.quant import QuantSpec, fake_quantize_channels


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    """nn.Conv2d with quantized weight (flattened to [out, in/groups*kh*kw]) and quantized input.

    Activation granularity is over channels: a "token" is one pixel of one image. The deployed
    forward unpacks the weight into a reused float buffer (dq.kernels.reference.weight_operand) and runs
    the float convolution (no low-bit conv kernel yet).
    """

    kind = "conv2d"

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

    def deployed_weight_operand(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(float weight operand [out, in/groups*kh*kw], per-output-channel scale for the output or None)."""
        return weight_operand(self.qweight, self.weight_scale, self.weight_zero, self.weight_quantizer.spec.format,
                              self.weight_2d_shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deployed:
            return self._conv_forward(self._quantize_input(x), self.fake_quantized_weight(), self.bias)
        w, out_scale = self.deployed_weight_operand()
        w = w.reshape(self.weight_shape).to(x.dtype)
        if out_scale is None:
            return self._conv_forward(self._quantize_input(x), w, self.bias)
        # Per-channel weight scales multiply the (smaller) output instead of the weight.
        y = self._conv_forward(self._quantize_input(x), w, None).mul_(out_scale.to(x.dtype).view(1, -1, 1, 1))
        return y if self.bias is None else y.add_(self.bias.view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"
