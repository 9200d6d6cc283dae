"""Numerics: every format rounds to its nearest grid value, errors stay within the analytic bound."""

import pytest
import torch

from dq.errors import DQError
from dq.quant import (
    FORMATS,
    PerChannel,
    PerGroup,
    PerTensor,
    PerToken,
    QuantSpec,
    dynamic_range,
    fake_quantize,
    fp4_e2m1_decode,
    fp4_e2m1_encode,
    get_format,
    pack_4bit,
    scales_from_range,
    unpack_4bit,
)


def _grid(name: str) -> torch.Tensor:
    """Every representable value of a format, enumerated independently of its rounding code."""
    fmt = get_format(name)
    if fmt.is_integer:
        return torch.arange(fmt.qmin, fmt.qmax + 1, dtype=torch.float32)
    if name == "fp4_e2m1":
        return fp4_e2m1_decode(torch.arange(16, dtype=torch.uint8)).unique()
    values = torch.arange(256, dtype=torch.uint8).view(fmt.torch_dtype).float()
    return values[torch.isfinite(values)].unique()


@pytest.mark.parametrize("name", FORMATS.names())
def test_round_is_nearest_grid_value(name):
    fmt = get_format(name)
    grid = _grid(name)
    x = torch.randn(4000) * fmt.max_value / 2
    x = torch.cat([x, grid, torch.tensor([fmt.max_value * 3, -fmt.max_value * 3])])
    q = fmt.round(x)
    assert torch.isin(q, grid).all(), "rounded values must be representable"
    nearest_err = (x.clamp(grid.min(), grid.max())[:, None] - grid[None, :]).abs().min(dim=1).values
    err = (x.clamp(grid.min(), grid.max()) - q).abs()
    assert torch.allclose(err, nearest_err), "rounding must pick a nearest grid value"


def test_fp4_ties_go_to_even_mantissa():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert fp4_e2m1_decode(fp4_e2m1_encode(x)).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


GRANULARITIES = [PerTensor(), PerChannel(), PerGroup(16), PerToken(), PerToken(16)]


