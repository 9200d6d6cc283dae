"""The CPU execution path (dq.kernels.reference, dq.kernels.cpu_gemm): FP32 GEMMs instead of float64 or
integer kernels, with the accumulation error bounded against exact arithmetic, and weights kept packed."""

import logging

import pytest
import torch
from torch import nn

from dq.kernels import cpu_gemm, cpu_kernels
from dq.kernels.reference import quantized_linear_reference, release_scratch, scratch_bytes, weight_operand
from dq.nn import LayerPlan, deploy_all, swap_layers
from dq.quant import PerChannel, PerGroup, PerToken, QuantSpec, dynamic_codes, fake_quantize, pack_4bit, quantize, unpack_4bit, weight_scales
from dq.quant.storage import dequantize_stored, encode_codes

U = 2.0**-24


def gamma(n: int) -> float:
    return n * U / (1 - n * U)


def packed_weight(N, K, spec, seed=0):
    """Stored codes and fp16 [N, groups] scales of a random [N, K] weight under `spec` (min-max)."""
    torch.manual_seed(seed)
    w = torch.randn(N, K)
    s, _ = weight_scales(w, spec)
    return encode_codes(quantize(w, spec, s).reshape(N, K), spec.format), s.reshape(N, -1).half()


def int8_layer(N, K, seed=0):
    return packed_weight(N, K, QuantSpec("int8", PerChannel()), seed)


@pytest.mark.parametrize("spec", [QuantSpec("int8", PerChannel()), QuantSpec("int4", PerGroup(64))])
def test_weight_operand_is_the_exact_dequantized_weight(spec):
    """Codes times 16-bit scales need at most 8 + 11 significant bits: the FP32 operand is exact."""
    qw, sw = packed_weight(64, 256, spec)
    with torch.no_grad():
        w = weight_operand(qw, sw, None, spec.format, 256)
    grid = dequantize_stored(qw, torch.ones_like(sw), None, spec.format, 256).double()
    exact = grid * sw.double().repeat_interleave(256 // sw.shape[1], dim=1)
    assert torch.equal(w.double(), exact)


@pytest.mark.parametrize("weight,act", [
    (QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken())),
    (QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64))),
    (QuantSpec("int4", PerGroup(64)), QuantSpec("int8", PerToken())),
    (QuantSpec("int4", PerGroup(64)), None),
])
def test_fp32_accumulation_within_gamma_bound(weight, act):
    """Against exact (float64) arithmetic on the same codes, the error is at most gamma_(K+2) sum |a_k b_k|."""
    N, K = 48, 4096
    qw, sw = packed_weight(N, K, weight, seed=1)
    x, bias = torch.randn(16, K) * 2, torch.randn(N)
    y = quantized_linear_reference(x, qw, sw, None, bias, weight_format=weight.format, in_features=K, act_spec=act, int_gemm=False)
    wd = dequantize_stored(qw, sw, None, weight.format, K).double()
    xd = (x if act is None else fake_quantize(x, act)).double()
    exact = xd @ wd.t() + bias.double()
    bound = gamma(K + 2) * (xd.abs() @ wd.abs().t() + bias.double().abs()) + exact.abs() * U  # + output rounding
    assert ((y.double() - exact).abs() <= bound).all()


def test_integer_and_float_gemm_agree():
    """int_gemm=True (torch._int_mm, exact INT32 sums) and the float path agree within the float path's bound."""
    qw, sw = int8_layer(40, 2048, seed=3)
    x = torch.randn(24, 2048)
    kw = dict(weight_format="int8", in_features=2048, act_spec=QuantSpec("int8", PerToken()))
    y_int = quantized_linear_reference(x, qw, sw, None, None, int_gemm=True, **kw)
    y_float = quantized_linear_reference(x, qw, sw, None, None, int_gemm=False, **kw)
    codes, xs = dynamic_codes(x, kw["act_spec"])
    mag = (codes.abs() @ qw.float().abs().t()) * xs * sw.float().reshape(1, -1)
    # the float path also rounds each fake-quantized activation q * s once (relative u)
    assert ((y_int - y_float).abs() <= gamma(2048 + 4) * mag + 1e-30).all()


def test_unpack_4bit_matches_the_nibble_definition():
    codes = torch.arange(-8, 8).repeat(24).reshape(6, 64)[:, torch.randperm(64)]
    packed = pack_4bit(codes)
    assert torch.equal(unpack_4bit(packed, signed=True), codes.to(torch.int8))
    raw = codes & 0xF
    assert torch.equal(unpack_4bit(pack_4bit(raw), signed=False), raw.to(torch.int8))
    low, high = packed.to(torch.int16) & 0xF, packed.to(torch.int16) >> 4
    assert torch.equal(unpack_4bit(packed, signed=False), torch.stack((low, high), -1).reshape(6, 64).to(torch.int8))


