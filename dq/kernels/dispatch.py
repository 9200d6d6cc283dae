"""One dispatcher: CUDA tensors run a registered Triton kernel, everything else the torch reference."""

from __future__ import annotations

import logging
from typing import Callable

import torch

from dq.kernels.reference import quantized_linear_reference
from dq.quant import QuantSpec

logger = logging.getLogger(__name__)

# Triton implementations register here: (weight_format, act_format or None) -> callable with the
# signature of quantized_linear_reference. A missing entry on CUDA falls back with one WARNING.
CUDA_KERNELS: dict[tuple[str, str | None], Callable[..., torch.Tensor]] = {}
_warned: set[tuple[str, str | None]] = set()


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
) -> torch.Tensor:
    """Quantized linear layer: y = Q(x/s) deq(W)^T + (x/s) L_down^T L_up^T + b (see dq.kernels.reference)."""
    key = (weight_format, None if act_spec is None else act_spec.format)
    kwargs = dict(
        weight_format=weight_format,
        in_features=in_features,
        act_spec=act_spec,
        smooth=smooth,
        lora_down=lora_down,
        lora_up=lora_up,
    )
    if x.is_cuda:
        kernel = CUDA_KERNELS.get(key)
        if kernel is not None:
            return kernel(x, qweight, weight_scale, weight_zero, bias, **kwargs)
        if key not in _warned:
            _warned.add(key)
            logger.warning("no Triton kernel for weights %s with activations %s: using the torch reference", *key)
    return quantized_linear_reference(x, qweight, weight_scale, weight_zero, bias, **kwargs)
