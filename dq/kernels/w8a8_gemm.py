"""W8A8 GEMM: INT8 (or FP8 e4m3 on sm89+) per-channel weights times per-token activations.

One integer (or FP8) dot over all of K with INT32 (FP32) accumulation, then the epilogue applies the
token and channel scales, adds the low-rank branch and the bias, and casts. Weights stay in dq's
stored layout [N, K], which is K-major as the 8-bit MMA wants.

FP8 layers may instead run the GEMM through `torch._scaled_mm` (cuBLAS FP8 with rowwise scales, sm90+) after
the same fused quantizer: which one is chosen per GPU and shape class by dq.kernels.tuned (a measured table,
else its stated heuristic).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dq.errors import DQError
from dq.kernels.act_quant import FMT_FP8, FMT_INT8, quantize_activations, rank_pad
from dq.kernels.epilogue import LowRankOperands, lowrank_bias_epilogue, tile_coords, tile_grid
from dq.kernels.tuned import choose
from dq.kernels.tuning import Tile, block_k, launch, m_key

BACKENDS = ("triton", "scaled_mm")


@triton.jit
def _w8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, la_ptr, lu_ptr, c_ptr,
    M, N, K, R, M_KEY,
    stride_am, stride_bn, stride_las, LA_SPLITS, stride_lam, stride_lun, stride_cm,
    IS_FP8: tl.constexpr, EVEN_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """c[M, N] = (a @ b^T) * as_[m] * bs[n] (+ lora_act @ lora_up^T + bias).

    a: int8 or float8_e4m3fn [M, K], per-token scales as_ fp32 [M]; b: same dtype [N, K],
    per-channel scales bs [N] (fp16/fp32).
    """
    pid_m, pid_n = tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rm = tl.minimum(offs_m, M - 1)
    rn = tl.minimum(offs_n, N - 1)
    a_ptrs = a_ptr + rm[:, None] * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + rn[None, :] * stride_bn + offs_k[:, None]
    if IS_FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=(k0 + offs_k[None, :]) < K, other=0.0)
            b = tl.load(b_ptrs, mask=(k0 + offs_k[:, None]) < K, other=0.0)
        acc = tl.dot(a, b, acc, out_dtype=acc.dtype)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(as_ptr + rm)
    sb = tl.load(bs_ptr + rn).to(tl.float32)
    out = acc.to(tl.float32) * sa[:, None] * sb[None, :]
    lowrank_bias_epilogue(out, offs_m, offs_n, M, N, R, la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr, stride_lun,
                          bias_ptr, c_ptr, stride_cm, HAS_LORA, HAS_BIAS, R_PAD, UPCAST)


def w8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_act: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    out_dtype: torch.dtype,
    tile: Tile | None = None,
) -> torch.Tensor:
    """Launch the 8-bit GEMM on quantized activations a [M, K] with per-token scales [1, M] (tile: instead of autotuning)."""
    M, K = a.shape
    N = qweight.shape[0]
    if qweight.dtype != a.dtype or qweight.shape[1] != K or qweight.stride(-1) != 1:
        raise DQError(f"8-bit weights must be {a.dtype} [N, {K}] row-major, got {qweight.dtype} {tuple(qweight.shape)}.")
    if weight_scale.numel() != N:
        raise DQError(f"W8A8 kernels take one weight scale per output channel ({N}), got {tuple(weight_scale.shape)}.")
    lr = LowRankOperands.of(lora_act, lora_up, N)
    c = torch.empty((M, N), dtype=out_dtype, device=a.device)
    if M == 0:
        return c
    launch(
        _w8_gemm_kernel, "w8", tile_grid(M, N), a.device,
        (a, a_scale, qweight, weight_scale.reshape(-1), bias if bias is not None else c, *lr.pointers(c), c,
         M, N, K, lr.rank, m_key(M),
         a.stride(0), qweight.stride(0), *lr.strides(), c.stride(0)),
        dict(IS_FP8=a.dtype != torch.int8, EVEN_K=K % block_k("w8", a.device, tile) == 0,
             HAS_BIAS=bias is not None, HAS_LORA=lr.rank > 0, R_PAD=rank_pad(lr.rank), UPCAST=not c.is_cuda),
        tile,
    )
    return c


def scaled_mm_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    lora_act: torch.Tensor | None,
    lora_up: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The FP8 GEMM of w8_gemm through torch._scaled_mm: the library applies the token and channel scales and
    the bias; the low-rank up-projection of the summed fp32 partials is added after, in out_dtype."""
    M, K = a.shape
    N = qweight.shape[0]
    if a.dtype != torch.float8_e4m3fn or qweight.dtype != a.dtype or qweight.shape[1] != K:
        raise DQError(f"torch._scaled_mm takes e4m3 codes [M, K] and weights [N, {K}], got {a.dtype} and {qweight.dtype} {tuple(qweight.shape)}.")
    lr = LowRankOperands.of(lora_act, lora_up, N)
    y = torch._scaled_mm(a, qweight.t(), scale_a=a_scale.reshape(M, 1), scale_b=weight_scale.float().reshape(1, N),
                         bias=None if bias is None else bias.to(out_dtype), out_dtype=out_dtype)
    if lr.rank:
        y = y.addmm_(lr.act.sum(0).to(out_dtype), lr.up.to(out_dtype).t())
    return y


def fp8_backend(x: torch.Tensor, n: int) -> str:
    """Where an FP8 layer's GEMM runs for input x [M, K]: "scaled_mm" where cuBLAS takes it (sm90+, N and K
    multiples of 16) and dq.kernels.tuned chooses it, else "triton"."""
    k = x.shape[1]
    takes = x.is_cuda and torch.cuda.get_device_capability(x.device) >= (9, 0) and k % 16 == 0 and n % 16 == 0
    return choose("w8a8_fp8", torch.cuda.get_device_name(x.device), x.shape[0]) if takes else "triton"


def w8a8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    smooth: torch.Tensor | None = None,
    lora_down: torch.Tensor | None = None,
    lora_up: torch.Tensor | None = None,
    tile: Tile | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = Q8(x/s) deq(W)^T (+ low-rank + b) for a 2-D x; INT8 or FP8 by the weight's dtype.

    backend (FP8 only): "triton" or "scaled_mm" instead of fp8_backend's choice.
    """
    if lora_down is not None and lora_down.shape[0] == 0:
        lora_down = lora_up = None
    fmt = FMT_INT8 if qweight.dtype == torch.int8 else FMT_FP8
    if backend is not None and (backend not in BACKENDS or fmt != FMT_FP8):
        raise DQError(f"backend {backend!r}: FP8 layers take one of {BACKENDS}; INT8 layers run the Triton kernel.")
    q, qs, lora_act = quantize_activations(x, fmt, None, smooth, lora_down)
    if fmt == FMT_FP8 and (backend or fp8_backend(x, qweight.shape[0])) == "scaled_mm":
        return scaled_mm_gemm(q, qs, qweight, weight_scale, bias, lora_act, lora_up, x.dtype)
    return w8_gemm(q, qs, qweight, weight_scale, bias, lora_act, lora_up, x.dtype, tile)
