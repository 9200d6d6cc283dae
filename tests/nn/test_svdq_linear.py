"""SVDQLinear: the decomposition is exact in FP, deploy == simulate, shift folding, save/reload bit-identical."""

import dataclasses

import pytest
import torch
from torch import nn

import dq
from dq.calib.state import quant_state
from dq.errors import DQError
from dq.nn import LayerPlan, SVDQLinear, plan_of, quant_layers
from dq.quant import PerGroup, PerToken, QuantSpec
from dq.recipes import load_recipe
from tiny_pipelines import build, run

SPECS = {
    "w4a4": (QuantSpec("int4", PerGroup(64)), QuantSpec("int4", PerToken(64))),
    "nvfp4": (QuantSpec("fp4_e2m1", PerGroup(16), scale_format="fp8_e4m3"), QuantSpec("fp4_e2m1", PerToken(16), scale_format="fp8_e4m3")),
    "w4a8": (QuantSpec("int4", PerGroup(64)), QuantSpec("int8", PerToken())),
}


def layer_and_input(seed=0, d=128, out=96):
    torch.manual_seed(seed)
    lin = nn.Linear(d, out)
    x = torch.randn(3, 5, d)
    x[..., 9] *= 20
    return lin, x


def test_unquantized_decomposition_is_the_float_layer():
    lin, x = layer_and_input()
    layer = SVDQLinear.from_float(lin, *SPECS["w4a4"], rank=16)
    smooth = torch.rand(128) + 0.5
    from dq.quant.lowrank import low_rank

    lr = low_rank(lin.weight.detach() * smooth.half().float(), 16)
    layer.set_decomposition(smooth, lr.up, lr.down, lin.weight.detach())
    with quant_state(layer, weights=False, acts=False), torch.no_grad():
        # The 16-bit branch sees x in float16: agreement to float16 precision.
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-2, atol=5e-3)
    torch.testing.assert_close(layer.float_weight(), lin.weight.detach(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_deploy_matches_simulate(name):
    lin, x = layer_and_input()
    layer = SVDQLinear.from_float(lin, *SPECS[name], rank=8)
    with torch.no_grad():
        sim = layer(x)
        layer.deploy()
        dep = layer(x)
    assert layer.deployed and "weight" not in layer._parameters
    assert layer.lowrank_down.dtype == torch.float16 and layer.lowrank_up.shape == (96, 8)
    torch.testing.assert_close(dep, sim, rtol=1e-2, atol=1e-2)
    # `.weight` of a deployed SVDQ layer is the float weight it approximates (PEFT/diffusers read it).
    assert layer.weight.shape == (96, 128)
    assert float((layer.weight - lin.weight).pow(2).mean() / lin.weight.pow(2).mean()) < 0.05


def test_unsigned_shift_is_folded_into_the_bias():
    torch.manual_seed(0)
    lin = nn.Linear(128, 64)
    x = nn.functional.gelu(torch.randn(4, 128) * 3, approximate="tanh")
    w4, a4 = SPECS["w4a4"]
    shifted = SVDQLinear.from_float(lin, w4, QuantSpec("uint4", PerToken(64)), rank=8, act_shift=0.171875)
    plain = SVDQLinear.from_float(lin, w4, a4, rank=8)
    with torch.no_grad():
        # Quantizers off: the shift cancels exactly through the folded bias.
        with quant_state(shifted, weights=False, acts=False):
            torch.testing.assert_close(shifted(x), lin(x), rtol=1e-3, atol=1e-3)
        ref = lin(x)
        err = lambda y: float((y - ref).pow(2).mean())
        sim = shifted(x)
        assert err(sim) < err(plain(x))  # unsigned codes spend no level on negatives
        shifted.deploy()
        torch.testing.assert_close(shifted(x), sim, rtol=1e-2, atol=1e-2)


def test_bad_options():
    lin = nn.Linear(32, 16)
    with pytest.raises(DQError, match="rank 17 exceeds the layer size"):
        SVDQLinear.from_float(lin, *SPECS["w4a4"], rank=17)
    with pytest.raises(DQError, match="branch_dtype"):
        SVDQLinear.wrap(lin, *SPECS["w4a4"], rank=4, branch_dtype="int8")


def test_plan_roundtrip():
    lin, _ = layer_and_input()
    layer = SVDQLinear.from_float(lin, *SPECS["w4a4"], rank=8, act_shift=0.0)
    plan = plan_of(layer)
    assert plan.kind == "svdq_linear" and plan.options["rank"] == 8
    assert LayerPlan.from_dict(plan.to_dict()) == plan


def test_save_reload_bit_identical(tmp_path):
    pipe, kw = build("pixart")
    recipe = dataclasses.replace(load_recipe("svdquant-w4a4"), options={"rank": 8, "num_grids": 3, "act_shift": True})
    from dq import CalibConfig

    cfg = CalibConfig(prompts=["p"], steps=2, samples=1, batch_size=1, pipeline_kwargs=dict(kw))
    dq.quantize(pipe, recipe, calib=cfg)
    layers = dict(quant_layers(pipe.transformer))
    assert any(isinstance(l, SVDQLinear) and l.act_shift for l in layers.values())
    out = run(pipe, kw)
    pipe.transformer.save_pretrained(tmp_path / "transformer")
    from diffusers import PixArtTransformer2DModel

    # Plain diffusers loading after `import dq` (no dtype: dq's buffers load exactly as stored).
    again, _ = build("pixart")
    again.transformer = PixArtTransformer2DModel.from_pretrained(tmp_path / "transformer")
    reloaded = dict(quant_layers(again.transformer))
    assert {n: type(l) for n, l in reloaded.items()} == {n: type(l) for n, l in layers.items()}
    for name, layer in layers.items():
        for key, value in layer.state_dict().items():
            assert torch.equal(reloaded[name].state_dict()[key], value), f"{name}.{key}"
    assert torch.equal(run(again, kw), out)
