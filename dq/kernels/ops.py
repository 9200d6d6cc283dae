"""torch.library custom ops over the Triton launchers, with fake (meta) implementations.

torch.compile treats each op as one opaque node (no graph break), and its fake implementation gives
the output shape. On CUDA tensors the ops launch the Triton kernels; on any other device they run
the torch reference, so an op is valid everywhere. All ops take a 2-D x [M, K] and return [M, N].
"""

from __future__ import annotations

from typing import Optional

import torch

from dq.kernels.reference import quantized_linear_reference
from dq.quant import PerToken, QuantSpec

Tensor = torch.Tensor


def _reference(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, weight_format, act_spec):
    return quantized_linear_reference(
        x, qweight, weight_scale, None, bias, weight_format=weight_format, in_features=x.shape[-1],
        act_spec=act_spec, smooth=smooth, lora_down=lora_down, lora_up=lora_up,
    )


def _empty_out(x: Tensor, qweight: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], qweight.shape[0]))


@torch.library.custom_op("dq::w4_linear", mutates_args=())
def w4_linear(
    x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor],
    lora_down: Optional[Tensor], lora_up: Optional[Tensor], group_size: int, act_bits: int,
) -> Tensor:
    """INT4 weights (groups of group_size along K) with INT4 (act_bits=4, same groups) or INT8 per-token activations."""
    if x.is_cuda:
        from dq.kernels.w4a4_gemm import w4_linear as triton_w4_linear  # Triton loads on the first CUDA call only

        return triton_w4_linear(x, qweight, weight_scale, bias, group_size, act_bits, smooth, lora_down, lora_up)
    spec = QuantSpec("int4", PerToken(group_size)) if act_bits == 4 else QuantSpec("int8", PerToken())
    return _reference(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, "int4", spec)


@w4_linear.register_fake
def _(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, group_size, act_bits):
    return _empty_out(x, qweight)


@torch.library.custom_op("dq::w8a8_linear", mutates_args=())
def w8a8_linear(
    x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor],
    lora_down: Optional[Tensor], lora_up: Optional[Tensor],
) -> Tensor:
    """Per-channel INT8 (or FP8 e4m3, by qweight's dtype) weights with per-token activations of the same format."""
    if x.is_cuda:
        from dq.kernels.w8a8_gemm import w8a8_linear as launch  # Triton loads on the first CUDA call only

        return launch(x, qweight, weight_scale, bias, smooth, lora_down, lora_up)
    fmt = "int8" if qweight.dtype == torch.int8 else "fp8_e4m3"
    return _reference(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, fmt, QuantSpec(fmt, PerToken()))


@w8a8_linear.register_fake
def _(x, qweight, weight_scale, bias, smooth, lora_down, lora_up):
    return _empty_out(x, qweight)


@torch.library.custom_op("dq::w4a8_progressive_linear", mutates_args=())
def w4a8_progressive_linear(
    x: Tensor, qweight: Tensor, group_scale: Tensor, group_zero: Tensor, channel_scale: Tensor, bias: Optional[Tensor],
    smooth: Optional[Tensor], lora_down: Optional[Tensor], lora_up: Optional[Tensor],
) -> Tensor:
    """Progressive-group UINT4 weights (dq.quant.progressive) with INT8 per-token activations."""
    if x.is_cuda:
        from dq.kernels.w4a8_progressive import w4a8_progressive_linear as launch  # Triton loads on the first CUDA call only

        return launch(x, qweight, group_scale, group_zero, channel_scale, bias, smooth, lora_down, lora_up)
    return quantized_linear_reference(
        x, qweight, group_scale, group_zero, bias, weight_format="uint4", in_features=x.shape[-1],
        act_spec=QuantSpec("int8", PerToken()), smooth=smooth, lora_down=lora_down, lora_up=lora_up, channel_scale=channel_scale,
    )


@w4a8_progressive_linear.register_fake
def _(x, qweight, group_scale, group_zero, channel_scale, bias, smooth, lora_down, lora_up):
    return _empty_out(x, qweight)


@torch.library.custom_op("dq::w4a16_linear", mutates_args=())
def w4a16_linear(
    x: Tensor, qweight: Tensor, weight_scale: Tensor, bias: Optional[Tensor], smooth: Optional[Tensor],
    lora_down: Optional[Tensor], lora_up: Optional[Tensor], group_size: int,
) -> Tensor:
    """Weight-only INT4 (groups of group_size along K), 16-bit activations."""
    if x.is_cuda:
        from dq.kernels.w4a16_gemm import w4a16_linear as launch  # Triton loads on the first CUDA call only

        return launch(x, qweight, weight_scale, bias, group_size, smooth, lora_down, lora_up)
    return _reference(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, "int4", None)


@w4a16_linear.register_fake
def _(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, group_size):
    return _empty_out(x, qweight)
