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

import torch

from dq.errors import DQError


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Pack integer codes in [-8, 15] (int tensor) two per byte along the last dim."""
    if codes.shape[-1] % 2:
        raise DQError(f"cannot pack 4-bit codes: last dimension {codes.shape[-1]} is odd; pad it to an even size.")
    nibbles = codes.to(torch.int16) & 0xF
    low, high = nibbles[..., 0::2], nibbles[..., 1::2]
    return (low | (high << 4)).to(torch.uint8)


def unpack_4bit(packed: torch.Tensor, signed: bool) -> torch.Tensor:
    """Inverse of pack_4bit: int8 codes, sign-extended when `signed` (INT4), raw nibbles otherwise."""
    p = packed.to(torch.int16)
    low, high = p & 0xF, (p >> 4) & 0xF
    out = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)
    if signed:
        out = torch.where(out >= 8, out - 16, out)
    return out.to(torch.int8)
