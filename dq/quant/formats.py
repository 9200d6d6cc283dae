"""Number formats: signed/unsigned INT2..INT8, FP8 (e4m3, e5m2) and FP4 (e2m1).

A format maps a real value that has already been divided by its scale onto the
nearest representable value ("rounding to the grid"). Integer formats round to
integers in [qmin, qmax]; float formats round to the nearest value of the
minifloat and saturate at +-max.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from dq.registry import Registry

FORMATS: Registry["NumberFormat"] = Registry("number format")

# The non-negative values of FP4 e2m1 (1 sign, 2 exponent, 1 mantissa bit), indexed by their 3-bit code.
FP4_E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@dataclass(frozen=True)
class NumberFormat(ABC):
    """Base for formats. `bits` is the storage width of one element."""

    name: str
    bits: int

    @property
    def is_integer(self) -> bool:
        return isinstance(self, IntFormat)

    @property
    @abstractmethod
    def max_value(self) -> float:
        """The largest representable magnitude."""

    @abstractmethod
    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Round scaled values to the nearest representable value (float tensor out)."""


@dataclass(frozen=True)
class IntFormat(NumberFormat):
    signed: bool = True

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def max_value(self) -> float:
        return float(self.qmax)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        return torch.clamp(torch.round(x), self.qmin, self.qmax)


@dataclass(frozen=True)
class FloatFormat(NumberFormat):
    """A minifloat; `torch_dtype` is the torch storage dtype when torch has one (FP8)."""

    exponent_bits: int = 0
    mantissa_bits: int = 0
    torch_dtype: torch.dtype | None = None
    max_finite: float = 0.0

    @property
    def max_value(self) -> float:
        return self.max_finite

    def round(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.clamp(x.float(), -self.max_finite, self.max_finite)
        if self.torch_dtype is not None:
            return x.to(self.torch_dtype).float()
        return round_to_fp4_e2m1(x)


def round_to_fp4_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest e2m1 value, ties to the value with even mantissa (as the OCP MX spec does)."""
    codes = fp4_e2m1_encode(x)
    return fp4_e2m1_decode(codes)


def fp4_e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Encode floats (already scaled) to 4-bit e2m1 codes in a uint8 tensor: bit 3 is the sign."""
    values = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=x.device)
    mag = x.float().abs().clamp(max=6.0)
    # Midpoints between neighbours decide the rounding; a tie goes to the even code (even mantissa bit).
    mids = (values[1:] + values[:-1]) / 2
    idx = torch.bucketize(mag, mids)  # right=False: a value equal to a midpoint goes to the lower index
    tie = torch.isin(mag, mids)
    lower_is_odd = (idx % 2) == 1
    idx = torch.where(tie & lower_is_odd, idx + 1, idx)
    sign = (x < 0) & (idx > 0)
    return (idx | (sign.to(torch.long) << 3)).to(torch.uint8)


def fp4_e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """Decode 4-bit e2m1 codes (uint8, values 0..15) to float32."""
    values = torch.tensor(FP4_E2M1_VALUES, dtype=torch.float32, device=codes.device)
    codes = codes.to(torch.long)
    mag = values[codes & 7]
    return torch.where((codes & 8) != 0, -mag, mag)


for _bits in range(2, 9):
    FORMATS.add(f"int{_bits}", IntFormat(name=f"int{_bits}", bits=_bits, signed=True))
    FORMATS.add(f"uint{_bits}", IntFormat(name=f"uint{_bits}", bits=_bits, signed=False))
FORMATS.add(
    "fp8_e4m3",
    FloatFormat(name="fp8_e4m3", bits=8, exponent_bits=4, mantissa_bits=3, torch_dtype=torch.float8_e4m3fn, max_finite=448.0),
)
FORMATS.add(
    "fp8_e5m2",
    FloatFormat(name="fp8_e5m2", bits=8, exponent_bits=5, mantissa_bits=2, torch_dtype=torch.float8_e5m2, max_finite=57344.0),
)
FORMATS.add("fp4_e2m1", FloatFormat(name="fp4_e2m1", bits=4, exponent_bits=2, mantissa_bits=1, max_finite=6.0))


def get_format(name: str) -> NumberFormat:
    """The registered format called `name` (DQError listing the formats otherwise)."""
    return FORMATS.get(name)
