"""Torch reference ops: the math every kernel implements, and how the CPU runs the deployed layers.

    y = Q(x / smooth) @ deq(W)^T + ((x / smooth) @ lora_down^T) @ lora_up^T + bias

Q is the activation quantizer (dynamic, per token and optionally per group); deq(W) dequantizes the
stored weight. Everything runs in FP32, in one of two forms:

* float GEMM (every CPU without fast 8-bit dot products, every format): the packed codes are expanded
  to FP32 in a reused buffer (one layer at a time; the stored weight stays packed), and one FP32 GEMM
  runs. A scale that is constant along K (per-output-channel weight scales, per-token activation
  scales) is applied to the GEMM's output instead of its operand, so a W8A8 layer multiplies integer
  codes; group scales are applied to the operand (codes times 16-bit scales are exact in FP32; a
  fake-quantized activation q * s carries one rounding, relative 2^-24).
  The GEMM accumulates in FP32 rather than exactly: integer codes sum exactly while every partial sum
  stays below 2^24 (always for INT8 x INT8 with K <= 1032); beyond that, and for scaled operands, the
  error against exact accumulation is at most gamma_K * sum_k |a_k b_k|, gamma_K = K u / (1 - K u),
  u = 2^-24, in any summation order (tests/kernels/test_cpu_path.py checks both).
* integer GEMM (INT8 per-token activations x INT8 per-channel weights, on CUDA fallbacks and on CPUs
  where dq.kernels.cpu_gemm says torch._int_mm is fast): exact INT32 accumulation, then both scales.

On CPU a layer with a small input runs the float GEMM in weight tiles (weight_tile_rows).
"""

from __future__ import annotations

import math
import threading
from typing import Iterator

import torch
import torch.nn.functional as F

from dq.kernels.cpu_gemm import int8_gemm_is_fast
from dq.quant import PerToken, QuantSpec, cast, dynamic_codes, fake_quantize
from dq.quant.packing import Allocator, new_tensor
from dq.quant.spec import qrange
from dq.quant.storage import decode_codes, dequantize_stored
from dq.sizes import tensors_bytes

_scratch = threading.local()


def uses_int_mm(weight_format: str, weight_scale: torch.Tensor, weight_zero: torch.Tensor | None, act_spec: QuantSpec | None) -> bool:
    """True when an INT8 x INT8 integer GEMM computes this layer exactly."""
    return (
        weight_format == "int8"
        and weight_zero is None
        and weight_scale.shape[1] == 1
        and act_spec is not None
        and act_spec.format == "int8"
        and act_spec.symmetric
        and act_spec.granularity == PerToken(None)
    )


def _integer_gemm_pays(x: torch.Tensor, int_gemm: bool | None) -> bool:
    if x.is_cuda:
        return x.shape[0] > 16  # torch._int_mm needs more than 16 rows on CUDA
    return int8_gemm_is_fast() if int_gemm is None else int_gemm


def _reused_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """This thread's buffer `name`, grown to the largest request so far (an Allocator of dq.quant.packing).

    A deployed CPU layer unpacks its weight and quantizes its input on every call; a fresh multi-megabyte
    tensor per call costs more in page faults than that work itself, so the buffers stay: the transient
    memory of the float-GEMM path, about 6 bytes per weight of the largest layer (its FP32 operand and
    the unpacking buffers) plus one or two FP32 copies of the largest layer input.
    """
    views = _scratch.__dict__.setdefault("views", {})
    view = views.get((name, dtype, shape))  # a layer asks for the same shapes on every call
    if view is not None:
        return view
    buffers = _scratch.__dict__.setdefault("buffers", {})
    numel = math.prod(shape)
    flat = buffers.get((name, dtype))
    if flat is None or flat.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            flat = buffers[(name, dtype)] = torch.empty(numel, dtype=dtype, device=device)
        for key in [key for key in views if key[:2] == (name, dtype)]:
            del views[key]  # views of the old, smaller buffer
    if len(views) > 4096:  # inputs of ever new shapes: keep the cache bounded
        views.clear()
    view = views[(name, dtype, shape)] = flat[:numel].view(shape)
    return view


def scratch_bytes() -> int:
    """Bytes held by this thread's reused buffers (weight operands, unpacking, layer inputs)."""
    return tensors_bytes(_scratch.__dict__.get("buffers", {}).values())


def release_scratch() -> None:
    """Free this thread's reused buffers (the next deployed CPU layer allocates them again)."""
    _scratch.__dict__.pop("buffers", None)
    _scratch.__dict__.pop("views", None)


