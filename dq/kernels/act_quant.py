"""Activation quantization fused with the smoothing division and the low-rank down-projection.

One launch reads X once and writes everything the GEMM needs:

    xs       = x / smooth                                  (in x.dtype, as the reference does)
    q, scale = per-token (per-group) symmetric quantization of xs
    lora_act = xs @ lora_down^T                            (the low-rank branch's input, in lora_down.dtype)

Outputs (the layouts the GEMM kernels in this package read):
    int4   q: uint8 [M, K/2], canonical nibble layout (dq.quant.packing); scale: fp32 [K/G, M]
    int8   q: int8 [M, K];                                                 scale: fp32 [1, M]
    fp8    q: float8_e4m3fn [M, K];                                        scale: fp32 [1, M]
Scales are stored transposed (group-major) so a GEMM tile reads a contiguous run of tokens.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.epilogue import mma, round_e4m3, round_to

# Format codes shared with the GEMM launchers.
FMT_INT4, FMT_INT8, FMT_FP8 = 0, 1, 2
_QMAX = {FMT_INT4: 7.0, FMT_INT8: 127.0, FMT_FP8: 448.0}
_TINY = torch.finfo(torch.float32).tiny


@triton.jit
def round_half_even(v):
    """Round fp32 to the nearest integer, ties to even (torch.round's rule); |v| < 2**22."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _load_smoothed(x_ptr, s_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    """x[offs_m, offs_k] / smooth[offs_k] rounded to x's dtype, returned as fp32 (0 outside)."""
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0)
    if HAS_SMOOTH:
        s = tl.load(s_ptr + offs_k, mask=offs_k < K, other=1.0).to(tl.float32)
        return round_to(tl.math.div_rn(x.to(tl.float32), s[None, :]), x.dtype)
    return x.to(tl.float32)


@triton.jit
def _act_quant_kernel(
    x_ptr, s_ptr, q_ptr, sc_ptr, ld_ptr, la_ptr,
    M, K, R,
    stride_xm, stride_qm, stride_ldr, stride_lam,
    QMAX: tl.constexpr, TINY: tl.constexpr, FMT: tl.constexpr, PER_GROUP: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    """Quantize a [BLOCK_M, K] row block of x; see the module docstring for outputs.

    x: [M, K] fp16/bf16/fp32 (row stride stride_xm, unit column stride); smooth: [K];
    lora_down: [R, K] (unit column stride). PER_GROUP: one scale per BLOCK_K channels (BLOCK_K is
    the group size, K a multiple of it); else one scale per token (two passes over the row block,
    the second from L2).
    """
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    if not PER_GROUP:
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xs = _load_smoothed(x_ptr, s_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, HAS_SMOOTH)
            amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
        scale = tl.maximum(tl.math.div_rn(amax, QMAX), TINY)
        tl.store(sc_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, s_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH)
        if PER_GROUP:
            scale = tl.maximum(tl.math.div_rn(tl.max(tl.abs(xs), axis=1), QMAX), TINY)
            tl.store(sc_ptr + (k0 // BLOCK_K) * M + offs_m, scale, mask=m_mask)
        v = tl.math.div_rn(xs, scale[:, None])
        if FMT == 2:
            q = round_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX)).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q,
                     mask=m_mask[:, None] & (offs_k[None, :] < K))
        else:
            q = tl.minimum(tl.maximum(round_half_even(v), -QMAX - 1.0), QMAX).to(tl.int32)
            if FMT == 0:
                lo, hi = tl.split(tl.reshape(q, (BLOCK_M, BLOCK_K // 2, 2)))
                packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
                offs_h = k0 // 2 + tl.arange(0, BLOCK_K // 2)
                tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_h[None, :], packed,
                         mask=m_mask[:, None] & (offs_h[None, :] < K // 2))
            else:
                tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8),
                         mask=m_mask[:, None] & (offs_k[None, :] < K))
        if HAS_LORA:
            ld = tl.load(ld_ptr + offs_r[None, :] * stride_ldr + offs_k[:, None],
                         mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            lora = mma(xs.to(ld.dtype), ld, lora, UPCAST)
    if HAS_LORA:
        tl.store(la_ptr + offs_m[:, None] * stride_lam + offs_r[None, :],
                 round_to(lora, la_ptr.dtype.element_ty).to(la_ptr.dtype.element_ty),
                 mask=m_mask[:, None] & (offs_r[None, :] < R))


def rank_pad(rank: int) -> int:
    """Rank rounded up to a power of two of at least 16 (the smallest tl.dot extent)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


@functools.lru_cache(maxsize=None)
def _block_m(M: int, on_gpu: bool) -> tuple[int, int]:
    if not on_gpu:
        return 16, 4
    # Memory-bound: enough rows per program to amortize the lora_down tile, enough programs to fill the GPU.
    return (64, 4) if M >= 8192 else (32, 4) if M >= 1024 else (16, 4)


def quantize_activations(
    x: torch.Tensor,
    fmt: int,
    group_size: int | None,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the fused quantizer on a 2-D x [M, K]; returns (codes, scales [K/G or 1, M], lora_act [M, R] or None)."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise DQError(f"quantize_activations needs a 2-D row-major x, got shape {tuple(x.shape)} strides {x.stride()}.")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DQError(f"activations must be float16, bfloat16 or float32, got {x.dtype}.")
    M, K = x.shape
    if fmt == FMT_INT4 and (group_size is None or K % group_size or group_size % 2 or group_size < 16):
        raise DQError(
            f"INT4 activations need per-token groups of an even size >= 16 dividing K={K}, got {group_size}; "
            "pad the input features or choose another group size."
        )
    if fmt != FMT_INT4 and group_size is not None:
        raise DQError("8-bit activation kernels take per-token scales only (PerToken() without a group size).")
    if group_size is not None and triton.next_power_of_2(group_size) != group_size:
        raise DQError(f"group size {group_size} must be a power of two for the Triton kernels.")
    rank = 0 if lora_down is None else lora_down.shape[0]
    if lora_down is not None and (lora_down.shape[1] != K or lora_down.stride(-1) != 1):
        raise DQError(f"lora_down must be row-major [rank, {K}], got {tuple(lora_down.shape)}.")
    if smooth is not None and smooth.numel() != K:
        raise DQError(f"smooth must have {K} entries, got {smooth.numel()}.")
    dev = x.device
    if fmt == FMT_INT4:
        q = torch.empty((M, K // 2), dtype=torch.uint8, device=dev)
        scales = torch.empty((K // group_size, M), dtype=torch.float32, device=dev)
    else:
        q = torch.empty((M, K), dtype=torch.int8 if fmt == FMT_INT8 else torch.float8_e4m3fn, device=dev)
        scales = torch.empty((1, M), dtype=torch.float32, device=dev)
    lora_act = torch.empty((M, rank), dtype=lora_down.dtype, device=dev) if rank else None
    block_m, warps = _block_m(M, x.is_cuda)
    block_k = group_size if fmt == FMT_INT4 else min(128, max(16, triton.next_power_of_2(K)))
    _act_quant_kernel[(triton.cdiv(M, block_m),)](
        x, smooth if smooth is not None else x, q, scales,
        lora_down if rank else x, lora_act if rank else x,
        M, K, rank,
        x.stride(0), q.stride(0), lora_down.stride(0) if rank else 0, lora_act.stride(0) if rank else 0,
        QMAX=_QMAX[fmt], TINY=_TINY, FMT=fmt, PER_GROUP=fmt == FMT_INT4,
        HAS_SMOOTH=smooth is not None, HAS_LORA=rank > 0, UPCAST=not x.is_cuda,
        BLOCK_M=block_m, BLOCK_K=block_k, R_PAD=rank_pad(rank),
        num_warps=warps,
    )
    return q, scales, lora_act
