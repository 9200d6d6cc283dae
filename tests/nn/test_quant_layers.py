"""QuantLinear / QuantConv2d: stay torch layers, deploy packs real bytes, deploy computes what simulate does."""

import pytest
import torch
from torch import nn

from dq.errors import DQError
from dq.nn import LayerPlan, QuantConv2d, QuantLinear, swap_layers
from dq.quant import PerChannel, PerGroup, PerToken, QuantSpec
from dq.quant.storage import decode_codes, encode_codes

W_SPECS = {
    "int8-channel": QuantSpec("int8", PerChannel()),
    "int4-g32": QuantSpec("int4", PerGroup(32)),
    "int4-g32-asym": QuantSpec("int4", PerGroup(32), symmetric=False),
    "int2-g32": QuantSpec("int2", PerGroup(32)),
    "fp8-channel": QuantSpec("fp8_e4m3", PerChannel()),
    "nvfp4-g16": QuantSpec("fp4_e2m1", PerGroup(16), scale_format="fp8_e4m3"),
}
A_SPECS = {"none": None, "int8-token": QuantSpec("int8", PerToken()), "int4-token-g32": QuantSpec("int4", PerToken(32))}


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean()))


@pytest.mark.parametrize("fmt", ["int2", "int4", "uint4", "int6", "int8", "uint8", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1"])
def test_storage_round_trip(fmt):
    from dq.quant import get_format

    grid = get_format(fmt).round(torch.randn(8, 64) * 4)
    assert torch.equal(decode_codes(encode_codes(grid, fmt), fmt), grid)


@pytest.mark.parametrize("w", W_SPECS, ids=str)
@pytest.mark.parametrize("a", A_SPECS, ids=str)
def test_linear_deploy_matches_simulate(w, a):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    x = torch.randn(3, 5, 128)
    layer = QuantLinear.from_float(linear, W_SPECS[w], A_SPECS[a])
    assert isinstance(layer, nn.Linear)
    simulated = layer(x)
    layer.deploy()
    deployed = layer(x)
    assert deployed.shape == (3, 5, 48)
    # Deployed scales are fp16 and INT8 x INT8 runs as an integer GEMM: same function up to rounding.
    assert sqnr(simulated, deployed) > 35
    assert sqnr(linear(x), deployed) > {"int2-g32": 3, "int4-g32": 15, "int4-g32-asym": 15, "nvfp4-g16": 12}.get(w, 25) - (8 if a == "int4-token-g32" else 0)


def test_deploy_stores_packed_bytes_and_keeps_weight_view():
    linear = nn.Linear(256, 64, bias=False)
    layer = QuantLinear.from_float(linear, QuantSpec("int4", PerGroup(64)), None)
    before = layer.weight_nbytes()
    layer.deploy()
    sd = layer.state_dict()
    assert set(sd) == {"qweight", "weight_scale"}
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (64, 128)
    assert layer.weight_nbytes() / before == pytest.approx((0.5 + 2 / 64) / 4)
    # PEFT and diffusers read .weight for shape/dtype/device: it answers with the dequantized weight.
    assert layer.weight.shape == (64, 256) and layer.weight.dtype == torch.float32
    with pytest.raises(DQError, match="deployed"):
        layer.weight = torch.zeros(64, 256)


def test_conv_deploy_matches_simulate():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 16, 3, padding=1)
    x = torch.randn(2, 32, 8, 8)
    layer = QuantConv2d.from_float(conv, QuantSpec("int8", PerChannel()), QuantSpec("int8", PerToken()))
    assert isinstance(layer, nn.Conv2d)
    simulated = layer(x)
    layer.deploy()
    assert sqnr(simulated, layer(x)) > 35
    assert sqnr(conv(x), layer(x)) > 25


def test_conv_activation_tokens_are_pixels():
    """Per-token activation quantization of a conv input groups over channels, one scale per pixel."""
    conv = nn.Conv2d(4, 4, 1, bias=False)
    layer = QuantConv2d.from_float(conv, QuantSpec("int8", PerChannel()), QuantSpec("int2", PerToken()))
    x = torch.zeros(1, 4, 2, 2)
    x[0, :, 0, 0] = torch.tensor([100.0, 0.0, 0.0, 0.0])  # a huge pixel must not wipe out the others
    x[0, :, 1, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    q = layer._quantize_input(x)
    assert q[0, 1, 1, 1] == pytest.approx(1.0)


def test_swap_layers_refuses_double_quantization():
    model = nn.Sequential(nn.Linear(64, 64))
    plan = {"0": LayerPlan("linear", QuantSpec("int8", PerChannel()), None)}
    swap_layers(model, plan)
    with pytest.raises(DQError, match="already quantized"):
        swap_layers(model, plan)


def test_layer_plan_round_trips_through_dict():
    plan = LayerPlan("linear", W_SPECS["nvfp4-g16"], A_SPECS["int4-token-g32"], {"rank": 32})
    assert LayerPlan.from_dict(plan.to_dict()) == plan
    with pytest.raises(DQError, match="unknown layer kind"):
        LayerPlan.from_dict({**plan.to_dict(), "kind": "lstm"})