def buffer_allocator(device: torch.device) -> Allocator:
    """Reused buffers on CPU without autograd (a reused tensor kept for backward would be overwritten
    by the next layer), fresh tensors otherwise (the CUDA caching allocator makes those cheap)."""
    return _reused_buffer if device.type == "cpu" and not torch.is_grad_enabled() else new_tensor


def weight_operand(
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    weight_format: str,
    in_features: int,
    alloc: Allocator | None = None,
    channel_scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(FP32 [out, in] GEMM operand, per-output-channel scale [out] to apply to the GEMM output, or None).

    Symmetric per-channel weights give their grid values and the scale apart; progressive weights (with
    `channel_scale`, dq.quant.progressive) their INT8 operand (u - z) * s2 and s1 apart; others the
    dequantized weight. With the default allocator (buffer_allocator) a CPU operand is a reused buffer: use
    it before the next call.
    """
    alloc = alloc or buffer_allocator(qweight.device)
    if channel_scale is not None:
        return dequantize_stored(qweight, weight_scale, weight_zero, weight_format, in_features, alloc), cast(channel_scale).view(-1)
    if weight_zero is None and weight_scale.shape == (qweight.shape[0], 1):
        codes = decode_codes(qweight, weight_format, alloc)
        return codes if codes.shape[1] == in_features else codes[:, :in_features], cast(weight_scale).view(-1)
    return dequantize_stored(qweight, weight_scale, weight_zero, weight_format, in_features, alloc), None


# Weight tiles on CPU. A layer with a small input (a deep UNet level, a DiT at a small resolution) is bound
# by streaming its weight: dequantizing the whole FP32 weight and multiplying it costs more than the FP layer.
# Dequantized about 2 MiB at a time, each tile is multiplied while it is still in the cache, so the layer
# streams only its packed codes (on this project's 2-core EPYC, M = 32, 1280 x 10240: W8A8 0.53x and W4A16
# 0.60x the FP32 time, benchmarks/cpu_layers.py). With a large input the input is re-read per tile
# instead, and one untiled GEMM is faster.
TILE_BYTES = 2 << 20
SMALL_INPUT_BYTES = 1 << 20


def weight_tile_rows(input_bytes: int, out_features: int, k: int) -> int:
    """Output channels per weight tile on CPU, or 0 for the whole weight at once (see TILE_BYTES)."""
    rows = max(16, TILE_BYTES // (4 * k) // 16 * 16)
    return rows if input_bytes <= SMALL_INPUT_BYTES and out_features >= 4 * rows else 0


def weight_tiles(
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    weight_format: str,
    in_features: int,
    rows: int,
    channel_scale: torch.Tensor | None = None,
) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor | None]]:
    """(output-channel slice, its weight_operand) for `rows` output channels at a time (0: all at once).

    The operands share reused buffers on CPU: use each tile before asking for the next.
    """
    n = qweight.shape[0]
    alloc = buffer_allocator(qweight.device)
    for start in range(0, n, rows or n):
        sl = slice(start, min(n, start + (rows or n)))
        scale, zero, channel = (t if t is None or t.shape[0] == 1 else t[sl] for t in (weight_scale, weight_zero, channel_scale))
        yield (sl, *weight_operand(qweight[sl], scale, zero, weight_format, in_features, alloc, channel))


def reciprocal_fake_quantize(x2: torch.Tensor, act_spec: QuantSpec) -> torch.Tensor:
    """x2 [M, K] quantized and dequantized by the GPU kernels' rule (dq.kernels.act_quant, "Scale rounding"):
    per token (group) scale = max(amax * fl(1/qmax), tiny), code = x * fl(1/scale) rounded (and clamped) to
    the format. The reference divides instead; the two differ only where a scaled value lies within 4 ulps
    of a rounding boundary. For symmetric per-token(-group) integer and FP8 specs, the ones the kernels take."""
    fmt, k = act_spec.fmt, x2.shape[1]
    group = act_spec.granularity.group_size or k
    qmax = qrange(act_spec)[1] if fmt.is_integer else fmt.max_value
    g = x2.float().reshape(x2.shape[0], k // group, group)
    scale = (g.abs().amax(-1, keepdim=True) * torch.tensor(1 / qmax, dtype=torch.float32)).clamp(min=torch.finfo(torch.float32).tiny)
    v = g * (1 / scale)
    codes = torch.clamp(torch.round(v), -qmax - 1, qmax) if fmt.is_integer else fmt.round(v.clamp(-qmax, qmax))
    return (codes * scale).reshape(x2.shape)


def act_operand(x2: torch.Tensor, act_spec: QuantSpec | None, alloc: Allocator,
                rounding: str = "division") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(FP32 [M, K] GEMM operand, per-token scale [M, 1] to apply to the GEMM output, or None).

    rounding: "division" (the reference, and every CPU layer) or "reciprocal" (reciprocal_fake_quantize)."""
    if act_spec is None:
        return x2, None
    if rounding == "reciprocal":
        return reciprocal_fake_quantize(x2, act_spec), None
    needs_grad = torch.is_grad_enabled() and x2.requires_grad
    out = None if needs_grad else alloc("act_operand", tuple(x2.shape), torch.float32, x2.device)
    one_scale_per_row = act_spec.symmetric and act_spec.granularity == PerToken(None) and act_spec.scale_format is None
    if one_scale_per_row and not needs_grad:
        return dynamic_codes(x2, act_spec, out)
    return fake_quantize(x2, act_spec, out=out), None


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
    channel_scale: torch.Tensor | None = None,
    int_gemm: bool | None = None,
    tile_rows: int | None = None,
    act_rounding: str = "division",
) -> torch.Tensor:
    """Reference quantized linear; x is [..., in_features], returns [..., out_features] in x.dtype.

    channel_scale: the per-channel scale s1 [out, 1] of progressive weights (dq.quant.progressive), else None.

    int_gemm chooses the INT8 x INT8 form on CPU: None asks dq.kernels.cpu_gemm (once per process),
    True / False force the integer / the float GEMM. tile_rows sets the weight tile (output channels;
    0: whole weight); None lets weight_tile_rows decide (CPU without autograd only). act_rounding:
    "reciprocal" quantizes the activations by the GPU kernels' rule (reciprocal_fake_quantize), to check a
    kernel's GEMM apart from its rounding ties.
    """
    lead = x.shape[:-1]
    alloc = buffer_allocator(x.device)
    x2 = x.reshape(-1, in_features)
    if smooth is not None:  # in the activations' dtype, as the kernels smooth
        s = cast(smooth, x2.dtype)
        x2 = x2 / s if torch.is_grad_enabled() else torch.div(x2, s, out=alloc("smoothed", tuple(x2.shape), x2.dtype, x2.device))
    x2 = cast(x2)
    b = None if bias is None else cast(bias)
    if act_rounding == "division" and uses_int_mm(weight_format, weight_scale, weight_zero, act_spec) and _integer_gemm_pays(x2, int_gemm):
        codes, row_scale = dynamic_codes(x2, act_spec)
        y = _scale_output(torch._int_mm(codes.to(torch.int8), qweight.t().contiguous()).float(), row_scale, weight_scale.float().reshape(-1), b)
    else:
        xa, row_scale = act_operand(x2, act_spec, alloc, act_rounding)
        y = _float_gemm(xa, row_scale, b, qweight, weight_scale, weight_zero, weight_format, in_features, tile_rows, channel_scale)
    if lora_down is not None and lora_down.shape[0] > 0:
        y = y.addmm_(x2 @ cast(lora_down).t(), cast(lora_up).t())
    return cast(y, x.dtype).reshape(*lead, -1)


