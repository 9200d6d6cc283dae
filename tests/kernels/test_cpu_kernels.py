"""dq's C kernels for the CPU (dq.kernels.cpu_kernels): the same float32 values as the torch ops, bit for bit,
and deployed layers that give the same outputs with the kernels as without them."""

import logging

import pytest
import torch
from torch import nn

from dq.kernels import cpu_gemm, cpu_kernels
from dq.nn import LayerPlan, deploy_all, swap_layers
from dq.quant import PerChannel, PerGroup, PerToken, Progressive, QuantSpec, fake_quantize, fake_quantize_channels
from dq.quant.storage import dequantize_stored, encode_codes

pytestmark = pytest.mark.skipif(cpu_kernels.library() is None, reason="no C compiler: the CPU kernels are not built")


def hard_rows(k: int, qmax: int) -> torch.Tensor:
    """Rows that stress scales and rounding: random, zeros, subnormals, huge values, exact ties and near-ties."""
    torch.manual_seed(0)
    tie = torch.arange(k, dtype=torch.float32) % (2 * qmax + 1) - qmax + 0.5  # every code +- 1/2: ties to even
    tie[0] = qmax  # the absmax row that makes the scale exactly 1
    near = tie * (1 - 2**-23)
    rows = [torch.randn(5, k) * torch.rand(5, 1) * 4, torch.zeros(1, k), torch.full((1, k), 1e-40),
            torch.randn(1, k) * 1e30, -torch.rand(1, k), tie[None], near[None]]
    return torch.cat(rows)


@pytest.mark.parametrize("spec", [QuantSpec("int8", PerToken()), QuantSpec("int8", PerToken(32)),
                                  QuantSpec("int4", PerToken()), QuantSpec("int4", PerToken(64))])
def test_row_quantization_is_bit_identical(spec):
    x = hard_rows(128, spec.fmt.qmax)
    group, qmax = cpu_kernels.row_quantization(spec)
    out = torch.empty_like(x)
    cpu_kernels.quantize_rows(x, group, qmax, out)
    assert torch.equal(out, fake_quantize(x, spec))
    smooth, smoothed = torch.rand(128) + 0.5, torch.empty_like(x)
    cpu_kernels.quantize_rows(x, group, qmax, out, smooth, smoothed)
    assert torch.equal(smoothed, x / smooth)
    assert torch.equal(out, fake_quantize(x / smooth, spec))
    strided = torch.cat([x, x], 1)[:, :128]  # rows with a stride larger than their length
    cpu_kernels.quantize_rows(strided, group, qmax, out)
    assert torch.equal(out, fake_quantize(x, spec))


@pytest.mark.parametrize("spec", [QuantSpec("int8", PerToken()), QuantSpec("int4", PerToken(16))])
def test_channel_quantization_is_bit_identical(spec):
    """Per-pixel scales over the channels of an NCHW input, also across several pixel chunks."""
    torch.manual_seed(1)
    for shape in [(3, 32, 5, 7), (2, 48, 20, 20)]:
        x = torch.randn(shape) * torch.rand(1, 1, *shape[2:]) * 3
        out = torch.empty_like(x)
        cpu_kernels.quantize_channels(x, *cpu_kernels.row_quantization(spec), out)
        assert torch.equal(out, fake_quantize_channels(x, spec))


def test_only_symmetric_signed_integer_activations_are_taken():
    assert cpu_kernels.row_quantization(QuantSpec("uint8", PerToken())) is None
    assert cpu_kernels.row_quantization(QuantSpec("int8", PerToken(), symmetric=False)) is None
    assert cpu_kernels.row_quantization(QuantSpec("fp8_e4m3", PerToken())) is None
    assert cpu_kernels.row_quantization(QuantSpec("int8", PerChannel())) is None  # static: not per token
    assert cpu_kernels.row_quantization(None) is None


@pytest.mark.parametrize("fmt,scale_dtype,zero,rows", [
    ("int8", torch.float16, False, 64), ("int4", torch.float16, False, 64), ("int4", torch.float32, False, 1),
    ("uint4", torch.float16, True, 64), ("uint4", torch.uint8, True, 64), ("uint8", torch.float16, True, 64),
])
def test_weight_decoding_is_bit_identical(fmt, scale_dtype, zero, rows):
    torch.manual_seed(2)
    lo, hi = {"int8": (-127, 128), "int4": (-8, 8), "uint4": (0, 16), "uint8": (0, 256)}[fmt]
    stored = encode_codes(torch.randint(lo, hi, (64, 128)).float(), fmt)
    if scale_dtype == torch.uint8:
        scale = torch.randint(1, 17, (rows, 4), dtype=torch.uint8)
    else:
        scale = (torch.rand(rows, 4) * 3).to(scale_dtype)
    zeros = torch.randint(0, 16, (rows, 4)).to(scale_dtype) if zero else None
    out = torch.empty(64, 128)
    bits = 8 if fmt.endswith("8") else 4
    cpu_kernels.decode_weight(stored, bits, not fmt.startswith("u"), 128, out, scale, zeros)
    expected = dequantize_stored(stored, scale, zeros, fmt, 128)
    assert torch.equal(out, expected)
    channel = (torch.rand(64, 1) + 0.5).half()
    cpu_kernels.decode_weight(stored, bits, not fmt.startswith("u"), 128, out, scale, zeros, channel)
    assert torch.equal(out, expected * channel.float())


