"""Activation quantization fused with the smoothing division and the low-rank down-projection.

One launch reads X once and writes everything the GEMM needs:

    xs       = x / smooth                                  (in x.dtype, as the reference does)
    q, scale = per-token (per-group) symmetric quantization of xs
    lora_act = xs @ lora_down^T                            (the low-rank branch's input, fp32 partial sums)

Outputs (the layouts the GEMM kernels in this package read):
    int4   q: uint8 [M, K/2], canonical nibble layout (dq.quant.packing); scale: fp32 [K/G, M]
    int4 as bytes (FMT_INT4_FP8 / FMT_INT4_I8, for the 8-bit-MMA W4A4 GEMM, dq.kernels.w4a4_mma8):
           q: float8_e4m3fn / int8 [M, K] holding the INT4 code values exactly, each group of G
           columns permuted to (even k..., odd k...) so the GEMM's two K/2 halves match the low / high
           nibbles of the packed weights; scale: fp32 [2, K/G, M_pad] = (f * scale, 8 * sum(codes) *
           scale) with f = 512 for e4m3 and 1 for int8: f and the correction undo the GEMM's offset
           weight encoding; rows are padded to M_pad (a multiple of 256, contents past M undefined)
           so GEMM tiles load them unmasked.
Scales are stored transposed (group-major) so a GEMM tile reads a contiguous run of tokens.

Scale rounding. Scales and codes use reciprocal multiplication: scale = max(amax * fl(1/qmax), tiny), and
each code is round(x * fl(1/scale)), one correctly rounded reciprocal per token (group) and one multiply
per element. The torch reference divides (amax / qmax, then x / scale). The scale then differs from the
reference's by at most one ulp and the scaled value by at most 4 ulps (the scale's ulp, the reciprocal's
and the product's half ulps, against the quotient's half ulp), so a code differs from the reference's only
where the reference's scaled value lies within 4 ulps of a rounding boundary (a .5 tie for the integer
formats, the midpoint of two e4m3 values for FP8), and then by one step. tests/kernels assert exactly that.

Parallelism (INT4, per-group scales). The grid is (row blocks, K chunks): each program streams its
chunk of K once in tiles of TILE_G groups, quantizes, and multiplies the tile into its rank-R partial
with one tl.dot per tile. K is split into chunks only as far as needed to fill the GPU (small M),
so large M reads lora_down once per row block and the epilogue sums few partials.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.epilogue import mma, round_e4m3, round_to

# Format codes shared with the GEMM launchers.
FMT_INT4, FMT_INT8, FMT_FP8, FMT_INT4_FP8, FMT_INT4_I8 = 0, 1, 2, 3, 4
_QMAX = {FMT_INT4: 7.0, FMT_INT8: 127.0, FMT_FP8: 448.0, FMT_INT4_FP8: 7.0, FMT_INT4_I8: 7.0}
# Factor on the first scale plane of the byte-coded INT4 formats (the GEMM's weight encoding, w4a4_mma8).
BYTE_SCALE = {FMT_INT4_FP8: 512.0, FMT_INT4_I8: 1.0}
# fl32(1 / qmax): scales are amax times it (module docstring, "Scale rounding").
_RCP = {k: float(np.float32(1.0) / np.float32(v)) for k, v in _QMAX.items()}
_TINY = torch.finfo(torch.float32).tiny
_SMS = {}


@triton.jit
def round_half_even(v):
    """Round fp32 to the nearest integer, ties to even (torch.round's rule); |v| < 2**22."""
    r = tl.floor(v + 0.5)
    tie = (r - v) == 0.5
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(tie & odd, r - 1.0, r)


@triton.jit
def _scale_and_reciprocal(amax, RCP: tl.constexpr, TINY: tl.constexpr):
    """(max(amax * fl(1/qmax), tiny), its correctly rounded reciprocal): the codes are x * reciprocal."""
    s = tl.maximum(amax * RCP, TINY)
    return s, tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)


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
def _act_quant_int4_kernel(
    x_ptr, s_ptr, q_ptr, sc_ptr, ld_ptr, la_ptr,
    M, K, R, GROUPS_PER_CHUNK,
    stride_xm, stride_qm, stride_ldr, stride_las, stride_lam, stride_sg,
    QMAX: tl.constexpr, RCP: tl.constexpr, TINY: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, UPCAST: tl.constexpr, CODE_BYTES: tl.constexpr,
    SCALE_F: tl.constexpr,
    BLOCK_M: tl.constexpr, GROUP: tl.constexpr, TILE_G: tl.constexpr, R_PAD: tl.constexpr,
):
    """INT4 codes + per-group scales of a [BLOCK_M, chunk] block of x, and its lora_down partial.

    Program (pid_m, pid_c) covers rows pid_m*BLOCK_M.. and groups [pid_c*GROUPS_PER_CHUNK, +GROUPS_PER_CHUNK).
    CODE_BYTES: codes as e4m3 / int8 bytes (q_ptr's type), group-permuted, and the two scale planes
    (SCALE_F * scale, correction) of the module docstring.
    """
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    TILE_K: tl.constexpr = TILE_G * GROUP
    g_begin = pid_c * GROUPS_PER_CHUNK
    g_end = tl.minimum(g_begin + GROUPS_PER_CHUNK, K // GROUP)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for g0 in range(g_begin, g_end, TILE_G):
        offs_k = g0 * GROUP + tl.arange(0, TILE_K)
        k_end = g_end * GROUP
        xs = _load_smoothed(x_ptr, s_ptr, offs_m, offs_k, M, k_end, stride_xm, HAS_SMOOTH)
        x3 = tl.reshape(xs, (BLOCK_M, TILE_G, GROUP))
        scale, inv = _scale_and_reciprocal(tl.max(tl.abs(x3), axis=2), RCP, TINY)  # [BLOCK_M, TILE_G]
        offs_g = g0 + tl.arange(0, TILE_G)
        sc_mask = m_mask[:, None] & (offs_g[None, :] < g_end)
        v = x3 * inv[:, :, None]
        qf = tl.minimum(tl.maximum(round_half_even(v), -QMAX - 1.0), QMAX)  # [BLOCK_M, TILE_G, GROUP]
        if CODE_BYTES:
            # (SCALE_F * scale, 8 * sum(codes) * scale): the sum is an exact integer, SCALE_F a power of 2.
            corr = (8.0 * tl.sum(qf, axis=2)) * scale
            sc_ptrs = sc_ptr + offs_g[None, :] * stride_sg + offs_m[:, None]
            tl.store(sc_ptrs, scale * SCALE_F, mask=sc_mask)
            tl.store(sc_ptrs + (K // GROUP) * stride_sg, corr, mask=sc_mask)
        else:
            tl.store(sc_ptr + offs_g[None, :] * stride_sg + offs_m[:, None], scale, mask=sc_mask)
        if CODE_BYTES:
            ev, od = tl.split(tl.reshape(qf, (BLOCK_M, TILE_G, GROUP // 2, 2)))
            offs_j = tl.arange(0, GROUP // 2)
            col = offs_g[None, :, None] * GROUP + offs_j[None, None, :]
            ptrs = q_ptr + offs_m[:, None, None] * stride_qm + col
            mask3 = m_mask[:, None, None] & (offs_g[None, :, None] < g_end)
            tl.store(ptrs, ev.to(q_ptr.dtype.element_ty), mask=mask3)  # integers -8..7: exact in e4m3 / int8
            tl.store(ptrs + GROUP // 2, od.to(q_ptr.dtype.element_ty), mask=mask3)
        else:
            q = qf.to(tl.int32)
            lo, hi = tl.split(tl.reshape(q, (BLOCK_M, TILE_K // 2, 2)))
            packed = ((lo & 0xF) | ((hi & 0xF) << 4)).to(tl.uint8)
            offs_h = g0 * (GROUP // 2) + tl.arange(0, TILE_K // 2)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_h[None, :], packed,
                     mask=m_mask[:, None] & (offs_h[None, :] < k_end // 2))
        if HAS_LORA:
            ld = tl.load(ld_ptr + offs_r[None, :] * stride_ldr + offs_k[:, None],
                         mask=(offs_r[None, :] < R) & (offs_k[:, None] < k_end), other=0.0)
            lora = mma(xs.to(ld.dtype), ld, lora, UPCAST)
    if HAS_LORA:
        tl.store(la_ptr + pid_c * stride_las + offs_m[:, None] * stride_lam + offs_r[None, :], lora,
                 mask=m_mask[:, None] & (offs_r[None, :] < R))


@triton.jit
def _act_quant_token_kernel(
    x_ptr, s_ptr, q_ptr, sc_ptr, ld_ptr, la_ptr,
    M, K, R,
    stride_xm, stride_qm, stride_ldr, stride_lam,
    QMAX: tl.constexpr, RCP: tl.constexpr, TINY: tl.constexpr, FMT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, HAS_LORA: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, R_PAD: tl.constexpr,
):
    """Per-token INT8 / FP8 codes of a [BLOCK_M, K] row block (two passes: amax, then codes from L2)."""
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    offs_r = tl.arange(0, R_PAD)
    if HAS_LORA:
        lora = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        xs = _load_smoothed(x_ptr, s_ptr, offs_m, k0 + tl.arange(0, BLOCK_K), M, K, stride_xm, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(xs), axis=1))
    scale, inv = _scale_and_reciprocal(amax, RCP, TINY)
    tl.store(sc_ptr + offs_m, scale, mask=m_mask)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, s_ptr, offs_m, offs_k, M, K, stride_xm, HAS_SMOOTH)
        v = xs * inv[:, None]
        mask = m_mask[:, None] & (offs_k[None, :] < K)
        if FMT == 2:
            q = round_e4m3(tl.minimum(tl.maximum(v, -QMAX), QMAX)).to(q_ptr.dtype.element_ty)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q, mask=mask)
        else:
            q = tl.minimum(tl.maximum(round_half_even(v), -QMAX - 1.0), QMAX).to(tl.int32)
            tl.store(q_ptr + offs_m[:, None] * stride_qm + offs_k[None, :], q.to(tl.int8), mask=mask)
        if HAS_LORA:
            ld = tl.load(ld_ptr + offs_r[None, :] * stride_ldr + offs_k[:, None],
                         mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0)
            lora = mma(xs.to(ld.dtype), ld, lora, UPCAST)
    if HAS_LORA:
        tl.store(la_ptr + offs_m[:, None] * stride_lam + offs_r[None, :], lora,
                 mask=m_mask[:, None] & (offs_r[None, :] < R))


def rank_pad(rank: int) -> int:
    """Rank rounded up to a power of two of at least 16 (the smallest tl.dot extent)."""
    return max(16, triton.next_power_of_2(max(rank, 1)))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


@functools.lru_cache(maxsize=None)
def int4_plan(M: int, K: int, group: int, sms: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, TILE_G, chunks, num_warps) for the INT4 quantizer: ~16 KB bf16 tiles, >= 2 programs per SM."""
    groups = K // group
    if not on_gpu:
        return 16, 2, min(groups, 2), 4
    block_m = 32 if M >= 2048 else 16
    tile_g = max(1, min(groups, 8192 // (block_m * group)))  # 16 KB of bf16 per tile
    tile_g = 1 << (tile_g.bit_length() - 1)
    row_blocks = triton.cdiv(M, block_m)
    chunks = max(1, min(triton.cdiv(groups, tile_g), triton.cdiv(2 * sms, row_blocks)))
    return block_m, tile_g, chunks, 8 if block_m * tile_g * group >= 8192 else 4


def quantize_activations(
    x: torch.Tensor,
    fmt: int,
    group_size: int | None,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    plan: tuple[int, int, int, int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Launch the fused quantizer on a 2-D x [M, K].

    Returns (codes, scales [K/G or 1, M] ([2, K/G, M_pad] for FMT_INT4_FP8/I8), lora partials fp32 [C, M, R] or None)
    in the layouts of the module docstring. `plan` overrides
    int4_plan's (BLOCK_M, TILE_G, chunks, num_warps) (tests use it to run the GPU tilings on CPU).
    """
    if x.dim() != 2 or x.stride(-1) != 1:
        raise DQError(f"quantize_activations needs a 2-D row-major x, got shape {tuple(x.shape)} strides {x.stride()}.")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise DQError(f"activations must be float16, bfloat16 or float32, got {x.dtype}.")
    M, K = x.shape
    int4 = fmt in (FMT_INT4, FMT_INT4_FP8, FMT_INT4_I8)
    if int4 and (group_size is None or K % group_size or group_size % 2 or group_size < 16):
        raise DQError(
            f"INT4 activations need per-token groups of an even size >= 16 dividing K={K}, got {group_size}; "
            "pad the input features or choose another group size."
        )
    if not int4 and group_size is not None:
        raise DQError("8-bit activation kernels take per-token scales only (PerToken() without a group size).")
    if group_size is not None and triton.next_power_of_2(group_size) != group_size:
        raise DQError(f"group size {group_size} must be a power of two for the Triton kernels.")
    rank = 0 if lora_down is None else lora_down.shape[0]
    if lora_down is not None and (lora_down.shape[1] != K or lora_down.stride(-1) != 1):
        raise DQError(f"lora_down must be row-major [rank, {K}], got {tuple(lora_down.shape)}.")
    if smooth is not None and smooth.numel() != K:
        raise DQError(f"smooth must have {K} entries, got {smooth.numel()}.")
    dev = x.device
    common = dict(QMAX=_QMAX[fmt], RCP=_RCP[fmt], TINY=_TINY,
                  HAS_SMOOTH=smooth is not None, HAS_LORA=rank > 0, UPCAST=not x.is_cuda, R_PAD=rank_pad(rank))
    s_arg = smooth if smooth is not None else x
    if int4:
        block_m, tile_g, chunks, warps = plan or int4_plan(M, K, group_size, _num_sms(dev), x.is_cuda)
        groups = K // group_size
        per_chunk = triton.cdiv(triton.cdiv(groups, chunks), tile_g) * tile_g
        chunks = triton.cdiv(groups, per_chunk)
        code_bytes = fmt in BYTE_SCALE
        q_dtype = {FMT_INT4_FP8: torch.float8_e4m3fn, FMT_INT4_I8: torch.int8}.get(fmt, torch.uint8)
        q = torch.empty((M, K) if code_bytes else (M, K // 2), dtype=q_dtype, device=dev)
        scales = torch.empty((2, groups, triton.cdiv(M, 256) * 256) if code_bytes else (groups, M), dtype=torch.float32,
                             device=dev)
        lora_act = torch.empty((chunks, M, rank), dtype=torch.float32, device=dev) if rank else None
        if M == 0:
            return q, scales, lora_act
        _act_quant_int4_kernel[(triton.cdiv(M, block_m), chunks)](
            x, s_arg, q, scales, lora_down if rank else x, lora_act if rank else x,
            M, K, rank, per_chunk,
            x.stride(0), q.stride(0), lora_down.stride(0) if rank else 0,
            lora_act.stride(0) if rank else 0, lora_act.stride(1) if rank else 0, scales.stride(-2),
            CODE_BYTES=code_bytes, SCALE_F=BYTE_SCALE.get(fmt, 1.0), BLOCK_M=block_m, GROUP=group_size, TILE_G=tile_g, num_warps=warps, **common,
        )
        return q, scales, lora_act
    q = torch.empty((M, K), dtype=torch.int8 if fmt == FMT_INT8 else torch.float8_e4m3fn, device=dev)
    scales = torch.empty((1, M), dtype=torch.float32, device=dev)
    lora_act = torch.empty((1, M, rank), dtype=torch.float32, device=dev) if rank else None
    if M == 0:
        return q, scales, lora_act
    block_m = 16 if not x.is_cuda else (32 if M >= 8192 else 16 if M >= 1024 else 8)
    block_m = max(block_m, 16) if rank else block_m  # tl.dot needs 16 rows
    block_k = min(256 if x.is_cuda else 32, max(16, triton.next_power_of_2(K)))
    _act_quant_token_kernel[(triton.cdiv(M, block_m),)](
        x, s_arg, q, scales, lora_down if rank else x, lora_act if rank else x,
        M, K, rank,
        x.stride(0), q.stride(0), lora_down.stride(0) if rank else 0, lora_act.stride(1) if rank else 0,
        FMT=fmt, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4, **common,
    )
    return q, scales, lora_act
