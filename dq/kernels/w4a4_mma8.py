"""W4A4 GEMM on 8-bit tensor cores (FP8 on sm89+, else INT8): INT4 weights and activations, per-group scales.

Cost model (Hopper). Per K-group of 64 and per output element the kernel must apply two group scales
to the group's partial sum, while the tensor cores do 64 MACs for it. Converting int32 partials of an
INT8 MMA to fp32 (I2FP) is a third instruction per element and group on top of the two FMAs, and
unpacking both 4-bit operands in registers costs more (the INT8 kernel in w4a4_gemm.py: 765 SASS
instructions per thread per group at a 128x128 tile, see benchmarks/KERNELS_NOTES.md). Here:

  * FP8 flavour: the MMA accumulates in fp32 directly (INT4 products and 64-term sums are exact in
    it), so the per-group work is two FMAs per element and no conversion;
  * the activations come from the quantizer as one byte per code (act_quant.FMT_INT4_FP8 / _I8), so
    they load straight into shared memory through the pipelined loads, no unpacking;
  * the weights stay in dq's canonical packed nibbles (no repacking) and are turned into bytes
    u = code + 8 in 0..15 by `nibble ^ 8`: three logic instructions per 8 codes, no sign extension.
    As e4m3, bytes 0..15 are exactly u * 2**-9 (subnormals, then the first normal binade); as int8
    they are u.

So the MMA yields p = f**-1 * (sum a*w + 8 * sum a) per group (f = 512 for e4m3, 1 for int8) and, with
the quantizer's scale planes (f * sa, corr = 8 * sum(a) * sa), sum(a*w) * sa = fma(p, f * sa, -corr);
the accumulator takes fma(that, sb, acc).

Layout. The tile is computed transposed, out^T[BLOCK_N, BLOCK_M] = W[BLOCK_N, K] @ X^T: the converted
weights are the MMA's A operand, which Hopper's wgmma reads from registers (the packed bytes arrive
through the pipelined loads and are converted after the shared-memory read), and the activation bytes
are the B operand, read by the tensor cores from shared memory. The epilogue transposes back and
shares the low-rank + bias code of the other GEMMs.

Hardware self-check. The FP8 flavour relies on the tensor cores taking e4m3 subnormals and keeping
every bit of the group sums; mma8_mode() verifies both once per device on extreme codes and falls back
to the INT8 flavour (or, failing that, to the INT8 kernel of w4a4_gemm.py) if they do not hold.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.act_quant import BYTE_SCALE, FMT_INT4_FP8, FMT_INT4_I8, quantize_activations, rank_pad
from dq.kernels.epilogue import LowRankOperands, lowrank_bias_epilogue, tile_coords, tile_grid
from dq.kernels.tuning import Tile, launch, m_key
from dq.quant import unpack_4bit

logger = logging.getLogger(__name__)

MODES = {"fp8": FMT_INT4_FP8, "int8": FMT_INT4_I8}  # MMA flavour -> activation byte format
_CODE_DTYPE = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


@triton.jit
def int4_to_offset_bytes(p, USE_ASM: tl.constexpr):
    """Packed INT4 pairs (uint8) -> (low, high) nibbles as bytes u = code + 8 in 0..15 (uint8).

    USE_ASM (CUDA): one inline-PTX block per 4 bytes (xor/and/shift on 32-bit words, 8 codes per 3
    instructions); otherwise the same bit operations per byte (the CPU interpreter has no inline asm).
    """
    if USE_ASM:
        lo, hi = tl.inline_asm_elementwise(
            asm="{ .reg .b32 t; xor.b32 t, $2, 0x88888888; and.b32 $0, t, 0x0F0F0F0F; "
                "shr.u32 t, t, 4; and.b32 $1, t, 0x0F0F0F0F; }",
            constraints="=r,=r,r", args=[p], dtype=(tl.uint8, tl.uint8), is_pure=True, pack=4,
        )
    else:
        x = p ^ 0x88
        lo = x & 0xF
        hi = x >> 4
    return lo, hi


@triton.jit
def _w4a4_mma8_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, la_ptr, lu_ptr, c_ptr,
    M, N, K, R, M_KEY,
    stride_am, stride_asg, stride_bn, stride_bsn, stride_las, LA_SPLITS, stride_lam, stride_lun, stride_cm,
    GROUP: tl.constexpr, MMA_FP8: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
    R_PAD: tl.constexpr, UPCAST: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = deq(a) @ deq(b)^T (+ lora_act @ lora_up^T + bias).

    a: e4m3 (MMA_FP8) or int8 [M, K] group-permuted codes; as_: fp32 [2, K/GROUP, M_pad] (f * scales,
    corrections; row stride stride_asg, M_pad >= the last tile's end); b: uint8 [N, K/2] packed INT4,
    bs: [N, K/GROUP] fp16/fp32 scales; K a multiple of GROUP.
    """
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, GROUP // 2)
    # Rows past M / N are clamped (not masked) so loads stay unpredicated; their results are never stored.
    # The scale planes are padded instead, so their loads keep the token index unclamped (vectorized).
    rm = tl.minimum(offs_m, M - 1)
    rn = tl.minimum(offs_n, N - 1)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_h[None, :]
    b_ptrs = b_ptr + rn[:, None] * stride_bn + offs_h[None, :]
    num_groups = K // GROUP
    corr_ptr = as_ptr + num_groups * stride_asg
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g in range(0, num_groups):
        u_lo, u_hi = int4_to_offset_bytes(tl.load(b_ptrs), USE_ASM)
        a_lo = tl.trans(tl.load(a_ptrs))
        a_hi = tl.trans(tl.load(a_ptrs + GROUP // 2))
        if MMA_FP8:  # bytes 0..15 as e4m3 are u * 2**-9, exact; the sums are exact in the fp32 accumulator
            part = tl.dot(u_lo.to(tl.float8e4nv, bitcast=True), a_lo, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32))
            part = tl.dot(u_hi.to(tl.float8e4nv, bitcast=True), a_hi, part)
        else:
            ipart = tl.dot(u_lo.to(tl.int8, bitcast=True), a_lo, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.int32),
                           out_dtype=tl.int32)
            part = tl.dot(u_hi.to(tl.int8, bitcast=True), a_hi, ipart, out_dtype=tl.int32).to(tl.float32)
        sa = tl.load(as_ptr + g * stride_asg + offs_m)  # f * scale
        cr = tl.load(corr_ptr + g * stride_asg + offs_m)
        sb = tl.load(bs_ptr + rn * stride_bsn + g).to(tl.float32)
        acc = tl.fma(tl.fma(part, sa[None, :], -cr[None, :]), sb[:, None], acc)
        a_ptrs += GROUP
        b_ptrs += GROUP // 2
    lowrank_bias_epilogue(tl.trans(acc), offs_m, offs_n, M, N, R, la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr,
                          stride_lun, bias_ptr, c_ptr, stride_cm, HAS_LORA, HAS_BIAS, R_PAD, UPCAST)


