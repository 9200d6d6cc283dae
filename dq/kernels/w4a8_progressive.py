"""W4A8 GEMM on progressive-group weights (QServe's QoQ, dq.quant.progressive): the whole K loop in INT8 MMA.

The weights are UINT4 codes u with, per output channel n and group g of K, an integer scale s2 (1..16) and
zero z (0..15), and one float scale s1 per channel. (u - z) * s2 is an exact INT8 value (the protective range
of dq.quant.progressive), so every K step is one INT8 x INT8 MMA into an INT32 accumulator that is never
rescaled; the epilogue applies s1[n] and the activations' per-token scale once, then the low-rank
up-projection, the bias and the cast:

    y[m, n] = s_x[m] * s1[n] * sum_k q_x[m, k] * (u[n, k] - z[n, k/G]) * s2[n, k/G] + (x L_down^T) L_up^T + b

The integer sum is exact, so the kernel's output differs from the reference's only by the float epilogue.

Layout (as w4a4_mma8): the tile is computed transposed, out^T[BLOCK_N, BLOCK_M] = W8[BLOCK_N, K] @ Xq^T, so the
weights, turned into INT8 in registers, are the MMA's A operand (Hopper's wgmma reads only A from registers)
and the activation codes its B operand from shared memory. Weights stay in dq's canonical nibble layout
(byte j of a row: k = 2j low, 2j + 1 high), interleaved back to K order in registers. The activations come
from the INT8 per-token quantizer of act_quant (smoothing and the low-rank down-projection fused into it).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.act_quant import FMT_INT8, quantize_activations, rank_pad
from dq.kernels.epilogue import LowRankOperands, lowrank_bias_epilogue, tile_coords, tile_grid
from dq.kernels.tuning import Tile, launch, m_key

SMALLEST_GROUP = 32  # one INT8 MMA step along K


@triton.jit
def _w4a8_progressive_kernel(
    a_ptr, as_ptr, b_ptr, s2_ptr, z_ptr, s1_ptr, bias_ptr, la_ptr, lu_ptr, c_ptr,
    M, N, K, R, M_KEY,
    stride_am, stride_bn, stride_gn, stride_las, LA_SPLITS, stride_lam, stride_lun, stride_cm,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = (a @ W8^T) * as_[m] * s1[n] (+ lora_act @ lora_up^T + bias).

    a: int8 [M, K] codes with per-token scales as_ fp32 [M]; b: uint8 [N, K/2] packed UINT4; s2, z: uint8
    [N, K/GROUP] (row stride stride_gn); s1: [N] fp16/fp32. K a multiple of GROUP.
    """
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Rows past M / N are clamped (not masked) so loads stay unpredicated; their results are never stored.
    rm = tl.minimum(offs_m, M - 1)
    rn = tl.minimum(offs_n, N - 1)
    a_ptrs = a_ptr + rm[:, None] * stride_am + tl.arange(0, GROUP)[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + tl.arange(0, GROUP // 2)[None, :]
    g_ptrs = rn * stride_gn
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32)
    for g in range(0, K // GROUP):
        packed = tl.load(b_ptrs)
        s2 = tl.load(s2_ptr + g_ptrs + g).to(tl.int32)
        zs = tl.load(z_ptr + g_ptrs + g).to(tl.int32) * s2  # QServe's scaled zero
        u = tl.interleave((packed & 0xF).to(tl.int32), (packed >> 4).to(tl.int32))  # [BLOCK_N, GROUP] in K order
        w8 = (u * s2[:, None] - zs[:, None]).to(tl.int8)  # exact: in [-127, 127]
        acc = tl.dot(w8, tl.trans(tl.load(a_ptrs)), acc, out_dtype=tl.int32)
        a_ptrs += GROUP
        b_ptrs += GROUP // 2
    sa = tl.load(as_ptr + rm)
    s1 = tl.load(s1_ptr + rn).to(tl.float32)
    out = acc.to(tl.float32) * s1[:, None] * sa[None, :]
    lowrank_bias_epilogue(tl.trans(out), offs_m, offs_n, M, N, R, la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr,
                          stride_lun, bias_ptr, c_ptr, stride_cm, HAS_LORA, HAS_BIAS, R_PAD, UPCAST)


def w4a8_progressive_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    group_scale: torch.Tensor,
    group_zero: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_act: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    out_dtype: torch.dtype,
    tile: Tile | None = None,
) -> torch.Tensor:
    """Launch the GEMM on INT8 per-token codes a [M, K] with scales [1, M] (quantize_activations, FMT_INT8).

    qweight: packed UINT4 [N, K/2]; group_scale, group_zero: uint8 [N, K/G] (s2, z); channel_scale: [N, 1]
    (s1); lora_act: fp32 partials [C, M, R] or None. tile: instead of autotuning.
    """
    M, K = a.shape
    N = qweight.shape[0]
    if a.dtype != torch.int8 or a.stride(-1) != 1:
        raise DQError(f"activation codes must be row-major int8 [M, K], got {a.dtype} {tuple(a.shape)}.")
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != K or qweight.stride(-1) != 1:
        raise DQError(f"UINT4 weights must be packed uint8 [N, {K // 2}] row-major, got {qweight.dtype} {tuple(qweight.shape)}.")
    groups = group_scale.shape[1] if group_scale.dim() == 2 else 0
    if not groups or K % groups or group_scale.shape != (N, groups) or group_zero.shape != (N, groups):
        raise DQError(f"group scales and zeros must both be [{N}, K/G] with G dividing K={K}, got "
                      f"{tuple(group_scale.shape)} and {tuple(group_zero.shape)}.")
    group = K // groups
    if group < SMALLEST_GROUP or group & (group - 1):
        raise DQError(f"progressive group size {group}: the kernel takes powers of two >= {SMALLEST_GROUP}.")
    if group_scale.dtype != torch.uint8 or group_zero.dtype != torch.uint8 or not (group_scale.is_contiguous() and group_zero.is_contiguous()):
        raise DQError("group scales and zeros must be contiguous uint8 tensors (as progressive layers store them).")
    if channel_scale.numel() != N:
        raise DQError(f"channel scales must have {N} entries, got {tuple(channel_scale.shape)}.")
    lr = LowRankOperands.of(lora_act, lora_up, N)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    launch(
        _w4a8_progressive_kernel, "w4a8_progressive", tile_grid(M, N), a.device,
        (a, a_scale, qweight, group_scale, group_zero, channel_scale.reshape(-1), bias if bias is not None else c,
         *lr.pointers(c), c, M, N, K, lr.rank, m_key(M),
         a.stride(0), qweight.stride(0), group_scale.stride(0), *lr.strides(), c.stride(0)),
        dict(GROUP=group, HAS_BIAS=bias is not None, HAS_LORA=lr.rank > 0, R_PAD=rank_pad(lr.rank), UPCAST=not c.is_cuda),
        tile,
    )
    return c


def w4a8_progressive_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    group_scale: torch.Tensor,
    group_zero: torch.Tensor,
    channel_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    tile: Tile | None = None,
) -> torch.Tensor:
    """y = Q8(x/s) deq(W)^T + ((x/s) L_down^T) L_up^T + b for a 2-D x: quantize launch + GEMM launch.

    Example:
        >>> y = w4a8_progressive_linear(x, layer.qweight, layer.weight_scale, layer.weight_zero,
        ...                             layer.weight_channel_scale, layer.bias)   # x [M, K] bf16
    """
    if lora_down is not None and lora_down.shape[0] == 0:
        lora_down = lora_up = None
    q, qs, lora_act = quantize_activations(x, FMT_INT8, None, smooth, lora_down)
    return w4a8_progressive_gemm(q, qs, qweight, group_scale, group_zero, channel_scale, bias, lora_act, lora_up, x.dtype, tile)
