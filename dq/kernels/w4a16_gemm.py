"""W4A16 GEMM: weight-only INT4 (per-group scales), 16-bit activations, for small token counts.

At small M the layer is bound by reading the weight, so 4-bit weights move a quarter of the bytes of
BF16 ones. Codes are unpacked to the activation dtype (exact: -8..7), each group's dot runs on the
16-bit tensor cores, and the group scale is applied to the [BLOCK_M, BLOCK_N] partial sum rather than
to the [GROUP, BLOCK_N] weight tile (fewer multiplies when BLOCK_M < GROUP).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.act_quant import rank_pad
from dq.kernels.epilogue import LowRankOperands, lowrank_bias_epilogue, mma, tile_coords, tile_grid
from dq.kernels.tuning import launch, m_key
from dq.kernels.w4a4_gemm import unpack_int4


@triton.jit
def _w4a16_kernel(
    a_ptr, b_ptr, bs_ptr, bias_ptr, la_ptr, lu_ptr, c_ptr,
    M, N, K, R, M_KEY,
    stride_am, stride_bn, stride_bsn, stride_las, LA_SPLITS, stride_lam, stride_lun, stride_cm,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = a @ deq(b)^T (+ lora_act @ lora_up^T + bias).

    a: fp16/bf16 [M, K]; b: uint8 [N, K/2] packed INT4, scales bs [N, K/GROUP]; K a multiple of GROUP.
    """
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, GROUP // 2)
    rm = tl.minimum(offs_m, M - 1)
    rn = tl.minimum(offs_n, N - 1)
    a_even = a_ptr + rm[:, None] * stride_am + 2 * offs_h[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_h[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // GROUP):
        a_lo = tl.load(a_even)
        a_hi = tl.load(a_even + 1)
        b_lo, b_hi = unpack_int4(tl.load(b_ptrs))
        if UPCAST:  # the interpreter cannot cast int8 to bfloat16
            b_lo = b_lo.to(tl.float32)
            b_hi = b_hi.to(tl.float32)
        part = mma(a_lo, b_lo.to(a_lo.dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
        part = mma(a_hi, b_hi.to(a_lo.dtype), part, UPCAST)
        sb = tl.load(bs_ptr + rn * stride_bsn + g).to(tl.float32)
        acc += part * sb[None, :]
        a_even += GROUP
        b_ptrs += GROUP // 2
    lowrank_bias_epilogue(acc, offs_m, offs_n, M, N, R, la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr, stride_lun,
                          bias_ptr, c_ptr, stride_cm, HAS_LORA, HAS_BIAS, R_PAD, UPCAST)


@triton.jit
def _w4a16_splitk_kernel(
    a_ptr, b_ptr, bs_ptr, p_ptr,
    M, N,
    stride_am, stride_bn, stride_bsn, stride_ps, stride_pm,
    GROUP: tl.constexpr, GPP: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Partial sums p[pid_k, m, n] = sum over groups [pid_k*GPP, +GPP) of a_g @ deq(b_g)^T, for M <= BLOCK_M.

    Small M is bound by reading the weight: the grid splits N (BLOCK_N columns) and K (GPP groups)
    so every SM streams weight bytes; GPP is a constexpr, so the group loop is unrolled and its
    loads are independent (all in flight at once). Group scales multiply the fp32 partial.
    """
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, GROUP // 2)
    rm = tl.minimum(offs_m, M - 1)
    rn = tl.minimum(offs_n, N - 1)
    g0 = pid_k * GPP
    a_even = a_ptr + rm[:, None] * stride_am + g0 * GROUP + 2 * offs_h[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + g0 * (GROUP // 2) + offs_h[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in tl.static_range(GPP):
        a_lo = tl.load(a_even + g * GROUP)
        a_hi = tl.load(a_even + g * GROUP + 1)
        b_lo, b_hi = unpack_int4(tl.load(b_ptrs + g * (GROUP // 2)))
        if UPCAST:  # the interpreter cannot cast int8 to bfloat16
            b_lo = b_lo.to(tl.float32)
            b_hi = b_hi.to(tl.float32)
        part = mma(a_lo, b_lo.to(a_lo.dtype), tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), UPCAST)
        part = mma(a_hi, b_hi.to(a_lo.dtype), part, UPCAST)
        sb = tl.load(bs_ptr + rn * stride_bsn + g0 + g).to(tl.float32)
        acc += part * sb[None, :]
    tl.store(p_ptr + pid_k * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], acc,
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _splitk_reduce_kernel(
    p_ptr, bias_ptr, la_ptr, lu_ptr, c_ptr,
    M, N, R, SPLITS,
    stride_ps, stride_pm, stride_las, LA_SPLITS, stride_lam, stride_lun, stride_cm,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """c = sum_s p[s] (in order: deterministic) + low-rank + bias, for M <= BLOCK_M."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    ptrs = p_ptr + offs_m[:, None] * stride_pm + offs_n[None, :]
    acc = tl.load(ptrs, mask=mask, other=0.0)
    for s in range(1, SPLITS):
        acc += tl.load(ptrs + s * stride_ps, mask=mask, other=0.0)
    lowrank_bias_epilogue(acc, offs_m, offs_n, M, N, R, la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr,
                          stride_lun, bias_ptr, c_ptr, stride_cm, HAS_LORA, HAS_BIAS, R_PAD, UPCAST)


SMALL_M = 16  # token counts up to this take the split-K GEMV path


def splitk_plan(N: int, groups: int, sms: int) -> tuple[int, int]:
    """(BLOCK_N, groups per program): the most groups per program (<= 16, dividing `groups`) that
    still gives >= 4 programs per SM, so each program moves a large run of weight bytes."""
    block_n = 32
    tiles = triton.cdiv(N, block_n)
    divisors = [d for d in range(1, min(16, groups) + 1) if groups % d == 0]
    ok = [d for d in divisors if tiles * (groups // d) >= 4 * sms]
    return block_n, (max(ok) if ok else 1)


def _w4a16_small_m(x, qweight, weight_scale, bias, group_size, lr: LowRankOperands, c, plan=None):
    M, K = x.shape
    N = qweight.shape[0]
    groups = K // group_size
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    block_n, gpp = plan or splitk_plan(N, groups, sms)
    splits = groups // gpp
    part = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    _w4a16_splitk_kernel[(triton.cdiv(N, block_n), splits)](
        x, qweight, weight_scale, part, M, N,
        x.stride(0), qweight.stride(0), weight_scale.stride(0), part.stride(0), part.stride(1),
        GROUP=group_size, GPP=gpp, UPCAST=not x.is_cuda, BLOCK_M=SMALL_M, BLOCK_N=block_n, num_warps=4,
    )
    rb = 64
    _splitk_reduce_kernel[(triton.cdiv(N, rb),)](
        part, bias if bias is not None else c, *lr.pointers(c), c,
        M, N, lr.rank, splits,
        part.stride(0), part.stride(1), *lr.strides(), c.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=lr.rank > 0, R_PAD=rank_pad(lr.rank), UPCAST=not x.is_cuda,
        BLOCK_M=SMALL_M, BLOCK_N=rb, num_warps=4,
    )
    return c


def w4a16_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    small_m: bool | None = None,
    splitk_plan_override: tuple[int, int] | None = None,
) -> torch.Tensor:
    """y = (x/s) deq(W)^T (+ ((x/s) L_down^T) L_up^T + b) for a 2-D fp16/bf16 x.

    Smoothing and the low-rank down-projection run as torch ops here (weight-only layers rarely have
    them); the up-projection and bias are fused into the GEMM epilogue. M <= SMALL_M runs the split-K
    GEMV kernels (small_m forces either path; splitk_plan_override sets (BLOCK_N, groups/program)).
    """
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise DQError(f"the W4A16 kernel takes float16 or bfloat16 activations, got {x.dtype}.")
    M, K = x.shape
    N = qweight.shape[0]
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != K or qweight.stride(-1) != 1:
        raise DQError(f"INT4 weights must be packed uint8 [N, {K // 2}], got {qweight.dtype} {tuple(qweight.shape)}.")
    if K % group_size or weight_scale.shape != (N, K // group_size):
        raise DQError(f"weight scales {tuple(weight_scale.shape)} do not match [{N}, {K}/{group_size}].")
    if smooth is not None:
        x = x / smooth.to(x.dtype)
    x = x.contiguous()
    rank = 0 if lora_down is None else lora_down.shape[0]
    lr = LowRankOperands.of(x.to(lora_down.dtype) @ lora_down.t() if rank else None, lora_up, N)
    c = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return c
    if (M <= SMALL_M) if small_m is None else small_m:
        if M > SMALL_M:
            raise DQError(f"the split-K GEMV path takes at most {SMALL_M} tokens, got {M}.")
        return _w4a16_small_m(x, qweight, weight_scale, bias, group_size, lr, c, splitk_plan_override)
    launch(
        _w4a16_kernel, "w4a16", tile_grid(M, N), x.device,
        (x, qweight, weight_scale, bias if bias is not None else c, *lr.pointers(c), c,
         M, N, K, lr.rank, m_key(M),
         x.stride(0), qweight.stride(0), weight_scale.stride(0), *lr.strides(), c.stride(0)),
        dict(GROUP=group_size, HAS_BIAS=bias is not None, HAS_LORA=lr.rank > 0, R_PAD=rank_pad(lr.rank), UPCAST=not c.is_cuda),
    )
    return c
