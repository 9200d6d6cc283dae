"""Numerics: formats, granularity, fake quantization and 4-bit packing. Imports nothing else of dq."""

from dq.quant.fake import dequantize, dynamic_codes, fake_quantize, fake_quantize_channels, grid_ste, quantize, round_ste, weight_scales
from dq.quant.formats import FORMATS, FloatFormat, IntFormat, NumberFormat, fp4_e2m1_decode, fp4_e2m1_encode, get_format
from dq.quant.granularity import (
    Granularity,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    Progressive,
    granularity_from_name,
    granularity_name,
)
from dq.quant.packing import pack_4bit, unpack_4bit
from dq.quant.spec import QuantSpec, cast, dynamic_range, scales_from_range, spec_from_dict, spec_to_dict

__all__ = [
    "FORMATS",
    "FloatFormat",
    "Granularity",
    "IntFormat",
    "NumberFormat",
    "PerChannel",
    "PerGroup",
    "PerTensor",
    "PerToken",
    "Progressive",
    "QuantSpec",
    "cast",
    "dequantize",
    "dynamic_codes",
    "dynamic_range",
    "fake_quantize",
    "fake_quantize_channels",
    "fp4_e2m1_decode",
    "fp4_e2m1_encode",
    "get_format",
    "grid_ste",
    "granularity_from_name",
    "granularity_name",
    "pack_4bit",
    "quantize",
    "round_ste",
    "scales_from_range",
    "spec_from_dict",
    "spec_to_dict",
    "unpack_4bit",
    "weight_scales",
]
