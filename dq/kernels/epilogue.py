"""Shared GEMM pieces: tile scheduling and the low-rank + bias epilogue every GEMM kernel ends with
(its device side, and `LowRankOperands`, its host side)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dq.errors import DQError


def tile_grid(M: int, N: int):
    """The launch grid of a kernel scheduled by tile_coords: one program per output tile."""

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    return grid


@dataclass(frozen=True)
class LowRankOperands:
    """The host side of lowrank_bias_epilogue: the low-rank activations as fp32 partial sums [C, M, R]
    (None: no branch), lora_up [N, R] made contiguous, and their launch arguments."""

    act: torch.Tensor | None
    up: torch.Tensor | None
    rank: int

    @classmethod
    def of(cls, lora_act: torch.Tensor | None, lora_up: torch.Tensor | None, n: int) -> "LowRankOperands":
        """Check the shapes; lora_act is [M, R] or partial sums [C, M, R] (quantize_activations' output)."""
        if lora_act is not None and lora_act.dim() == 2:
            lora_act = lora_act.unsqueeze(0)
        rank = 0 if lora_act is None else lora_act.shape[2]
        if rank and (lora_up is None or lora_up.shape != (n, rank)):
            raise DQError(f"lora_up must be [{n}, {rank}], got {None if lora_up is None else tuple(lora_up.shape)}.")
        return cls(lora_act if rank else None, lora_up.contiguous() if rank else None, rank)

    def pointers(self, unread: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(la_ptr, lu_ptr): the operands; without a branch the kernel never reads them, so `unread` (any
        tensor on the device, e.g. the output) stands in for both."""
        return (self.act, self.up) if self.rank else (unread, unread)

    def strides(self) -> tuple[int, int, int, int]:
        """(stride_las, LA_SPLITS, stride_lam, stride_lun) of lowrank_bias_epilogue."""
        if not self.rank:
            return 0, 1, 0, 0
        return self.act.stride(0), self.act.shape[0], self.act.stride(1), self.up.stride(0)


@triton.jit
def tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Grouped ("swizzled") tile order: GROUP_M row tiles share each column tile while it is in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def lowrank_bias_epilogue(
    acc, offs_m, offs_n, M, N, R,
    la_ptr, stride_las, LA_SPLITS, stride_lam, lu_ptr, stride_lun, bias_ptr, c_ptr, stride_cm,
    HAS_LORA: tl.constexpr, HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, UPCAST: tl.constexpr,
):
    """c = acc + lora_act @ lora_up^T + bias, cast to c's dtype and stored.

    acc: fp32 [BLOCK_M, BLOCK_N]; lora_act: LA_SPLITS partial sums [LA_SPLITS, M, R] (any float dtype,
    split stride stride_las), added in order in fp32 and rounded to lora_up's dtype, as the reference's
    (x @ lora_down^T) is; lora_up: [N, R] (fp32 accumulation); bias: [N]; c: [M, N].
    """
    m_mask = offs_m < M
    n_mask = offs_n < N
    if HAS_LORA:
        offs_r = tl.arange(0, R_PAD)
        la_ptrs = la_ptr + offs_m[:, None] * stride_lam + offs_r[None, :]
        la_mask = m_mask[:, None] & (offs_r[None, :] < R)
        la = tl.load(la_ptrs, mask=la_mask, other=0.0).to(tl.float32)
        for s in range(1, LA_SPLITS):
            la += tl.load(la_ptrs + s * stride_las, mask=la_mask, other=0.0).to(tl.float32)
        lu = tl.load(lu_ptr + offs_n[None, :] * stride_lun + offs_r[:, None],
                     mask=n_mask[None, :] & (offs_r[:, None] < R), other=0.0)
        la = round_to(la, lu.dtype).to(lu.dtype)
        acc = mma(la, lu, acc, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    acc = round_to(acc, c_ptr.dtype.element_ty)
    tl.store(c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (set on CPU only): the interpreter's dot cannot
    take bfloat16 operands, so they go in as the fp32 values they exactly are."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    else:
        return tl.dot(a, b, acc)


@triton.jit
def round_to(x, DTYPE: tl.constexpr):
    """fp32 x rounded to DTYPE (nearest, ties to even) and returned as fp32.

    bfloat16 is rounded with integer ops so the result is the same on GPUs and in the CPU interpreter
    (whose float->bfloat16 cast truncates)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def round_e4m3(x):
    """fp32 x (|x| <= 448) rounded to the nearest float8 e4m3 value (ties to even), as fp32.

    Done with integer ops so GPUs and the CPU interpreter (whose fp8 cast misrounds) agree."""
    bits = x.to(tl.uint32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
    v = x * 512.0
    r = tl.floor(v + 0.5)
    r = tl.where(((r - v) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)
    return tl.where(tl.abs(x) < 0.015625, r / 512.0, normal)