def test_reused_buffers_give_the_fresh_result_and_stay_bounded():
    """Under no_grad the operand lives in reused buffers: same values as a fresh dequantization, packed
    weights untouched, and the buffers hold about one layer's worth (the largest), not one per layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.Linear(256, 384), nn.Linear(384, 128))
    plans = {str(i): LayerPlan("linear", QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64))) for i in range(3)}
    swap_layers(model, plans)
    deploy_all(model)
    packed_before = [layer.qweight.clone() for layer in model]
    release_scratch()
    x = torch.randn(8, 512)
    y_grad = model(x)  # grad enabled: fresh tensors
    with torch.no_grad():
        y = model(x)
        for layer in model:
            w = weight_operand(layer.qweight, layer.weight_scale, None, "int4", layer.in_features)
            fresh = dequantize_stored(layer.qweight, layer.weight_scale, None, "int4", layer.in_features)
            assert torch.equal(w, fresh)
    assert torch.equal(y, y_grad.detach())
    assert all(torch.equal(layer.qweight, p) for layer, p in zip(model, packed_before))
    # The largest weight's FP32 operand and the largest FP32 input; unpacking in torch ops adds INT8 codes and
    # 16-bit lanes per packed weight (the C kernels unpack in registers).
    unpacking = 0 if cpu_kernels.library() is not None else 512 * 256 * (1 + 1)
    assert scratch_bytes() == 512 * 256 * 4 + unpacking + 8 * 512 * 4


def test_gradients_flow_through_a_deployed_layer():
    """With autograd on, the operands are fresh tensors (a reused one would be overwritten before backward):
    the input gradient equals autograd's through fake_quantize and the dequantized weights."""
    torch.manual_seed(0)
    spec = QuantSpec("int8", PerToken())
    model = nn.Sequential(nn.Linear(128, 64), nn.Linear(64, 32))
    swap_layers(model, {str(i): LayerPlan("linear", QuantSpec("int8", PerChannel()), spec) for i in range(2)})
    deploy_all(model)
    x = torch.randn(4, 128, requires_grad=True)
    model(x).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    h = nn.functional.linear(fake_quantize(x_ref, spec), model[0].dequantized_weight(), model[0].bias)
    nn.functional.linear(fake_quantize(h, spec), model[1].dequantized_weight(), model[1].bias).square().sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_a_deployed_w8a8_linear_takes_the_integer_gemm_only_where_it_pays(monkeypatch, fast):
    """Where this CPU's integer GEMM is fast, a deployed W8A8 linear runs torch._int_mm on large inputs (at least
    INT8_GEMM_MIN_ROWS rows and INT8_GEMM_MIN_MACS multiply-adds) and dq's one-call float path on smaller ones;
    where it is slow, never. The integer result agrees with the float form within the float form's bound."""
    monkeypatch.delenv(cpu_gemm.ENV_VAR, raising=False)
    monkeypatch.setattr(cpu_gemm, "int8_gemm_is_fast", lambda: fast)
    calls = []
    int_mm = torch._int_mm
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: calls.append(tuple(a.shape)) or int_mm(a, b))
    spec = QuantSpec("int8", PerToken())
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256, bias=False), nn.Linear(64, 64, bias=False))
    swap_layers(model, {str(i): LayerPlan("linear", QuantSpec("int8", PerChannel()), spec) for i in range(2)})
    deploy_all(model)
    assert cpu_gemm.INT8_GEMM_MIN_ROWS == 256 and 128 * 512 * 256 == cpu_gemm.INT8_GEMM_MIN_MACS
    layer = model[0]
    for rows, pays in ((256, True), (255, False), (4096, True)):
        calls.clear()
        x = torch.randn(rows, 512)
        with torch.no_grad():
            y = layer(x)
        assert calls == ([(rows, 512)] if fast and pays else []), rows
        monkeypatch.setenv(cpu_gemm.ENV_VAR, "0")
        with torch.no_grad():
            y_float = layer(x)
        monkeypatch.delenv(cpu_gemm.ENV_VAR)
        codes, xs = dynamic_codes(x, spec)
        mag = (codes.abs() @ layer.qweight.float().abs().t()) * xs * layer.weight_scale.float().reshape(1, -1)
        assert ((y - y_float).abs() <= gamma(512 + 4) * mag + 1e-30).all()
    calls.clear()
    with torch.no_grad():
        model[1](torch.randn(2048, 64))  # many rows, but 2^24 multiply-adds are not reached (2^23)
    assert calls == []


