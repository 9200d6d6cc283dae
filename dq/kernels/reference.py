"""Torch reference ops: the exact math every kernel implements, run on CPU (and used to check kernels).

    y = Q(x / smooth) @ deq(W)^T + ((x / smooth) @ lora_down^T) @ lora_up^T + bias

Q is the activation quantizer (dynamic, per token and optionally per group); deq(W) dequantizes the
stored weight. When both sides are INT8 with one scale per row (per-token activations, per-channel
weights, no zero point) the product runs as a real integer GEMM through torch._int_mm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dq.quant import PerToken, QuantSpec, dynamic_range, fake_quantize, scales_from_range
from dq.quant.storage import dequantize_stored


def int8_rowwise(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric INT8 codes of a 2-D x and their [M, 1] scales."""
    lo, hi = dynamic_range(x.float(), spec)
    scale, _ = scales_from_range(lo, hi, spec)
    scale = scale.reshape(x.shape[0], 1)
    return torch.clamp(torch.round(x.float() / scale), -128, 127).to(torch.int8), scale


def uses_int_mm(weight_format: str, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None, act_spec: QuantSpec | None) -> bool:
    """True when the INT8 x INT8 integer GEMM computes this layer exactly."""
    return (
        weight_format == "int8"
        and weight_zero is None
        and weight_scale.shape[1] == 1
        and act_spec is not None
        and act_spec.format == "int8"
        and act_spec.symmetric
        and act_spec.granularity == PerToken(None)
    )


def quantized_linear_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    weight_format: str,
    in_features: int,
    act_spec: QuantSpec | None,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reference quantized linear; x is [..., in_features], returns [..., out_features] in x.dtype."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, in_features)
    if smooth is not None:
        x2 = x2 / smooth.to(x2.dtype)
    if uses_int_mm(weight_format, weight_scale, weight_zero, act_spec):
        xq, xs = int8_rowwise(x2, act_spec)
        if xq.is_cuda and xq.shape[0] > 16:
            acc = torch._int_mm(xq, qweight.t().contiguous())
        else:  # _int_mm needs more than 16 rows on CUDA; float64 holds every INT8 dot product exactly
            acc = xq.double() @ qweight.t().double()
        y = acc.float() * xs * weight_scale.float().reshape(1, -1)
    else:
        w = dequantize_stored(qweight, weight_scale, weight_zero, weight_format, in_features)
        xa = x2.float() if act_spec is None else fake_quantize(x2.float(), act_spec)
        y = F.linear(xa, w)
    if lora_down is not None and lora_down.shape[0] > 0:
        y = y + (x2.to(lora_down.dtype) @ lora_down.t() @ lora_up.t()).float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, -1)
