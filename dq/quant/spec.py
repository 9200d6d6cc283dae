"""QuantSpec: what a quantizer does (format, granularity, symmetry, static or dynamic), and its scales."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dq.errors import DQError
from dq.quant.formats import NumberFormat, get_format
from dq.quant.granularity import Granularity, PerTensor, PerToken, Progressive, granularity_from_name, granularity_name


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Args:
        format: a registered format name (int2..int8, uint2..uint8, fp8_e4m3, fp8_e5m2, fp4_e2m1).
        granularity: PerTensor, PerChannel, PerGroup(g), Progressive(g) (weights: QServe's two-level groups)
            or PerToken(g) (dynamic activations).
        symmetric: zero point fixed at 0 (always true for float formats).
        scale_format: optionally quantize the scales themselves (e.g. "fp8_e4m3" for NVFP4-style scales).
    """

    format: str
    granularity: Granularity = PerTensor()
    symmetric: bool = True
    scale_format: str | None = None

    def __post_init__(self) -> None:
        fmt = get_format(self.format)
        if not fmt.is_integer and not self.symmetric:
            raise DQError(f"format {self.format} is a float format: it supports symmetric quantization only.")
        if isinstance(self.granularity, Progressive) and (self.format != "uint4" or self.symmetric or self.scale_format):
            raise DQError("progressive groups are UINT4 with zero points: use format uint4, symmetric: false, no scale_format.")

    @property
    def fmt(self) -> NumberFormat:
        return get_format(self.format)

    @property
    def dynamic(self) -> bool:
        """Per-token specs compute their scales from each input at run time."""
        return isinstance(self.granularity, PerToken)


def cast(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t in `dtype`, without a dispatch when it already is (a no-op .to() costs microseconds per layer call)."""
    return t if t.dtype == dtype else t.to(dtype)


def qrange(spec: QuantSpec) -> tuple[float, float]:
    fmt = spec.fmt
    if fmt.is_integer:
        return float(fmt.qmin), float(fmt.qmax)
    return -fmt.max_value, fmt.max_value


def scales_from_range(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that map [lo, hi] (per group) onto the format's grid.

    Symmetric: scale = max(|lo|, |hi|) / qmax, zero = 0 (unsigned formats use hi / qmax).
    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero = round(qmin - lo / scale).
    """
    fmt = spec.fmt
    qmin, qmax = qrange(spec)
    lo = torch.minimum(lo.float(), torch.zeros_like(lo, dtype=torch.float32))
    hi = torch.maximum(hi.float(), torch.zeros_like(hi, dtype=torch.float32))
    tiny = torch.finfo(torch.float32).tiny
    if spec.symmetric:
        if fmt.is_integer and not fmt.signed:
            scale = hi / qmax
        else:
            scale = torch.maximum(-lo, hi) / qmax
        scale = quantize_scale(scale.clamp(min=tiny), spec)
        return scale, torch.zeros_like(scale)
    scale = quantize_scale(((hi - lo) / (qmax - qmin)).clamp(min=tiny), spec)
    zero = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero


def scales_are_absmax(spec: QuantSpec) -> bool:
    """Dynamic scales of this spec are each group's absmax / qmax: symmetric, signed (or float), unquantized."""
    fmt = spec.fmt
    return spec.symmetric and spec.scale_format is None and not (fmt.is_integer and not fmt.signed)


# torch's CPU min/max reductions over a dimension that is not innermost are vectorized along the dimensions
# after it; when those hold few elements (a conv input's channels at 4x4 or 2x2 positions) the reduction is
# several times slower than over a contiguous copy with the dimension moved last (2-core EPYC: 16 x 64 x 4 x 4,
# 134 us vs 50 us; 16 x 128 x 2 x 2, 55 us vs 16 us). Deployed CPU convs take this path only without dq's C
# kernels (dq.kernels.cpu_kernels), which reduce over the channels in one pass.
# Min and max are exact, so the copy gives the same values.
SMALL_INNER = 64


def _range_along(g: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of g along `dim`, kept."""
    dim = dim % g.dim()
    if dim == g.dim() - 1 or math.prod(g.shape[dim + 1:]) >= SMALL_INNER or g.device.type != "cpu":
        return g.amin(dim, keepdim=True), g.amax(dim, keepdim=True)
    last = g.movedim(dim, -1).contiguous()
    return last.amin(-1, keepdim=True).movedim(-1, dim), last.amax(-1, keepdim=True).movedim(-1, dim)


def dynamic_scales(g: torch.Tensor, spec: QuantSpec, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale and zero point of each group of g along `dim` (kept), as scales_from_range(min, max) gives them.

    For symmetric signed (and float) formats without scale quantization this takes five small ops instead
    of ten: max(-min(lo, 0), max(hi, 0)) == max(-lo, hi) whenever lo <= hi, so the result is bit-identical.
    Deployed CPU layers call it on every input.
    """
    lo, hi = _range_along(g, dim)
    if not scales_are_absmax(spec):
        return scales_from_range(lo, hi, spec)
    scale = torch.maximum(lo.neg_(), hi).div_(qrange(spec)[1]).clamp_(min=torch.finfo(torch.float32).tiny)
    return scale, None


def quantize_scale(scale: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round scales to `spec.scale_format` when set, under one per-tensor float scale (NVFP4 style).

    Values whose group scale rounded down saturate at the format's max, as in the NVFP4 recipe.
    """
    if spec.scale_format is None:
        return scale
    sfmt = get_format(spec.scale_format)
    outer = scale.amax().clamp(min=torch.finfo(torch.float32).tiny) / sfmt.max_value
    return (sfmt.round(scale / outer) * outer).clamp(min=torch.finfo(torch.float32).tiny)


def dynamic_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max of `x` in the grouped view of `spec.granularity` (kept dims)."""
    g = spec.granularity.grouped(x)
    return g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)


def spec_to_dict(spec: QuantSpec) -> dict:
    """JSON-safe form of a spec (the form stored in quantization_config)."""
    g = spec.granularity
    return {
        "format": spec.format,
        "granularity": granularity_name(g),
        "group_size": getattr(g, "group_size", None),
        "symmetric": spec.symmetric,
        "scale_format": spec.scale_format,
    }


def spec_from_dict(d: dict) -> QuantSpec:
    """Inverse of spec_to_dict; unknown keys are errors naming them."""
    allowed = {"format", "granularity", "group_size", "symmetric", "scale_format"}
    unknown = set(d) - allowed
    if unknown:
        raise DQError(f"unknown quantizer field(s) {sorted(unknown)}; allowed: {sorted(allowed)}.")
    if "format" not in d:
        raise DQError("a quantizer needs a 'format' field (e.g. int4, int8, fp8_e4m3, fp4_e2m1).")
    return QuantSpec(
        format=d["format"],
        granularity=granularity_from_name(d.get("granularity", "tensor"), d.get("group_size")),
        symmetric=d.get("symmetric", True),
        scale_format=d.get("scale_format"),
    )
