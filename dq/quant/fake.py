"""Quantize, dequantize and fake-quantize with a straight-through estimator."""

from __future__ import annotations

import torch

from dq.errors import DQError
from dq.quant.granularity import Progressive
from dq.quant.progressive import progressive_fake_quantize
from dq.quant.spec import QuantSpec, cast, dynamic_range, dynamic_scales, qrange, scales_are_absmax, scales_from_range


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach()


def grid_ste(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round to the format's grid with a straight-through gradient; clamping passes no gradient outside."""
    fmt = spec.fmt
    if fmt.is_integer:
        qmin, qmax = qrange(spec)
        return torch.clamp(round_ste(x), qmin, qmax)
    clipped = torch.clamp(x, -fmt.max_value, fmt.max_value)
    return clipped + (fmt.round(clipped.detach()) - clipped).detach()


def fake_quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor | None = None,
    zero: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize and dequantize `x` in its own dtype, differentiable (STE) in x and scale.

    Static specs pass scale (and zero) in the grouped shape; dynamic specs compute them from x.
    `out`, a float32 tensor of x's shape, receives the values when no gradient is needed.
    """
    shape, dtype = x.shape, x.dtype
    if isinstance(spec.granularity, Progressive):
        if scale is not None or torch.is_grad_enabled() and x.requires_grad:
            raise DQError("progressive weights are fake-quantized from their own min-max scales and without gradient.")
        return progressive_fake_quantize(x.reshape(x.shape[0], -1), spec.granularity.group_size).reshape(shape)
    g = spec.granularity.grouped(cast(x))
    dynamic = scale is None
    if dynamic:
        scale, zero = dynamic_scales(g.detach(), spec)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        zero = None if spec.symmetric else zero  # adding and removing an all-zero point changes no value
        q_out = None if out is None else out.view(g.shape)
        return cast(_fake_quantize_no_grad(g, spec, scale, zero, q_out, dynamic).reshape(shape), dtype)
    zero = torch.zeros_like(scale) if zero is None else zero
    q = grid_ste(g / scale + zero, spec)
    return ((q - zero) * scale).reshape(shape).to(dtype)


def _fake_quantize_no_grad(
    g: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    out: torch.Tensor | None = None,
    scale_from_g: bool = False,
) -> torch.Tensor:
    """fake_quantize's values without autograd bookkeeping, in place: calibration searches call it on
    whole weights many times. Bit-identical to the STE path (x + (round(x) - x) == round(x) exactly)."""
    q = _grid_no_grad(g, spec, scale, zero, out, scale_from_g)
    if zero is not None:
        q.sub_(zero)
    return q.mul_(scale)


def _grid_no_grad(
    g: torch.Tensor,
    spec: QuantSpec,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    out: torch.Tensor | None = None,
    scale_from_g: bool = False,
) -> torch.Tensor:
    """Grid values of g / scale + zero in `out` or a new tensor (rounded and clamped in place).

    scale_from_g: the scales are g's own absmax / qmax (dynamic, symmetric, unquantized scales). For a
    signed integer format the clamp is then a no-op and is skipped: fl(m / qmax) >= (m / qmax)(1 - u),
    so |fl(x / s)| <= qmax (1 + u) / (1 - u) < qmax + 1/2 rounds to at most qmax (>= -qmax > qmin), and a
    scale raised to the smallest normal only shrinks the quotient.
    """
    q = torch.div(g, scale, out=out)
    if zero is not None:
        q.add_(zero)
    fmt = spec.fmt
    if fmt.is_integer:
        q = q.round_()
        if scale_from_g and scales_are_absmax(spec):
            return q
        qmin, qmax = qrange(spec)
        return q.clamp_(qmin, qmax)
    return fmt.round(q.clamp_(-fmt.max_value, fmt.max_value))


@torch.no_grad()
def fake_quantize_channels(x: torch.Tensor, spec: QuantSpec, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dynamic fake quantization of a [N, C, *spatial] tensor whose tokens are its positions (a conv input).

    Equals fake_quantize(x.movedim(1, -1), spec).movedim(-1, 1) exactly, without moving the channels
    last: scales reduce over (groups of) dim 1 in place of a transposed copy. No gradient; `out`, a
    float32 tensor of x's shape, receives the values when given.
    """
    channels = x.shape[1]
    group = (spec.granularity.group_size if spec.dynamic else None) or channels
    if not spec.dynamic or channels % group:
        raise DQError(f"fake_quantize_channels needs a dynamic per-token spec whose group divides {channels} channels, got {spec}.")
    v = cast(x).unflatten(1, (channels // group, group))
    scale, zero = dynamic_scales(v, spec, dim=2)
    q = _fake_quantize_no_grad(v, spec, scale, None if spec.symmetric else zero, None if out is None else out.view(v.shape), True)
    return cast(q.flatten(1, 2), x.dtype)


@torch.no_grad()
def dynamic_codes(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid values [rows, k] of a 2-D x under a symmetric one-scale-per-row spec, and the [rows, 1] scales.

    fake_quantize(x, spec) == codes * scale exactly; keeping the two apart lets an integer GEMM apply the
    scale to its output (rows x N values) instead of to x.
    """
    x = cast(x)
    scale, _ = dynamic_scales(x, spec)  # one scale per row: the grouped view is x itself
    return _grid_no_grad(x, spec, scale, None, None, scale_from_g=True), scale


def quantize(
    x: torch.Tensor, spec: QuantSpec, scale: torch.Tensor, zero: torch.Tensor | None = None
) -> torch.Tensor:
    """Codes of `x` on the format's grid, in the grouped shape (float tensor of grid values)."""
    g = spec.granularity.grouped(x.float())
    zero = torch.zeros_like(scale) if zero is None else zero
    return spec.fmt.round(g / scale + zero)


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, shape: torch.Size | None = None
) -> torch.Tensor:
    """Inverse of `quantize`: (codes - zero) * scale, reshaped to `shape` when given."""
    zero = torch.zeros_like(scale) if zero is None else zero
    out = (codes.float() - zero) * scale
    return out if shape is None else out.reshape(shape)


def weight_scales(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max (round-to-nearest) scales for a weight flattened to [out, in]."""
    lo, hi = dynamic_range(w.detach().reshape(w.shape[0], -1).float(), spec)
    return scales_from_range(lo, hi, spec)
