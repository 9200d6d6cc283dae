"""A deployed linear layer on the CPU in one call: dq's C kernels prepare both operands and run the GEMMs.

The values are those of dq.kernels.reference (bit for bit): the input smoothed and fake-quantized, the weight
dequantized into a reused buffer, the GEMM of F.linear with the bias, then the low-rank branch, each GEMM the
BLAS call torch itself makes (cpu_kernels.linear_library). What is saved is the dispatch: the reference's
10-25 torch ops and Python layers per call cost more than the GEMM itself on a small model
(tests/kernels/test_cpu_kernels.py checks the equality; benchmarks/cpu_layers.py times it). Calls the C kernels
do not take return None, and the caller runs the reference: autograd (LoRA training), 16-bit inputs, layers
whose weight is streamed in tiles (dq.kernels.reference.weight_tile_rows), and exact INT8 x INT8 products large
enough that the reference's integer GEMM is faster on this CPU (dq.kernels.cpu_gemm.int8_gemm_pays).
"""

from __future__ import annotations

import torch

from dq.kernels import cpu_kernels
from dq.kernels.cpu_gemm import int8_gemm_pays
from dq.kernels.reference import reused_buffer, weight_tile_rows
from dq.quant import cast


def cpu_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    weight_zero: torch.Tensor | None,
    channel_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None,
    lora_down: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    plan: cpu_kernels.CpuPlan,
    in_features: int,
) -> torch.Tensor | None:
    """y = Q(x / smooth) deq(W)^T + b + ((x / smooth) L_down^T) L_up^T for an FP32 CPU input, or None (see above)."""
    if torch.is_grad_enabled() or x.dtype != torch.float32:
        return None
    lib = cpu_kernels.linear_library()
    if lib is None:
        return None
    x2 = x if x.dim() == 2 else x.reshape(-1, in_features)
    m, n, k = x2.shape[0], qweight.shape[0], in_features
    ldx = x2.stride(0) if m > 1 else k  # BLAS needs rows at least k apart: expanded (stride-0) rows go to the reference
    if x2.stride(-1) != 1 or ldx < k or weight_tile_rows(m * k * 4, n, k) or (plan.int8_product and int8_gemm_pays(m, k, n)):
        return None
    cpu = x2.device
    rank = lora_down.shape[0] if lora_down is not None else 0
    quantized = plan.act_qmax > 0
    codes, ptr = cpu_kernels.DTYPE_CODES, cpu_kernels.pointer
    # 16-bit smoothing vectors and low-rank factors are converted in the same call, into reused FP32 buffers.
    smooth_src = smooth32 = None
    if smooth is not None:
        if smooth.dtype not in codes or smooth.stride(0) != 1:
            return None
        smooth_src, smooth32 = (None, smooth) if smooth.dtype == torch.float32 else (smooth, reused_buffer("smooth", (k,), torch.float32, cpu))
    down_src = up_src = t = None
    if rank:
        if lora_down.dtype not in codes or lora_up.dtype != lora_down.dtype or not (lora_down.is_contiguous() and lora_up.is_contiguous()):
            return None
        if lora_down.dtype != torch.float32:
            down_src, up_src = lora_down, lora_up
            lora_down = reused_buffer("lowrank_down", tuple(lora_down.shape), torch.float32, cpu)
            lora_up = reused_buffer("lowrank_up", tuple(lora_up.shape), torch.float32, cpu)
        t = reused_buffer("lowrank_t", (m, rank), torch.float32, cpu)
    if bias is not None:
        bias = cast(bias)
        if not bias.is_contiguous():
            return None
    xa = reused_buffer("act_operand", (m, k), torch.float32, cpu) if quantized or smooth is not None else None
    smoothed = reused_buffer("smoothed", (m, k), torch.float32, cpu) if quantized and smooth is not None and rank else None
    w = reused_buffer("decode_codes.grid", (n, k), torch.float32, cpu)
    y = torch.empty(m, n, dtype=torch.float32, device=cpu)
    lib.dq_linear(
        x2.data_ptr(), m, k, ldx, ptr(smooth_src), codes[smooth.dtype] if smooth is not None else 0, ptr(smooth32),
        ptr(smoothed), plan.act_group, plan.act_qmax, ptr(xa), qweight.data_ptr(), n, qweight.stride(0), plan.bits,
        plan.signed, weight_scale.data_ptr(), ptr(weight_zero), plan.scale_dtype, weight_scale.shape[0], weight_scale.shape[1],
        ptr(channel_scale), w.data_ptr(), ptr(bias), ptr(down_src), ptr(up_src), codes[down_src.dtype] if down_src is not None else 0,
        rank, ptr(lora_down if rank else None), ptr(lora_up if rank else None), ptr(t), y.data_ptr(),
    )
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)
