"""One dispatcher: CUDA tensors run the Triton kernel of the layer's kernel scheme, everything else the torch reference.
(Deployed layers on the CPU call dq.kernels.cpu_linear first, which computes the reference's values in C.)

A deployed layer decides its KernelScheme once (dq.kernels.scheme) and passes it with every call. Here only
what depends on the call is checked: 16-bit activations, and FP8 tensor cores for the FP8 kernel. A layer no
kernel takes runs the reference on the GPU too, and the reason is logged once at WARNING. The kernels are the
custom ops of dq.kernels.ops, so torch.compile sees one opaque node per layer.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from dq.kernels.reference import quantized_linear_reference
from dq.kernels.scheme import KernelScheme, kernel_scheme
from dq.quant import QuantSpec

logger = logging.getLogger(__name__)
_warned: set[str] = set()

# kernel name -> launcher(x [M, K] contiguous 16-bit, qweight, weight_scale, weight_zero, channel_scale, bias,
# smooth, lora_down, lora_up, group_size) -> y [M, N]
LAUNCHERS: dict[str, Callable[..., torch.Tensor]] = {
    "w4a4": lambda x, q, s, z, c, b, sm, ld, lu, g: torch.ops.dq.w4_linear(x, q, s, b, sm, ld, lu, g, 4),
    "w4a8": lambda x, q, s, z, c, b, sm, ld, lu, g: torch.ops.dq.w4_linear(x, q, s, b, sm, ld, lu, g, 8),
    "w4a16": lambda x, q, s, z, c, b, sm, ld, lu, g: torch.ops.dq.w4a16_linear(x, q, s, b, sm, ld, lu, g),
    "w4a8_progressive": lambda x, q, s, z, c, b, sm, ld, lu, g: torch.ops.dq.w4a8_progressive_linear(x, q, s, z, c, b, sm, ld, lu),
    "w8a8": lambda x, q, s, z, c, b, sm, ld, lu, g: torch.ops.dq.w8a8_linear(x, q, s, b, sm, ld, lu),
    "fp8": lambda x, q, s, z, c, b, sm, ld, lu, g: torch.ops.dq.w8a8_linear(x, q, s, b, sm, ld, lu),
}


def _runtime_reason(x: torch.Tensor, scheme: KernelScheme) -> str | None:
    """Why this call cannot run the scheme's kernel (None: it can)."""
    if scheme.kernel is None:
        return scheme.reason
    if x.dtype not in (torch.float16, torch.bfloat16):
        return f"the {scheme.kernel} kernel cannot take activations of dtype {x.dtype}"
    if scheme.kernel == "fp8" and torch.cuda.get_device_capability(x.device) < (8, 9):
        return "FP8 on a GPU without FP8 tensor cores (needs sm89+)"
    return None


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
    scheme: KernelScheme | None = None,
) -> torch.Tensor:
    """Quantized linear layer: y = Q(x/s) deq(W)^T + (x/s) L_down^T L_up^T + b (see dq.kernels.reference).

    channel_scale: the per-channel scale of progressive weights (dq.quant.progressive), else None.
    scheme: the layer's kernel scheme (decided at deploy); None decides it here, from the same arguments.
    """
    if x.is_cuda:
        scheme = scheme or kernel_scheme(weight_format, qweight, weight_scale, weight_zero, channel_scale, in_features, act_spec)
        reason = _runtime_reason(x, scheme)
        if reason is None:
            if lora_down is not None and lora_down.shape[0] == 0:
                lora_down = lora_up = None
            lead = x.shape[:-1]
            out = LAUNCHERS[scheme.kernel](x.reshape(-1, in_features).contiguous(), qweight, weight_scale, weight_zero,
                                           channel_scale, bias, smooth, lora_down, lora_up, scheme.group_size)
            return out.reshape(*lead, out.shape[-1])
        if reason not in _warned:
            _warned.add(reason)
            logger.warning("%s: using the torch reference", reason)
    return quantized_linear_reference(
        x, qweight, weight_scale, weight_zero, bias, weight_format=weight_format, in_features=in_features,
        act_spec=act_spec, smooth=smooth, lora_down=lora_down, lora_up=lora_up, channel_scale=channel_scale,
    )