def w4a4_mma8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_act: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    out_dtype: torch.dtype,
    group_size: int,
    use_asm: bool | None = None,
    tile: Tile | None = None,
) -> torch.Tensor:
    """Launch the 8-bit-MMA W4A4 GEMM on quantize_activations(x, FMT_INT4_FP8 or FMT_INT4_I8, ...)'s outputs.

    a: e4m3 or int8 [M, K] (the flavour follows its dtype); a_scale: fp32 [2, K/G, M_pad] (M_pad: M
    rounded up to 256); qweight: packed uint8 [N, K/2]; weight_scale: [N, K/G]; lora_act: fp32
    partials [C, M, R] or None. use_asm: inline-PTX weight conversion (default: on CUDA). tile: instead of autotuning.
    """
    M, K = a.shape
    N = qweight.shape[0]
    if a.dtype not in (torch.float8_e4m3fn, torch.int8) or a.stride(-1) != 1:
        raise DQError(f"activation codes must be row-major float8_e4m3fn or int8 [M, K], got {a.dtype} {tuple(a.shape)}.")
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != K or qweight.stride(-1) != 1:
        raise DQError(f"INT4 weights must be packed uint8 [N, {K // 2}] row-major, got {qweight.dtype} {tuple(qweight.shape)}.")
    if K % group_size or weight_scale.shape != (N, K // group_size):
        raise DQError(f"weight scales {tuple(weight_scale.shape)} do not match [{N}, K/{group_size}] for K={K}.")
    m_pad = triton.cdiv(M, 256) * 256
    if a_scale.shape != (2, K // group_size, m_pad) or a_scale.stride(-1) != 1:
        raise DQError(f"activation scales must be [2, {K // group_size}, {m_pad}] (scales, corrections), "
                      f"got {tuple(a_scale.shape)}.")
    lr = LowRankOperands.of(lora_act, lora_up, N)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    launch(
        _w4a4_mma8_kernel, "w4a4_mma8", tile_grid(M, N), a.device,
        (a, a_scale, qweight, weight_scale, bias if bias is not None else c, *lr.pointers(c), c,
         M, N, K, lr.rank, m_key(M),
         a.stride(0), a_scale.stride(1), qweight.stride(0), weight_scale.stride(0), *lr.strides(), c.stride(0)),
        dict(GROUP=group_size, MMA_FP8=a.dtype == torch.float8_e4m3fn, HAS_BIAS=bias is not None, HAS_LORA=lr.rank > 0,
             R_PAD=rank_pad(lr.rank), UPCAST=not c.is_cuda, USE_ASM=c.is_cuda if use_asm is None else use_asm),
        tile,
    )
    return c


def w4a4_mma8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    mode: str = "fp8",
    tile: Tile | None = None,
) -> torch.Tensor:
    """y = Q(x/s) deq(W)^T + ((x/s) L_down^T) L_up^T + b for a 2-D x: quantize launch + 8-bit-MMA GEMM launch.

    Args:
        x: [M, K] float16/bfloat16/float32 activations (row-major).
        qweight, weight_scale: packed INT4 weights [N, K/2] (canonical layout) and their [N, K/G] scales.
        bias: [N] or None. group_size: G, the weight and activation group along K (a power of two).
        smooth, lora_down, lora_up: SVDQuant's smoothing [K] and low-rank branch [R, K], [N, R], or None.
        mode: "fp8" (e4m3 tensor cores, sm89+) or "int8"; mma8_mode(device) says which one a GPU runs exactly.
        tile: the GEMM's tile, instead of autotuning.

    Example:
        >>> y = w4a4_mma8_linear(x, qweight, scales, bias, 64, mode=mma8_mode(x.device))  # x [M, K] bf16
    """
    if mode not in MODES:
        raise DQError(f"unknown 8-bit MMA mode {mode!r}; expected one of {sorted(MODES)}.")
    if lora_down is not None and lora_down.shape[0] == 0:
        lora_down = lora_up = None
    q, qs, lora_act = quantize_activations(x, MODES[mode], group_size, smooth, lora_down)
    return w4a4_mma8_gemm(q, qs, qweight, weight_scale, bias, lora_act, lora_up, x.dtype, group_size, tile=tile)


def offset_operands(codes: torch.Tensor, mode: str, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer activation codes [M, K] -> the GEMM's (code bytes, scale planes) for unit scales.

    What the quantizer would write for activations whose group scales are all 1 (the padding rows are
    NaN: they must never reach a stored output). Used by the self-check and the tests.
    """
    M, K = codes.shape
    G = K // group
    perm = torch.cat([torch.arange(0, group, 2), torch.arange(1, group, 2)]).to(codes.device)
    q = codes.reshape(M, G, group)[:, :, perm].reshape(M, K)
    q = q.float().to(_CODE_DTYPE[mode]) if mode == "fp8" else q.to(torch.int8)
    planes = torch.full((2, G, triton.cdiv(M, 256) * 256), float("nan"), device=codes.device)
    planes[0, :, :M] = BYTE_SCALE[MODES[mode]]
    planes[1, :, :M] = 8.0 * codes.reshape(M, G, group).sum(-1).t().float()
    return q, planes


_MODE: dict[tuple[str, int | None], str | None] = {}


def self_check(device: torch.device, mode: str) -> bool:
    """True when the GEMM returns exact integer sums on `device` in `mode` (unit scales, extreme codes).

    Covers what the CPU interpreter cannot: the tensor cores' handling of e4m3 subnormals, the
    accumulation's precision on group sums up to 64 * 8 * 15, and the inline-PTX conversion.
    """
    gen = torch.Generator(device="cpu").manual_seed(0)
    M, N, K = 70, 150, 192
    codes = torch.randint(-8, 8, (M, K), generator=gen)
    codes[:7], codes[7:9] = -8, 7
    b = torch.randint(0, 256, (N, K // 2), dtype=torch.uint8, generator=gen)
    b[:3], b[3:6] = 0x77, 0x88
    ref = (codes.long() @ unpack_4bit(b, True).long().t()).float()
    q, planes = offset_operands(codes.to(device), mode)
    try:
        y = w4a4_mma8_gemm(q, planes, b.to(device), torch.ones(N, K // 64, device=device), None, None, None,
                           torch.float32, 64)
        return torch.equal(y.cpu(), ref)
    except Exception as e:  # a compiler or hardware that cannot run this flavour: use the next one
        logger.warning("W4A4 %s-MMA kernel failed its self-check on %s: %s", mode, device, e)
        return False


def mma8_mode(device: torch.device) -> str | None:
    """The 8-bit-MMA flavour W4A4 runs on `device`: "fp8" (sm89+, self-check passed), "int8", or None.

    Decided once per device by self_check (an exact-sum test on the device itself); None means use
    the INT8 kernel of w4a4_gemm.py. On the CPU (Triton interpreter) "fp8". During CUDA graph capture
    no check can run: an undecided device returns None for that call (the safe kernel).
    """
    if device.type != "cuda":
        return "fp8"
    key = (device.type, device.index if device.index is not None else torch.cuda.current_device())
    if key not in _MODE:
        if torch.cuda.is_current_stream_capturing():
            return None
        modes = (["fp8"] if torch.cuda.get_device_capability(device) >= (8, 9) else []) + ["int8"]
        _MODE[key] = next((m for m in modes if self_check(device, m)), None)
        if _MODE[key] != modes[0]:
            logger.warning("W4A4 on %s runs the %s kernel (the %s-MMA one failed its exact-sum self-check)",
                           device, _MODE[key] or "INT8 (unpacked INT4)", modes[0])
    return _MODE[key]
