"""W4A4 and W4A8 GEMM: INT4 weights (per-group scales along K) times INT4 or INT8 activations.

For W4A4 this kernel is the fallback (and the v1 baseline): w4_linear routes W4A4 to the byte-code
kernel of dq.kernels.w4a4_mma8, which is about 3x fewer instructions per K-group (see that module).

Hopper and Ampere have INT8 but no (Hopper) or slow INT4 MMA paths in Triton, so both 4-bit operands
are unpacked in registers to INT8 and multiplied on the INT8 tensor cores with INT32 accumulation,
one K-group at a time; each group's INT32 partial sum is scaled by the activation and weight group
scales into an FP32 accumulator. The epilogue adds the low-rank branch (lora_act @ lora_up^T) and
the bias and casts to the output dtype, so main and low-rank paths are one launch.

The canonical packed layout (two codes per byte along K, element 2i in the low nibble) is already
K-major, which is what the INT8 MMA wants: low nibbles of a group hold its even channels, high
nibbles its odd ones, and since a dot product does not care about the order of K, the kernel
multiplies low-with-low and high-with-high without interleaving. No repacking at load time.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.act_quant import FMT_INT4, FMT_INT8, quantize_activations, rank_pad
from dq.kernels.epilogue import LowRankOperands, lowrank_bias_epilogue, tile_coords, tile_grid
from dq.kernels.tuning import Tile, launch, m_key
from dq.kernels.w4a4_mma8 import mma8_mode, w4a4_mma8_linear


@triton.jit
def unpack_int4(p):
    """uint8 codes -> (low, high) sign-extended INT4 nibbles as int8 tensors of the same shape."""
    lo = (p << 4).to(tl.int8, bitcast=True) >> 4
    hi = p.to(tl.int8, bitcast=True) >> 4
    return lo, hi


@triton.jit
def _w4_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, la_ptr, lu_ptr, c_ptr,
    M, N, K, R, M_KEY,
    stride_am, stride_bn, stride_bsn, stride_las, LA_SPLITS, stride_lam, stride_lun, stride_cm,
    GROUP: tl.constexpr, A_INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = deq(a) @ deq(b)^T (+ lora_act @ lora_up^T + bias).

    a: uint8 [M, K/2] packed INT4 with scales as_ [K/GROUP, M] fp32 (W4A4), or
       int8 [M, K] with per-token scales as_ [1, M] fp32 (W4A8, A_INT8);
    b: uint8 [N, K/2] packed INT4, scales bs [N, K/GROUP] fp16/fp32; K a multiple of GROUP.
    """
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, GROUP // 2)
    # Rows past M / N are clamped (not masked) so loads stay unpredicated; their results are never stored.
    rm = tl.minimum(offs_m, M - 1)
    rn = tl.minimum(offs_n, N - 1)
    if A_INT8:
        a_even = a_ptr + rm[:, None] * stride_am + 2 * offs_h[None, :]
    else:
        a_ptrs = a_ptr + rm[:, None] * stride_am + offs_h[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_h[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_groups = K // GROUP
    for g in range(0, num_groups):
        b_lo, b_hi = unpack_int4(tl.load(b_ptrs))
        if A_INT8:
            a_lo = tl.load(a_even)
            a_hi = tl.load(a_even + 1)
            a_even += GROUP
        else:
            a_lo, a_hi = unpack_int4(tl.load(a_ptrs))
            a_ptrs += GROUP // 2
        part = tl.dot(a_lo, b_lo, out_dtype=tl.int32)
        part = tl.dot(a_hi, b_hi, part, out_dtype=tl.int32)
        sb = tl.load(bs_ptr + rn * stride_bsn + g).to(tl.float32)
        if A_INT8:
            acc += part.to(tl.float32) * sb[None, :]
        else:
            sa = tl.load(as_ptr + g * M + rm)
            acc += part.to(tl.float32) * (sa[:, None] * sb[None, :])
        b_ptrs += GROUP // 2
    if A_INT8:
        acc = acc * tl.load(as_ptr + rm)[:, None]
    lowrank_bias_epilogue(acc, offs_m, offs_n, M, N, R, la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr, stride_lun,
                          bias_ptr, c_ptr, stride_cm, HAS_LORA, HAS_BIAS, R_PAD, UPCAST)


def w4_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_act: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    out_dtype: torch.dtype,
    group_size: int,
    tile: Tile | None = None,
) -> torch.Tensor:
    """Launch the INT4-weight GEMM on quantized activations (packed INT4 [M, K/2] or INT8 [M, K]); tile: instead of autotuning.

    lora_act: [M, R] or fp32 partial sums [C, M, R] (quantize_activations' output), added in the epilogue.
    """
    a_int8 = a.dtype == torch.int8
    M = a.shape[0]
    N, K = qweight.shape[0], qweight.shape[1] * 2
    if qweight.dtype != torch.uint8 or qweight.stride(-1) != 1:
        raise DQError(f"INT4 weights must be packed uint8 [N, K/2] row-major, got {qweight.dtype} {tuple(qweight.shape)}.")
    if K % group_size or weight_scale.shape != (N, K // group_size):
        raise DQError(f"weight scales {tuple(weight_scale.shape)} do not match [{N}, K/{group_size}] for K={K}.")
    if a.shape[1] != (K if a_int8 else K // 2):
        raise DQError(f"activations {tuple(a.shape)} do not match weights with K={K}.")
    lr = LowRankOperands.of(lora_act, lora_up, N)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    launch(
        _w4_gemm_kernel, "w4", tile_grid(M, N), a.device,
        (a, a_scale, qweight, weight_scale, bias if bias is not None else c, *lr.pointers(c), c,
         M, N, K, lr.rank, m_key(M),
         a.stride(0), qweight.stride(0), weight_scale.stride(0), *lr.strides(), c.stride(0)),
        dict(GROUP=group_size, A_INT8=a_int8, HAS_BIAS=bias is not None, HAS_LORA=lr.rank > 0, R_PAD=rank_pad(lr.rank), UPCAST=not c.is_cuda),
        tile,
    )
    return c


def w4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    act_bits: int,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    mma8: str | bool | None = None,
    tile: Tile | None = None,
) -> torch.Tensor:
    """y = Q(x/s) deq(W)^T + ((x/s) L_down^T) L_up^T + b for a 2-D x: two launches (quantize, GEMM).

    act_bits=4: INT4 activations per token and group of `group_size` (W4A4); 8: INT8 per token (W4A8).
    W4A4 runs the byte-code kernel of dq.kernels.w4a4_mma8 in the flavour mma8_mode picks for the device
    (FP8 tensor cores on sm89+ when its self-check passes, else INT8), or in the flavour `mma8` names;
    mma8=False runs the kernel below (INT4 activations unpacked in registers: the baseline it replaced,
    and the fallback when neither flavour passes its self-check). tile: the GEMM's, instead of autotuning.
    """
    if lora_down is not None and lora_down.shape[0] == 0:
        lora_down = lora_up = None
    if act_bits == 4 and mma8 is not False:
        mode = mma8_mode(x.device) if mma8 is None else mma8
        if mode:
            return w4a4_mma8_linear(x, qweight, weight_scale, bias, group_size, smooth, lora_down, lora_up, mode, tile)
    fmt, act_group = (FMT_INT4, group_size) if act_bits == 4 else (FMT_INT8, None)
    q, qs, lora_act = quantize_activations(x, fmt, act_group, smooth, lora_down)
    return w4_gemm(q, qs, qweight, weight_scale, bias, lora_act, lora_up, x.dtype, group_size, tile)
