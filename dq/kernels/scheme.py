"""The kernel scheme of a deployed layer: which GPU kernel computes it (and how the CPU kernels do), decided
once, when it is deployed.

A layer's stored format (weight codes and scales, activation spec) fixes which Triton kernel can compute it
and with which static arguments. `kernel_scheme` makes that decision from the stored tensors alone; a deployed
layer makes it in `deploy()` (and when it is allocated to load a checkpoint) and passes the frozen result to
`dq.kernels.quantized_linear` on every call. What depends on the call instead is checked there: the
activations' dtype (the kernels take 16-bit inputs) and the device's FP8 support.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from dq.kernels.cpu_kernels import CpuPlan, cpu_plan
from dq.kernels.reference import uses_int_mm
from dq.quant import PerToken, QuantSpec

KERNELS = ("w4a4", "w4a8", "w4a8_progressive", "w4a16", "w8a8", "fp8")
SMALLEST_W4_GROUP = 64  # the INT4 GEMMs step K one group at a time
SMALLEST_PROGRESSIVE_GROUP = 32  # one INT8 MMA step (dq.kernels.w4a8_progressive)


@dataclass(frozen=True)
class KernelScheme:
    """kernel: one of KERNELS, or None (the torch reference runs, for `reason`); group_size: the weights' K group
    (and the INT4 activations'), where the kernel takes one; cpu: what dq's C kernels need on the CPU, or None
    where they do not take the layer (dq.kernels.cpu_linear)."""

    kernel: str | None
    group_size: int | None = None
    reason: str | None = None
    cpu: CpuPlan | None = field(default=None, compare=False)


def _none(reason: str) -> KernelScheme:
    return KernelScheme(None, reason=reason)


def _weight_group(weight_scale: torch.Tensor, in_features: int, packed_in: int, smallest: int) -> int | str:
    """The K group of packed 4-bit weights, or why no kernel takes them."""
    groups = weight_scale.shape[1]
    if packed_in * 2 != in_features or in_features % groups:
        return f"padded INT4 weights ({packed_in * 2} stored for {in_features} features)"
    g = in_features // groups
    if g < smallest or g & (g - 1):
        return f"INT4 weight group size {g} (kernels take powers of two >= {smallest})"
    return g


def _per_token(act: QuantSpec, fmt: str, group: int | None = None) -> bool:
    return act.format == fmt and act.symmetric and act.granularity == PerToken(group) and act.scale_format is None


def kernel_scheme(
    weight_format: str,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    channel_scale: torch.Tensor | None,
    in_features: int,
    act_spec: QuantSpec | None,
) -> KernelScheme:
    """The kernels that compute a deployed layer with these stored tensors and activation spec (None: weight-only,
    or activations already quantized by a static quantizer)."""
    gpu = _gpu_kernel(weight_format, qweight, weight_scale, weight_zero, channel_scale, in_features, act_spec)
    cpu = cpu_plan(weight_format, weight_scale, channel_scale, in_features, act_spec)
    if cpu is not None and uses_int_mm(weight_format, weight_scale, weight_zero, act_spec):
        cpu = replace(cpu, int8_product=True)
    return replace(gpu, cpu=cpu)


def _gpu_kernel(
    weight_format: str,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    channel_scale: torch.Tensor | None,
    in_features: int,
    act_spec: QuantSpec | None,
) -> KernelScheme:
    """The Triton kernel of kernel_scheme, or why none takes the layer."""
    act = act_spec
    if weight_format == "uint4" and channel_scale is not None:  # progressive groups
        g = _weight_group(weight_scale, in_features, qweight.shape[1], SMALLEST_PROGRESSIVE_GROUP)
        if isinstance(g, str):
            return _none(g)
        if act is None or not _per_token(act, "int8"):
            return _none(f"progressive UINT4 weights with activations {act} (kernel: symmetric INT8 PerToken())")
        return KernelScheme("w4a8_progressive", g)
    if weight_format == "int4":
        if weight_zero is not None:
            return _none("asymmetric INT4 weights (zero points)")
        g = _weight_group(weight_scale, in_features, qweight.shape[1], SMALLEST_W4_GROUP)
        if isinstance(g, str):
            return _none(g)
        if act is None:
            return KernelScheme("w4a16", g)
        if _per_token(act, "int4", g):
            return KernelScheme("w4a4", g)
        if _per_token(act, "int8"):
            return KernelScheme("w4a8", g)
        return _none(f"INT4 weights with activations {act} (kernels: symmetric INT4 PerToken({g}) or INT8 PerToken())")
    if weight_format in ("int8", "fp8_e4m3"):
        if weight_zero is not None or weight_scale.shape[1] != 1:
            return _none("8-bit weights that are not symmetric per-channel")
        if act is None or not _per_token(act, weight_format):
            return _none(f"{weight_format} weights with activations {act} (kernel: symmetric {weight_format} PerToken())")
        return KernelScheme("w8a8" if weight_format == "int8" else "fp8")
    return _none(f"no Triton kernel for weights {weight_format} with activations {None if act is None else act.format}")


__all__ = ["KERNELS", "KernelScheme", "kernel_scheme"]