def test_int8_gemm_choice_is_forced_by_env_and_logged(monkeypatch, caplog):
    for value, fast in (("0", False), ("1", True)):
        cpu_gemm.int8_gemm_is_fast.cache_clear()
        monkeypatch.setenv(cpu_gemm.ENV_VAR, value)
        with caplog.at_level(logging.INFO, logger="dq.kernels.cpu_gemm"):
            assert cpu_gemm.int8_gemm_is_fast() is fast
        assert f"{cpu_gemm.ENV_VAR}={value}" in caplog.text
    cpu_gemm.int8_gemm_is_fast.cache_clear()
    monkeypatch.delenv(cpu_gemm.ENV_VAR)
    with caplog.at_level(logging.INFO, logger="dq.kernels.cpu_gemm"):
        cpu_gemm.int8_gemm_is_fast()
        cpu_gemm.int8_gemm_is_fast()
    assert caplog.text.count("dq CPU path") == 3  # once per decision: the second call is cached
    cpu_gemm.int8_gemm_is_fast.cache_clear()


def test_probe_measures_both_gemms():
    t_int, t_float = cpu_gemm.probe_int8_gemm(m=32, k=64, n=32)
    assert t_int > 0 and t_float > 0


@pytest.mark.parametrize("spec", [QuantSpec("int8", PerToken()), QuantSpec("int4", PerToken(64)), QuantSpec("int4", PerToken())])
def test_dynamic_symmetric_codes_need_no_clamp(spec):
    """The dynamic path skips the clamp for signed symmetric formats: every code already lies in range, also
    for rows of zeros, subnormals, exact maxima, huge values and values a hair below a rounding tie."""
    qmax = spec.fmt.qmax
    tie = torch.full((1, 128), (qmax - 0.5) * (1 - 2**-23))
    rows = [torch.randn(4, 128), torch.zeros(1, 128), torch.full((1, 128), 1e-40), torch.randn(1, 128) * 1e30,
            -torch.rand(1, 128), tie, torch.cat([tie[:, :127], torch.full((1, 1), float(qmax))], 1)]
    x = torch.cat(rows)
    q = fake_quantize(x, spec)
    g = spec.granularity.grouped(x)
    s = torch.maximum(-g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)).div(qmax).clamp(min=torch.finfo(torch.float32).tiny)
    assert torch.equal(q, (torch.clamp(torch.round(g / s), -qmax - 1, qmax) * s).reshape(x.shape))
    if spec.granularity == PerToken():
        codes, _ = dynamic_codes(x, spec)
        assert torch.equal(codes, torch.clamp(torch.round(g / s), -qmax - 1, qmax).reshape(x.shape))


@pytest.mark.parametrize("weight,act", [
    (QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken())),
    (QuantSpec("int4", PerGroup(64)), None),
])
def test_weight_tiles_match_the_whole_weight(weight, act):
    """Tiles of output channels (the CPU path for small inputs) give the untiled product within the FP32 bound."""
    N, K = 200, 256
    qw, sw = packed_weight(N, K, weight, seed=2)
    x, b = torch.randn(6, K), torch.randn(N)
    kw = dict(weight_format=weight.format, in_features=K, act_spec=act, int_gemm=False)
    with torch.no_grad():
        whole = quantized_linear_reference(x, qw, sw, None, b, tile_rows=0, **kw)
        tiled = quantized_linear_reference(x, qw, sw, None, b, tile_rows=48, **kw)  # 48 does not divide 200
    wd = dequantize_stored(qw, sw, None, weight.format, K)
    xd = x if act is None else fake_quantize(x, act)
    assert ((tiled - whole).abs() <= 2 * gamma(K + 3) * (xd.abs() @ wd.abs().t() + b.abs())).all()


def test_conv_weight_tiles_match_the_whole_weight():
    """A conv with a small input runs in output-channel tiles (weight_tile_rows decides), the same conv."""
    from dq.kernels.reference import weight_tile_rows

    torch.manual_seed(3)
    conv = nn.Sequential(nn.Conv2d(128, 1920, 3, padding=1))
    swap_layers(conv, {"0": LayerPlan("conv2d", QuantSpec("int4", PerGroup(64)), QuantSpec("int8", PerToken()))})
    deploy_all(conv)
    x = torch.randn(2, 128, 4, 4)
    assert 0 < weight_tile_rows(x.numel() * 4, 1920, 128 * 9) < 1920
    with torch.no_grad():
        tiled = conv(x)
    whole = conv(x).detach()  # autograd on: one untiled weight
    assert torch.allclose(tiled, whole, rtol=1e-5, atol=1e-4)
