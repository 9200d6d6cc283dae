"""AdaRound: learned rounding lowers block-output error, and deploy packs the learned codes; LSQ step sizes
lower it from the observer's."""

import random

import pytest
import torch
from torch import nn

from dq.calib.adaround import AdaRound, attach_adaround
from dq.calib.capture import Captured
from dq.calib.data import CalibData, CalibSample
from dq.calib.qdiffusion import QDiffusionConfig, _adaround_unit, frozen_parameters, learn_act_scales
from dq.calib.state import quant_state
from dq.calib.timestep import calibrate_activations
from dq.errors import DQError
from dq.nn import LayerPlan, QuantLinear, swap_layers
from dq.quant import PerChannel, PerTensor, QuantSpec


def _block():
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    spec = QuantSpec("int3", PerChannel(), symmetric=False)
    layers = swap_layers(block, {"0": LayerPlan("linear", spec, None), "2": LayerPlan("linear", spec, None)})
    return block, layers


def test_adaround_lowers_block_output_error_and_deploy_packs_it():
    block, layers = _block()
    x = torch.randn(256, 32)
    with torch.no_grad():
        for q in layers.values():
            q.weight_quantizer.bypass = True
        target = block(x)
        for q in layers.values():
            q.weight_quantizer.bypass = False
        nearest = block(x)
    batches = [Captured((xb,), {}, [tb], torch.zeros(len(xb))) for xb, tb in zip(x.split(64), target.split(64))]
    for p in block.parameters():
        p.requires_grad_(False)
    ratio = _adaround_unit(block, layers, batches, QDiffusionConfig(iters=300, lr=1e-2), random.Random(0), torch.device("cpu"), grouped=False)
    with torch.no_grad():
        learned = block(x)
    err_nearest = float((nearest - target).pow(2).mean())
    err_learned = float((learned - target).pow(2).mean())
    assert ratio < 0.9 and err_learned < 0.9 * err_nearest
    # deploy packs the learned (hard) rounding: same weights as simulate mode, up to fp16 scale storage
    simulated = {n: l.fake_quantized_weight().detach().clone() for n, l in layers.items()}
    assert "rounding" not in dict(block.named_modules()) and not any("alpha" in k for k in block.state_dict())
    for name, layer in layers.items():
        layer.deploy()
        assert torch.allclose(layer.weight, simulated[name], rtol=2e-3, atol=1e-6)


def test_adaround_codes_stay_on_grid_and_move_at_most_one_step():
    block, layers = _block()
    layer = layers["0"]
    (r,) = attach_adaround("0", layer)
    w2d = layer.weight.detach()
    wq = layer.weight_quantizer
    s, z = wq.expanded()
    codes = wq.grid(w2d)
    nearest = torch.clamp(torch.round(w2d / s + z), -4, 3)
    assert bool((codes == codes.round()).all()) and codes.min() >= -4 and codes.max() <= 3
    assert float((codes - nearest).abs().max()) <= 1


def test_adaround_refuses_float_formats_and_unknown_layer_kinds():
    lin = QuantLinear.from_float(nn.Linear(16, 8), QuantSpec("fp8_e4m3", PerChannel()), None)
    with pytest.raises(DQError, match="integer grid"):
        AdaRound(lin.weight.detach(), lin.weight_quantizer)

    class Odd(nn.Module):
        kind = "svdq_linear"

    with pytest.raises(DQError, match="svdq_linear.*Skip it"):
        attach_adaround("blocks.0.attn", Odd())


def test_unknown_recipe_option_is_named():
    import dataclasses

    from dq.recipes import load_recipe

    with pytest.raises(DQError, match=r"method 'qdiffusion': unknown option\(s\) \['iterations'\]; allowed: .*'act_iters'"):
        dataclasses.replace(load_recipe("w4a8-qdiffusion"), options={"iterations": 5})


def test_lsq_step_sizes_lower_the_unit_loss_from_the_observer_scales():
    """Q-Diffusion's LSQ (learn_act_scales) trains the static activation step sizes that an observer set:
    from min-max 4-bit ranges, which clip nothing and round coarsely, it lowers the output error."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
    act = QuantSpec("int4", PerTensor(), symmetric=False)
    layers = swap_layers(block, {n: LayerPlan("linear", QuantSpec("int8", PerChannel()), act) for n in ("0", "2")})
    x = torch.randn(64, 32) * torch.linspace(0.2, 3.0, 32)
    x[0, 0] = 40.0  # one outlier stretches the min-max range
    data = CalibData([CalibSample(0, 500.0, i, (xb.half(),), {}, len(xb)) for i, xb in enumerate(x.split(8))], [500.0])
    calibrate_activations(block, layers, data, "minmax")

    def error() -> float:
        with torch.no_grad():
            with quant_state(block, weights=False, acts=False):
                target = block(x.half().float())
            with quant_state(block, weights=True, acts=True):
                return float((block(x.half().float()) - target).pow(2).mean())

    before = error()
    with frozen_parameters(block):
        learn_act_scales(block, layers, data, QDiffusionConfig(act_iters=60, act_lr=0.05, batch_size=2, recon_samples=8))
    assert error() < 0.7 * before