def _float_gemm(
    xa: torch.Tensor,
    row_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    weight_format: str,
    in_features: int,
    tile_rows: int | None,
    channel_scale: torch.Tensor | None,
) -> torch.Tensor:
    """(xa @ operand^T) * row_scale * per-channel scale + bias, with the whole weight or in weight tiles."""
    n = qweight.shape[0]
    tiled = xa.device.type == "cpu" and not torch.is_grad_enabled()
    rows = tile_rows if tile_rows is not None else weight_tile_rows(xa.numel() * 4, n, in_features) if tiled else 0
    if not rows:
        w, col_scale = weight_operand(qweight, weight_scale, weight_zero, weight_format, in_features, channel_scale=channel_scale)
        if row_scale is None and col_scale is None:
            return F.linear(xa, w, bias)
        return _scale_output(F.linear(xa, w), row_scale, col_scale, bias)
    y_t = xa.new_empty(n, xa.shape[0])  # rows of y^T are the tiles' outputs: contiguous writes
    for sl, w, col_scale in weight_tiles(qweight, weight_scale, weight_zero, weight_format, in_features, rows, channel_scale):
        torch.mm(w, xa.t(), out=y_t[sl])
        if col_scale is not None:
            y_t[sl].mul_(col_scale.unsqueeze(1))
    return _scale_output(y_t.t(), row_scale, None, bias)


def _scale_output(y: torch.Tensor, row_scale: torch.Tensor | None, col_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """y * row_scale * col_scale + bias, in place on the GEMM output (a fresh tensor)."""
    if row_scale is not None:
        y = y.mul_(row_scale)
    if col_scale is not None:
        y = y.mul_(col_scale)
    return y if bias is None else y.add_(bias)
