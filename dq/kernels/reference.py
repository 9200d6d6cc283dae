"""Torch reference ops: the math every kernel implements, and how the CPU runs the deployed layers.

    y = Q(x / smooth) @ deq(W)^T + ((x / smooth) @ lora_down^T) @ lora_up^T + bias

Q is the activation quantizer (dynamic, per token and optionally per group); deq(W) dequantizes the
stored weight. Everything runs in FP32, in one of two forms:

* float GEMM (every CPU without fast 8-bit dot products, every format): the packed codes are expanded
  to the FP32 weight deq(W) in a reused buffer (one layer at a time; the stored weight stays packed), the
  input is fake-quantized to Q(x) = q * s, and one FP32 GEMM with the bias runs (F.linear: one call).
  Codes times 16-bit scales are exact in FP32 (at most 8 + 11 significant bits), so deq(W) is exact; a
  fake-quantized activation q * s carries one rounding, relative u = 2^-24. The GEMM accumulates in FP32
  rather than exactly: against exact arithmetic on those operands the error is at most
  gamma_K * sum_k |a_k b_k|, gamma_K = K u / (1 - K u), in any summation order
  (tests/kernels/test_cpu_path.py checks it, and the agreement with the integer form below).
  On the CPU the element-wise passes (smoothing and quantizing the input, unpacking the weight) run in dq's
  C kernels (dq.kernels.cpu_kernels), one call each, with the same values as the torch ops here.
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

from dq.kernels import cpu_kernels
from dq.kernels.cpu_gemm import int8_gemm_pays
from dq.quant import PerToken, QuantSpec, cast, dynamic_codes, fake_quantize
from dq.quant.formats import get_format
from dq.quant.packing import Allocator, new_tensor
from dq.quant.spec import qrange
from dq.quant.storage import dequantize_stored
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


def _integer_gemm_pays(x2: torch.Tensor, n: int, int_gemm: bool | None) -> bool:
    if x2.is_cuda:
        return x2.shape[0] > 16  # torch._int_mm needs more than 16 rows on CUDA
    return int8_gemm_pays(x2.shape[0], x2.shape[1], n) if int_gemm is None else int_gemm


def reused_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
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
    return reused_buffer if device.type == "cpu" and not torch.is_grad_enabled() else new_tensor


def weight_operand(
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    weight_format: str,
    in_features: int,
    alloc: Allocator | None = None,
    channel_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """The dequantized FP32 weight [out, in] the float GEMM multiplies: (codes - zero) * scale, times the
    per-channel scale s1 of progressive weights (`channel_scale`, dq.quant.progressive). Exact in FP32.

    With the default allocator (buffer_allocator) a CPU operand is a reused buffer: use it before the next call.
    """
    alloc = alloc or buffer_allocator(qweight.device)
    if cpu_kernels.takes_weight(weight_format, weight_scale, channel_scale) and cpu_kernels.takes(qweight):
        fmt = get_format(weight_format)
        out = alloc("decode_codes.grid", (qweight.shape[0], in_features), torch.float32, qweight.device)
        cpu_kernels.decode_weight(qweight, fmt.bits, fmt.signed, in_features, out, weight_scale, weight_zero, channel_scale)
        return out
    w = dequantize_stored(qweight, weight_scale, weight_zero, weight_format, in_features, alloc)
    return w if channel_scale is None else w.mul_(cast(channel_scale))


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
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(output-channel slice, its weight_operand) for `rows` output channels at a time (0: all at once).

    The operands share reused buffers on CPU: use each tile before asking for the next.
    """
    n = qweight.shape[0]
    alloc = buffer_allocator(qweight.device)
    for start in range(0, n, rows or n):
        sl = slice(start, min(n, start + (rows or n)))
        scale, zero, channel = (t if t is None or t.shape[0] == 1 else t[sl] for t in (weight_scale, weight_zero, channel_scale))
        yield sl, weight_operand(qweight[sl], scale, zero, weight_format, in_features, alloc, channel)


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