LAYERS = {
    "w8a8 linear": ("linear", QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken())),
    "w4a4 linear": ("linear", QuantSpec("int4", PerGroup(32)), QuantSpec("int4", PerToken(32))),
    "w4a16 linear": ("linear", QuantSpec("int4", PerGroup(32)), None),
    "w4a8 svdquant": ("svdq_linear", QuantSpec("int4", PerGroup(32)), QuantSpec("int8", PerToken())),
    "w4a16 svdquant": ("svdq_linear", QuantSpec("int4", PerGroup(32)), None),
    "w4a8 progressive": ("linear", QuantSpec("uint4", Progressive(32), symmetric=False), QuantSpec("int8", PerToken())),
    "w8a8 conv": ("conv2d", QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken())),
    "w4a4 conv": ("conv2d", QuantSpec("int4", PerGroup(32)), QuantSpec("int4", PerToken(32))),
}


@pytest.fixture
def float_int8_gemm(monkeypatch):
    """INT8 x INT8 layers in their float form in the torch ops too (DQ_CPU_INT8_GEMM=0): on a CPU with 8-bit dot
    products the torch ops would take torch._int_mm, whose exact INT32 sums differ from an FP32 GEMM's."""
    monkeypatch.setenv(cpu_gemm.ENV_VAR, "0")
    cpu_gemm.int8_gemm_is_fast.cache_clear()
    yield
    cpu_gemm.int8_gemm_is_fast.cache_clear()


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name", list(LAYERS))
def test_deployed_layers_give_the_torch_ops_output(name, bias, monkeypatch, float_int8_gemm):
    """A deployed layer's output with the C kernels (and, for linear layers, their GEMM calls) equals, bit for bit,
    its output through torch ops only in the same (float GEMM) form: on a few tokens, on enough for the kernels'
    parallel loops, and on strided inputs (rows expanded from one, a transposed column)."""
    kind, weight, act = LAYERS[name]
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(64, 48, 3, padding=1, bias=bias) if kind == "conv2d" else nn.Linear(64, 48, bias=bias))
    options = {"rank": 8} if kind == "svdq_linear" else {}
    swap_layers(model, {"0": LayerPlan(kind, weight, act, options=options)})
    deploy_all(model)
    inputs = [torch.randn(2, 64, 6, 6), torch.randn(8, 64, 16, 16)] if kind == "conv2d" else [
        torch.randn(2, 7, 64), torch.randn(4, 300, 64), torch.randn(1, 64).expand(5, 64), torch.randn(64, 1).t()]
    with torch.no_grad():
        fused = [model(x) for x in inputs]
        monkeypatch.setattr(cpu_kernels, "library", lambda: None)
        plain = [model(x) for x in inputs]
    for a, b in zip(fused, plain):
        assert torch.equal(a, b)


def test_switched_off_by_the_environment(monkeypatch, caplog):
    monkeypatch.setenv(cpu_kernels.ENV_VAR, "0")
    with caplog.at_level(logging.INFO, logger="dq.kernels.cpu_kernels"):
        assert cpu_kernels.library.__wrapped__() is None
    assert f"{cpu_kernels.ENV_VAR}=0" in caplog.text


def test_built_once_per_machine_into_the_cache(monkeypatch, tmp_path):
    """A fresh cache directory gets one library, named by the source, flags and CPU, and a second build reuses it."""
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    assert cpu_kernels.library.__wrapped__() is not None
    built = list((tmp_path / "cpu-kernels").iterdir())
    assert len(built) == 1 and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns
    assert cpu_kernels.library.__wrapped__() is not None
    assert list((tmp_path / "cpu-kernels").iterdir()) == built and built[0].stat().st_mtime_ns == stamp


def test_a_failed_build_falls_back_to_torch_ops(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("DQ_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.INFO, logger="dq.kernels.cpu_kernels"):
        assert cpu_kernels.library.__wrapped__() is None
    assert "unavailable" in caplog.text
    assert not list((tmp_path / "cpu-kernels").iterdir())  # no half-written library left behind
