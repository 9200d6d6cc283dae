"""QServe's progressive group quantization (QoQ, Lin et al. 2024): 4-bit weights whose GEMM runs in INT8.

Two levels, in the layout QServe stores (see the anchors, "hopper-kernels"; the rounding of s2 is dq's choice):

1. Per output channel, symmetric INT8 in the protective range: s1 = amax / 119 (kept in float16, as it is
   stored), q8 = round(w / s1), |q8| <= 119.
2. Per group of g consecutive q8 along K, asymmetric UINT4 with integer scale and zero: over the group's range
   [lo, hi] (widened to contain 0), s2 = ceil((hi - lo) / 15) (1..16), z = round(-lo / s2) (0..15),
   u = clamp(round(q8 / s2) + z, 0, 15). Rounding s2 up keeps the whole range on the grid: the grid's ends lie
   within s2 / 2 of lo and hi, so every code is within s2 / 2 of q8 and nothing is clipped further.

The weight is w ~= s1 * (u - z) * s2, within s1 * (1 + s2) / 2 of w. The middle factor is an integer in
[-127, 127]: |(u - z) * s2| <= |q8| + s2 / 2 <= 119 + 8 = 127 (119 is QServe's "protective range" for
exactly this). So a kernel turns each 4-bit code into an exact
INT8 operand with one subtract and one integer multiply, accumulates the whole K loop in INT32, and applies
s1 (with the activations' per-token scale) once, in the epilogue: no per-group float rescaling.

Stored (dq.nn.base): the codes u packed as UINT4, s2 and z as uint8 [out, groups], s1 as float16 [out, 1].
"""

from __future__ import annotations

import torch

PROTECTIVE_RANGE = 119
MAX_GROUP_SCALE = 16
CODE_MAX = 15


def channel_scales(w2d: torch.Tensor) -> torch.Tensor:
    """Level 1: s1 [out, 1] = amax / 119 per output channel, rounded to float16 (then returned as float32).

    Small rows keep float16 subnormal scales (relative precision 2^-24 / s1); an all-zero row gets the
    smallest one."""
    amax = w2d.detach().float().abs().amax(1, keepdim=True)
    s1 = (amax / PROTECTIVE_RANGE).to(torch.float16)
    return torch.where(s1 > 0, s1, torch.tensor(2.0**-24, dtype=torch.float16)).float()


def int8_codes(w2d: torch.Tensor, s1: torch.Tensor) -> torch.Tensor:
    """Level-1 codes q8 = round(w / s1) (float tensor of integers in [-119, 119])."""
    return torch.round(w2d.float() / s1).clamp_(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)


def group_scales(q8: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Level 2 over groups of `group` codes: (s2, z), each [out, in / group], integer-valued floats."""
    g = q8.reshape(q8.shape[0], -1, group)
    lo = g.amin(-1).clamp(max=0)
    hi = g.amax(-1).clamp(min=0)
    s2 = torch.ceil((hi - lo) / CODE_MAX).clamp_(1, MAX_GROUP_SCALE)
    z = torch.round(-lo / s2).clamp_(0, CODE_MAX)
    return s2, z


def progressive_scales(w2d: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max (s1 [out, 1], s2 [out, groups], z [out, groups]) of a weight [out, in]."""
    s1 = channel_scales(w2d)
    s2, z = group_scales(int8_codes(w2d, s1), group)
    return s1, s2, z


def progressive_codes(w2d: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The UINT4 codes u [out, in] (integer-valued float): q8 rounded to its group's grid, as QServe rounds."""
    out_f, groups = s2.shape
    q8 = int8_codes(w2d, s1).reshape(out_f, groups, -1)
    u = torch.round(q8 / s2.unsqueeze(-1)).add_(z.unsqueeze(-1)).clamp_(0, CODE_MAX)
    return u.reshape(w2d.shape)


def int8_weight(u: torch.Tensor, s2: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The INT8 operand (u - z) * s2 [out, in] (integer-valued float in [-127, 127])."""
    out_f, groups = s2.shape
    v = u.float().reshape(out_f, groups, -1)
    return ((v - z.float().unsqueeze(-1)) * s2.float().unsqueeze(-1)).reshape(u.shape)


def progressive_fake_quantize(w2d: torch.Tensor, group: int) -> torch.Tensor:
    """Min-max progressive quantization of a weight [out, in] and back, in its dtype (no gradient)."""
    s1, s2, z = progressive_scales(w2d, group)
    return (int8_weight(progressive_codes(w2d, s1, s2, z), s2, z) * s1).to(w2d.dtype)
