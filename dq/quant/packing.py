"""Canonical packed layout for 4-bit codes (INT4 and FP4 e2m1).

Layout (the one every dq checkpoint and kernel reads):
    * codes are packed along the LAST dimension, two per byte, into uint8;
    * element 2i goes to the low nibble (bits 0-3), element 2i+1 to the high nibble (bits 4-7);
    * signed INT4 nibbles are two's complement (-8..7 -> 0x8..0x7); unsigned INT4 and FP4 e2m1
      codes (sign in bit 3) are stored as they are.
A weight [out, in] packs to [out, in // 2]; `in` must be even. Kernels that prefer another
layout repack once at load time from this one.
"""

from __future__ import annotations

import sys
from typing import Callable

import torch

from dq.errors import DQError


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in [-8, 15] (int tensor) two per byte along the last dim."""
    if codes.shape[-1] % 2:
        raise DQError(f"cannot pack 4-bit codes: last dimension {codes.shape[-1]} is odd; pad it to an even size.")
    nibbles = codes.to(torch.int16) & 0xF
    low, high = nibbles[..., 0::2], nibbles[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def new_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """The default allocator of the unpacking functions: a fresh tensor (`name` says what it is for).

    Hot paths pass an allocator that hands out reused buffers by name instead (dq.kernels.reference):
    on a CPU, the page faults of a fresh multi-megabyte tensor cost more than the unpacking itself.
    """
    return torch.empty(shape, dtype=dtype, device=device)


Allocator = Callable[[str, tuple[int, ...], torch.dtype, torch.device], torch.Tensor]


def unpack_4bit(packed: torch.Tensor, signed: bool, alloc: Allocator = new_tensor) -> torch.Tensor:
    """Inverse of pack_4bit: int8 codes, sign-extended when `signed` (INT4), raw nibbles otherwise.

    Works on 16-bit lanes, one per byte: x = 0x00HL becomes (x | x << 4) & 0x0F0F = 0x0H0L, whose two bytes
    are the two codes in order (little-endian); signed nibbles are offset by 8 first (XOR 0x88) and
    shifted back after. Five passes over bytes, no interleaving copy.
    """
    if sys.byteorder != "little":
        raise DQError("4-bit unpacking assumes a little-endian machine.")
    lead, half = packed.shape[:-1], packed.shape[-1]
    x = alloc("unpack_4bit.lanes", tuple(packed.shape), torch.int16, packed.device).copy_(packed)
    if signed:
        x.bitwise_xor_(0x88)
    out = alloc("unpack_4bit.codes", (*lead, 2 * half), torch.int8, packed.device)
    wide = out.view(torch.int16).view(packed.shape)
    torch.bitwise_left_shift(x, 4, out=wide).bitwise_or_(x).bitwise_and_(0x0F0F)
    return out.sub_(8) if signed else out