@pytest.mark.parametrize("gran", GRANULARITIES, ids=lambda g: type(g).__name__ + str(getattr(g, "group_size", "")))
@pytest.mark.parametrize("fmt", ["int2", "int3", "int4", "int8", "uint4", "uint8"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_integer_error_within_half_step(fmt, gran, symmetric):
    x = torch.randn(8, 64) * torch.linspace(0.1, 10, 64)  # channels of very different ranges
    if fmt.startswith("uint") and symmetric:
        x = x.abs()  # unsigned symmetric quantization is for non-negative tensors (post-GELU)
    spec = QuantSpec(fmt, gran, symmetric=symmetric)
    lo, hi = dynamic_range(x, spec)
    scale, zero = scales_from_range(lo, hi, spec)
    xq = fake_quantize(x, spec, scale, zero)
    step = scale.expand_as(spec.granularity.grouped(x)).reshape(x.shape)
    assert ((x - xq).abs() <= step / 2 + 1e-5 * step).all()
    if symmetric and not fmt.startswith("uint"):
        assert torch.equal(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
@pytest.mark.parametrize("gran", [PerTensor(), PerChannel(), PerGroup(16), PerToken(16)], ids=str)
def test_float_relative_error_bound(fmt, gran):
    x = torch.randn(8, 64) * torch.linspace(0.1, 10, 64)
    spec = QuantSpec(fmt, gran)
    xq = fake_quantize(x, spec)
    lo, hi = dynamic_range(x, spec)
    scale, _ = scales_from_range(lo, hi, spec)
    s = scale.expand_as(spec.granularity.grouped(x)).reshape(x.shape)
    mant = get_format(fmt).mantissa_bits
    # Normal values: half an ulp, i.e. 2^-(m+1) relative; below the smallest normal, half the subnormal step.
    min_normal = {"fp8_e4m3": 2.0**-6, "fp8_e5m2": 2.0**-14, "fp4_e2m1": 1.0}[fmt]
    bound = torch.maximum(x.abs() * 2.0 ** -(mant + 1), s * min_normal * 2.0 ** -(mant + 1))
    assert ((x - xq).abs() <= bound * (1 + 1e-4) + 1e-7).all()


def test_nvfp4_scales_are_fp8_representable():
    x = torch.randn(4, 64)
    spec = QuantSpec("fp4_e2m1", PerGroup(16), scale_format="fp8_e4m3")
    lo, hi = dynamic_range(x, spec)
    scale, _ = scales_from_range(lo, hi, spec)
    outer = scale.amax() / 448.0
    ratio = scale / outer
    assert torch.allclose(ratio.to(torch.float8_e4m3fn).float(), ratio, rtol=1e-6)


def test_fake_quant_straight_through_gradient():
    spec = QuantSpec("int4", PerTensor())
    x = torch.tensor([-3.0, -0.4, 0.2, 1.1, 3.0], requires_grad=True)
    scale = torch.tensor([[0.25]])
    fake_quantize(x, spec, scale).sum().backward()
    # Inside the clipping range [-8, 7] * 0.25 the gradient passes through; outside it is zero.
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("fmt", ["int4", "uint4", "int8", "fp8_e4m3", "fp4_e2m1"])
@pytest.mark.parametrize("gran", [PerChannel(), PerGroup(16), PerToken(16)])
def test_fake_quant_without_grad_equals_straight_through_path(fmt, gran):
    """Calibration calls fake_quantize under no_grad on a fast path; its values must be the STE path's."""
    spec = QuantSpec(fmt, gran, symmetric=not fmt.startswith("uint"))
    x = torch.randn(24, 64) * torch.logspace(-3, 2, 64)
    with_grad = fake_quantize(x.clone().requires_grad_(), spec).detach()
    with torch.no_grad():
        without = fake_quantize(x, spec)
    assert torch.equal(with_grad, without)


def test_scale_gets_gradient_for_step_size_learning():
    spec = QuantSpec("int8", PerTensor())
    scale = torch.tensor([[0.05]], requires_grad=True)
    fake_quantize(torch.randn(100), spec, scale).pow(2).sum().backward()
    assert scale.grad is not None and scale.grad.abs().item() > 0


def test_group_size_must_divide():
    with pytest.raises(DQError, match="not a multiple of the group size 64"):
        PerGroup(64).grouped(torch.zeros(4, 96))


def test_float_formats_are_symmetric_only():
    with pytest.raises(DQError, match="symmetric"):
        QuantSpec("fp8_e4m3", symmetric=False)


def test_unknown_format_lists_registered():
    with pytest.raises(DQError, match="int4"):
        get_format("int42")


class TestPacking:
    def test_layout_low_nibble_first(self):
        packed = pack_4bit(torch.tensor([[1, -1, 7, -8]], dtype=torch.int8))
        assert packed.dtype == torch.uint8
        assert packed.tolist() == [[0xF1, 0x87]]

    @pytest.mark.parametrize("signed", [True, False])
    def test_int4_round_trip_exact(self, signed):
        lo, hi = (-8, 8) if signed else (0, 16)
        codes = torch.randint(lo, hi, (33, 128), dtype=torch.int8 if signed else torch.int16)
        packed = pack_4bit(codes)
        assert packed.shape == (33, 64)
        assert torch.equal(unpack_4bit(packed, signed=signed).to(torch.int16), codes.to(torch.int16))

    def test_fp4_round_trip_exact(self):
        values = fp4_e2m1_decode(torch.randint(0, 16, (16, 64), dtype=torch.uint8))
        packed = pack_4bit(fp4_e2m1_encode(values).to(torch.int16))
        decoded = fp4_e2m1_decode(unpack_4bit(packed, signed=False).to(torch.uint8))
        assert torch.equal(decoded, values)

    def test_odd_length_refused(self):
        with pytest.raises(DQError, match="odd"):
            pack_4bit(torch.zeros(3, 5, dtype=torch.int8))
