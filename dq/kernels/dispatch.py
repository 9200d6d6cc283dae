"""One dispatcher: CUDA tensors run a registered Triton kernel, everything else the torch reference.

A registered CUDA kernel is an adapter that returns None when it cannot take a layer (a group size,
zero point or dtype the kernel does not handle); the dispatcher then logs the reason once at WARNING
and runs the reference. Adapters call the custom ops of dq.kernels.ops, so torch.compile sees one
opaque node per layer.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from dq.kernels.reference import quantized_linear_reference
from dq.quant import PerToken, QuantSpec

logger = logging.getLogger(__name__)

# (weight_format, act_format or None) -> adapter with the signature of quantized_linear_reference
# (x already 2-D) returning the output, or a str saying why the kernel cannot take this layer.
# Progressive weights (dq.quant.progressive) are the "uint4" ones with a channel_scale.
CUDA_KERNELS: dict[tuple[str, str | None], Callable[..., torch.Tensor | str]] = {}
_warned: set[tuple] = set()


def register_cuda_kernel(weight_format: str, act_format: str | None):
    """Decorator: register a CUDA adapter for (weight format, activation format)."""

    def wrap(fn):
        CUDA_KERNELS[(weight_format, act_format)] = fn
        return fn

    return wrap


def _int4_groups(x, qweight, weight_scale, weight_zero, in_features, smallest: int = 64) -> int | str:
    n, groups = weight_scale.shape
    if qweight.shape[1] * 2 != in_features or in_features % groups:
        return f"padded INT4 weights ({qweight.shape[1] * 2} stored for {in_features} features)"
    g = in_features // groups
    if g < smallest or g & (g - 1):
        return f"INT4 weight group size {g} (kernels take powers of two >= {smallest})"
    return g


def _symmetric_int4_groups(x, qweight, weight_scale, weight_zero, in_features) -> int | str:
    return "asymmetric INT4 weights (zero points)" if weight_zero is not None else _int4_groups(x, qweight, weight_scale, weight_zero, in_features)


def _float_act(x: torch.Tensor) -> str | None:
    return None if x.dtype in (torch.float16, torch.bfloat16) else f"activations of dtype {x.dtype}"


@register_cuda_kernel("int4", "int4")
def _w4a4(x, qweight, weight_scale, weight_zero, bias, *, weight_format, in_features, act_spec, smooth, lora_down, lora_up, channel_scale):
    g = _symmetric_int4_groups(x, qweight, weight_scale, weight_zero, in_features)
    if isinstance(g, str):
        return g
    if not act_spec.symmetric or act_spec.granularity != PerToken(g):
        return f"INT4 activations {act_spec} (kernel: symmetric PerToken({g}), the weight's group size)"
    return _float_act(x) or torch.ops.dq.w4_linear(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, g, 4)


@register_cuda_kernel("int4", "int8")
def _w4a8(x, qweight, weight_scale, weight_zero, bias, *, weight_format, in_features, act_spec, smooth, lora_down, lora_up, channel_scale):
    g = _symmetric_int4_groups(x, qweight, weight_scale, weight_zero, in_features)
    if isinstance(g, str):
        return g
    if not act_spec.symmetric or act_spec.granularity != PerToken(None):
        return f"INT8 activations {act_spec} (kernel: symmetric PerToken())"
    return _float_act(x) or torch.ops.dq.w4_linear(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, g, 8)


@register_cuda_kernel("int4", None)
def _w4a16(x, qweight, weight_scale, weight_zero, bias, *, weight_format, in_features, act_spec, smooth, lora_down, lora_up, channel_scale):
    g = _symmetric_int4_groups(x, qweight, weight_scale, weight_zero, in_features)
    if isinstance(g, str):
        return g
    return _float_act(x) or torch.ops.dq.w4a16_linear(x, qweight, weight_scale, bias, smooth, lora_down, lora_up, g)


def _w8(x, qweight, weight_scale, weight_zero, bias, act_spec, smooth, lora_down, lora_up):
    if weight_zero is not None or weight_scale.shape[1] != 1:
        return "8-bit weights that are not symmetric per-channel"
    if not act_spec.symmetric or act_spec.granularity != PerToken(None):
        return f"8-bit activations {act_spec} (kernel: symmetric PerToken())"
    return _float_act(x) or torch.ops.dq.w8a8_linear(x, qweight, weight_scale, bias, smooth, lora_down, lora_up)


@register_cuda_kernel("int8", "int8")
def _w8a8(x, qweight, weight_scale, weight_zero, bias, *, weight_format, in_features, act_spec, smooth, lora_down, lora_up, channel_scale):
    return _w8(x, qweight, weight_scale, weight_zero, bias, act_spec, smooth, lora_down, lora_up)


@register_cuda_kernel("fp8_e4m3", "fp8_e4m3")
def _fp8(x, qweight, weight_scale, weight_zero, bias, *, weight_format, in_features, act_spec, smooth, lora_down, lora_up, channel_scale):
    if torch.cuda.get_device_capability(x.device) < (8, 9):
        return "FP8 on a GPU without FP8 tensor cores (needs sm89+)"
    return _w8(x, qweight, weight_scale, weight_zero, bias, act_spec, smooth, lora_down, lora_up)


@register_cuda_kernel("uint4", "int8")
def _w4a8_progressive(x, qweight, weight_scale, weight_zero, bias, *, weight_format, in_features, act_spec, smooth, lora_down, lora_up, channel_scale):
    if channel_scale is None:
        return "UINT4 weights without progressive channel scales"
    g = _int4_groups(x, qweight, weight_scale, weight_zero, in_features, smallest=32)
    if isinstance(g, str):
        return g
    if not act_spec.symmetric or act_spec.granularity != PerToken(None):
        return f"INT8 activations {act_spec} (kernel: symmetric PerToken())"
    return _float_act(x) or torch.ops.dq.w4a8_progressive_linear(x, qweight, weight_scale, weight_zero, channel_scale, bias, smooth, lora_down, lora_up)


def quantized_linear(
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
    channel_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantized linear layer: y = Q(x/s) deq(W)^T + (x/s) L_down^T L_up^T + b (see dq.kernels.reference).

    channel_scale: the per-channel scale of progressive weights (dq.quant.progressive), else None.
    """
    kwargs = dict(
        weight_format=weight_format,
        in_features=in_features,
        act_spec=act_spec,
        smooth=smooth,
        lora_down=lora_down,
        lora_up=lora_up,
        channel_scale=channel_scale,
    )
    if x.is_cuda:
        key = (weight_format, None if act_spec is None else act_spec.format)
        kernel = CUDA_KERNELS.get(key)
        reason = f"no Triton kernel for weights {key[0]} with activations {key[1]}"
        if kernel is not None:
            if lora_down is not None and lora_down.shape[0] == 0:
                kwargs["lora_down"] = kwargs["lora_up"] = None
            lead = x.shape[:-1]
            out = kernel(x.reshape(-1, in_features).contiguous(), qweight, weight_scale, weight_zero, bias, **kwargs)
            if isinstance(out, torch.Tensor):
                return out.reshape(*lead, out.shape[-1])
            reason = f"the Triton kernel for {key} cannot take {out}"
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("%s: using the torch reference", reason)
    return quantized_linear_reference(x, qweight, weight_scale, weight_zero, bias, **kwargs)