def act_operand(x2: torch.Tensor, act_spec: QuantSpec | None, alloc: Allocator, rounding: str = "division") -> torch.Tensor:
    """The FP32 [M, K] GEMM operand Q(x2): fake-quantized (q * s), or x2 itself without an activation spec.

    rounding: "division" (the reference, and every CPU layer) or "reciprocal" (reciprocal_fake_quantize)."""
    if act_spec is None:
        return x2
    if rounding == "reciprocal":
        return reciprocal_fake_quantize(x2, act_spec)
    needs_grad = torch.is_grad_enabled() and x2.requires_grad
    return fake_quantize(x2, act_spec, out=None if needs_grad else alloc("act_operand", tuple(x2.shape), torch.float32, x2.device))


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

    int_gemm chooses the INT8 x INT8 form on CPU: None asks dq.kernels.cpu_gemm (this CPU and the size),
    True / False force the integer / the float GEMM (under autograd the float GEMM runs: the integer one has
    no gradient). tile_rows sets the weight tile (output channels; 0: whole weight); None lets
    weight_tile_rows decide (CPU without autograd only). act_rounding:
    "reciprocal" quantizes the activations by the GPU kernels' rule (reciprocal_fake_quantize), to check a
    kernel's GEMM apart from its rounding ties.
    """
    lead = x.shape[:-1]
    alloc = buffer_allocator(x.device)
    x2 = x.reshape(-1, in_features)
    b = None if bias is None else cast(bias)
    branch = lora_down is not None and lora_down.shape[0] > 0
    differentiable = torch.is_grad_enabled() and x2.requires_grad
    integer = (act_rounding == "division" and not differentiable and uses_int_mm(weight_format, weight_scale, weight_zero, act_spec)
               and _integer_gemm_pays(x2, qweight.shape[0], int_gemm))
    fused = None if integer or act_rounding != "division" else _fused_input(x2, act_spec, smooth, alloc, branch)
    if fused is not None:
        x2, xa = fused
    else:
        if smooth is not None:  # in the activations' dtype, as the kernels smooth
            s = cast(smooth, x2.dtype)
            x2 = x2 / s if torch.is_grad_enabled() else torch.div(x2, s, out=alloc("smoothed", tuple(x2.shape), x2.dtype, x2.device))
        x2 = cast(x2)
        if integer:
            codes, row_scale = dynamic_codes(x2, act_spec)
            y = torch._int_mm(codes.to(torch.int8), qweight.t().contiguous()).float().mul_(row_scale).mul_(weight_scale.float().reshape(-1))
            return _add_branch(y if b is None else y.add_(b), x2, lora_down, lora_up, branch, x.dtype, lead)
        xa = act_operand(x2, act_spec, alloc, act_rounding)
    y = _float_gemm(xa, b, qweight, weight_scale, weight_zero, weight_format, in_features, tile_rows, channel_scale)
    return _add_branch(y, x2, lora_down, lora_up, branch, x.dtype, lead)


def _fused_input(
    x2: torch.Tensor, act_spec: QuantSpec | None, smooth: torch.Tensor | None, alloc: Allocator, keep_smoothed: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(x2 / smooth, Q(x2 / smooth)) from one call of dq's CPU kernels, or None where they do not take this
    input (not FP32 on the CPU, autograd, an activation spec they do not take). The same values as the
    smoothing division and act_operand, bit for bit; the smoothed input is kept only for a low-rank branch."""
    if act_spec is None or x2.dtype != torch.float32 or x2.stride(-1) != 1 or not cpu_kernels.takes(x2, smooth):
        return None
    params = cpu_kernels.row_quantization(act_spec)
    if params is None:
        return None
    m, k = x2.shape
    smooth = None if smooth is None else cast(smooth).contiguous()
    smoothed = alloc("smoothed", (m, k), torch.float32, x2.device) if smooth is not None and keep_smoothed else None
    out = alloc("act_operand", (m, k), torch.float32, x2.device)
    cpu_kernels.quantize_rows(x2, *params, out, smooth, smoothed)
    return (x2 if smooth is None else smoothed), out


def _add_branch(y: torch.Tensor, x2: torch.Tensor, lora_down: torch.Tensor | None, lora_up: torch.Tensor | None,
                branch: bool, dtype: torch.dtype, lead: torch.Size) -> torch.Tensor:
    """y + (x2 L_down^T) L_up^T when the layer has a low-rank branch, cast to `dtype` and shaped [*lead, N]."""
    if branch:
        y = y.addmm_(x2 @ cast(lora_down).t(), cast(lora_up).t())
    return cast(y, dtype).reshape(*lead, -1)


def _float_gemm(
    xa: torch.Tensor,
    bias: torch.Tensor | None,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    weight_format: str,
    in_features: int,
    tile_rows: int | None,
    channel_scale: torch.Tensor | None,
) -> torch.Tensor:
    """xa @ deq(W)^T + bias, with the whole weight or in weight tiles."""
    n = qweight.shape[0]
    tiled = xa.device.type == "cpu" and not torch.is_grad_enabled()
    rows = tile_rows if tile_rows is not None else weight_tile_rows(xa.numel() * 4, n, in_features) if tiled else 0
    if not rows:
        return F.linear(xa, weight_operand(qweight, weight_scale, weight_zero, weight_format, in_features, channel_scale=channel_scale), bias)
    y_t = xa.new_empty(n, xa.shape[0])  # rows of y^T are the tiles' outputs: contiguous writes
    for sl, w in weight_tiles(qweight, weight_scale, weight_zero, weight_format, in_features, rows, channel_scale):
        if bias is None:
            torch.mm(w, xa.t(), out=y_t[sl])
        else:
            torch.addmm(bias[sl].unsqueeze(1), w, xa.t(), out=y_t[sl])
    return y_t.t()
