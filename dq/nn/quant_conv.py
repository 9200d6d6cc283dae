"""QuantConv2d: an nn.Conv2d whose weight and input are quantized."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from dq.kernels import cpu_kernels
from dq.kernels.reference import buffer_allocator, reused_buffer, weight_tile_rows, weight_tiles
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
            params = cpu_kernels.row_quantization(aq.spec)
            if params is not None and x.dtype == torch.float32 and x.is_contiguous() and cpu_kernels.takes(x):
                cpu_kernels.quantize_channels(x, *params, out)  # the same values in one pass
                return out
            return fake_quantize_channels(x, aq.spec, out)
        return aq(x.movedim(1, -1)).movedim(-1, 1)

    def deployed_weight_tiles(self, rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
        """(output-channel slice, dequantized float weight [channels, in/groups*kh*kw]), `rows` output channels
        at a time (0: all at once; dq.kernels.reference.weight_tiles)."""
        return weight_tiles(self.qweight, self.weight_scale, self.weight_zero, self.weight_quantizer.spec.format,
                            self.weight_2d_shape[1], rows, self.weight_channel_scale)

    # -- deploy ------------------------------------------------------------------------------------------
    cpu_plan: cpu_kernels.CpuPlan | None = None  # what dq's C kernels need on the CPU (None: torch ops)

    def deploy(self) -> None:
        super().deploy()
        self._plan_cpu()

    def allocate_deployed(self, device: torch.device | str = "cpu") -> None:
        super().allocate_deployed(device)
        self._plan_cpu()

    def _plan_cpu(self) -> None:
        """Decide once, from the stored tensors, whether dq's C kernels prepare this layer's operands on the CPU."""
        aq = self.act_quantizer
        plan = None
        if self.groups == 1 and (not aq.enabled or aq.spec.dynamic):
            plan = cpu_kernels.cpu_plan(self.weight_quantizer.spec.format, self.weight_scale, self.weight_channel_scale,
                                        self.in_channels, aq.spec)
        self.cpu_plan = plan

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.deployed:
            return self._conv_forward(self._quantize_input(x), self.fake_quantized_weight(), self.bias)
        if self.cpu_plan is not None:
            y = self._cpu_forward(x, self.cpu_plan)
            if y is not None:
                return y
        xq = self._quantize_input(x)
        cpu_tiles = x.device.type == "cpu" and not torch.is_grad_enabled() and self.groups == 1
        rows = weight_tile_rows(xq.numel() * 4, self.out_channels, self.weight_2d_shape[1]) if cpu_tiles else 0
        parts = [
            self._conv_forward(xq, cast(w2d.reshape(-1, *self.weight_shape[1:]), xq.dtype), self.bias if self.bias is None or not rows else self.bias[sl])
            for sl, w2d in self.deployed_weight_tiles(rows)
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _cpu_forward(self, x: torch.Tensor, plan: cpu_kernels.CpuPlan) -> torch.Tensor | None:
        """One C call for both operands (the input quantized per pixel, the weight dequantized), then the float
        convolution: the values of the torch-op path, bit for bit. None where that does not apply (autograd,
        a non-FP32, unbatched or non-contiguous input, a weight streamed in tiles, the kernels not built, a bypassed quantizer)."""
        lib = cpu_kernels.library()
        if lib is None or torch.is_grad_enabled() or x.dtype != torch.float32 or x.is_cuda or x.dim() != 4 or not x.is_contiguous():
            return None
        out_f, in_f = self.weight_2d_shape
        if self.act_quantizer.bypass or weight_tile_rows(x.numel() * 4, out_f, in_f):
            return None
        b = self._buffers
        qweight, scale, zero, channel = b["qweight"], b["weight_scale"], b["weight_zero"], b["weight_channel_scale"]
        xq = reused_buffer("conv_input", tuple(x.shape), torch.float32, x.device) if plan.act_qmax else x
        w = reused_buffer("decode_codes.grid", (out_f, in_f), torch.float32, x.device)
        lib.dq_conv_operands(
            x.data_ptr(), x.shape[0], x.shape[1], x.shape[2] * x.shape[3], plan.act_group, plan.act_qmax, xq.data_ptr(),
            qweight.data_ptr(), out_f, in_f, qweight.stride(0), plan.bits, plan.signed, scale.data_ptr(),
            None if zero is None else zero.data_ptr(), plan.scale_dtype, scale.shape[0], scale.shape[1],
            None if channel is None else channel.data_ptr(), w.data_ptr(),
        )
        return self._conv_forward(xq, w.view(self.weight_shape), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.quant_repr()}"
