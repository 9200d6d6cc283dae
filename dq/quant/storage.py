"""Storage of quantized weights: grid codes <-> the tensors a deployed layer keeps in its state dict.

    int formats of <= 4 bits  -> uint8 [out, in/2], canonical nibble layout (dq.quant.packing)
    int formats of 5..8 bits  -> int8 (signed) or uint8 (unsigned) [out, in]
    fp8 formats               -> torch.float8_* [out, in]
    fp4_e2m1                  -> uint8 [out, in/2], e2m1 codes in the canonical nibble layout
Scales are stored per row and group as [rows, groups] (rows = out, or 1 for per-tensor).
"""

from __future__ import annotations

import torch

from dq.quant.formats import FloatFormat, IntFormat, fp4_e2m1_decode, fp4_e2m1_encode, get_format
from dq.quant.packing import Allocator, new_tensor, pack_4bit, unpack_4bit
from dq.quant.spec import cast


def storage_shape_dtype(format_name: str, out_features: int, in_features: int) -> tuple[tuple[int, int], torch.dtype]:
    """Shape and dtype of the stored weight codes for a [out, in] weight."""
    fmt = get_format(format_name)
    if fmt.bits <= 4:
        return (out_features, in_features // 2), torch.uint8
    if isinstance(fmt, FloatFormat):
        return (out_features, in_features), fmt.torch_dtype
    return (out_features, in_features), torch.int8 if fmt.signed else torch.uint8


def encode_codes(grid: torch.Tensor, format_name: str) -> torch.Tensor:
    """Grid values (float tensor [out, in], exactly on the format's grid) -> stored tensor."""
    fmt = get_format(format_name)
    if isinstance(fmt, IntFormat):
        codes = grid.round().to(torch.int16)
        if fmt.bits <= 4:
            return pack_4bit(codes)
        return codes.to(torch.int8 if fmt.signed else torch.uint8)
    if fmt.torch_dtype is not None:
        return grid.to(fmt.torch_dtype)
    return pack_4bit(fp4_e2m1_encode(grid).to(torch.int16))


def decode_codes(stored: torch.Tensor, format_name: str, alloc: Allocator = new_tensor) -> torch.Tensor:
    """Stored tensor -> float32 grid values [out, in]. Exact inverse of encode_codes.

    `alloc` gives the result and the unpacking buffers (see dq.quant.packing.new_tensor).
    """
    fmt = get_format(format_name)
    if isinstance(fmt, IntFormat):
        codes = unpack_4bit(stored, signed=fmt.signed, alloc=alloc) if fmt.bits <= 4 else stored
    elif fmt.torch_dtype is not None:
        codes = stored
    else:
        codes = fp4_e2m1_decode(unpack_4bit(stored, signed=False, alloc=alloc).to(torch.uint8))
    return alloc("decode_codes.grid", tuple(codes.shape), torch.float32, stored.device).copy_(codes)


def expand_groups(scale: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """[rows, groups] scales -> [out, in], each group's scale repeated over its columns."""
    rows, groups = scale.shape
    return scale.float().repeat_interleave(in_features // groups, dim=1).expand(out_features, in_features)


def dequantize_stored(
    stored: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    format_name: str,
    in_features: int,
    alloc: Allocator = new_tensor,
) -> torch.Tensor:
    """Stored codes + [rows, groups] scales (and zero points) -> float32 weight [out, in].

    Codes times 16-bit scales are exact in float32 (at most 8 + 11 significant bits), so this is the
    exact dequantized weight; scales apply in place over a [out, groups, group size] view.
    """
    grid = decode_codes(stored, format_name, alloc)
    if grid.shape[1] != in_features:
        grid = grid[:, :in_features].contiguous()
    rows, groups = scale.shape
    view = grid.view(grid.shape[0], groups, in_features // groups)
    if zero is not None:
        view.sub_(cast(zero).unsqueeze(-1))
    return view.mul_(cast(scale).unsqueeze(-1)).view(grid.shape)
