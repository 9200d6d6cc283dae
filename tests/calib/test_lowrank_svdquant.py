"""The svdquant / smoothquant calibrators: quality ordering on an outlier layer, planning, bad input."""

import dataclasses

import pytest
import torch
from torch import nn

import dq
from dq.calib.svdquant import SVDQuantConfig, Smoothing, calibrate_unit
from dq.quant.lowrank import SVDMethod
from dq.errors import DQError
from dq.nn import QuantLinear, SVDQLinear
from dq.quant import PerGroup, PerToken, QuantSpec
from dq.recipes import load_recipe
from tiny_pipelines import build

W4 = QuantSpec("int4", PerGroup(64))
A4 = QuantSpec("int4", PerToken(64))


def outlier_layer(seed=0, d=256, out=256, n=1024):
    """A linear layer whose inputs have a few outlier channels (as diffusion activations do)."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(d, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, d, generator=g) / d**0.5)
        lin.weight[:, :4] *= 4  # some weight columns are large too
    x = torch.randn(n, d, generator=g)
    x[:, [7, d // 2 + 3, d - 9]] *= 30
    return lin, x


def rel_err(layer, lin, x):
    with torch.no_grad():
        ref = lin(x)
        return float((layer(x) - ref).pow(2).mean() / ref.pow(2).mean())


def test_svdquant_beats_smoothquant_beats_rtn_on_outlier_layer():
    lin, x = outlier_layer()
    calib, test = x[:768], x[768:]
    rtn = QuantLinear.from_float(lin, W4, A4)
    smooth = SVDQLinear.from_float(lin, W4, A4, rank=0)
    calibrate_unit([smooth], calib, calib.abs().amax(0), SVDQuantConfig(rank=0, smooth=Smoothing.FIXED, alpha=0.5))
    svdq = SVDQLinear.from_float(lin, W4, A4, rank=16)
    res = calibrate_unit([svdq], calib, calib.abs().amax(0), SVDQuantConfig(rank=16, num_grids=10))
    e_rtn, e_smooth, e_svdq = rel_err(rtn, lin, test), rel_err(smooth, lin, test), rel_err(svdq, lin, test)
    assert e_svdq < 0.7 * e_smooth < 0.7 * e_rtn, (e_rtn, e_smooth, e_svdq)
    assert 0 <= res.alpha <= 1 and res.error == pytest.approx(min(res.errors.values()), rel=0.5)
    # The search never does worse (on the calibration tokens) than no smoothing.
    assert min(res.errors.values()) <= res.errors[(0.0, 0.0)]
    # Deployment keeps the calibrated function.
    sim = svdq(test)
    svdq.deploy()
    torch.testing.assert_close(svdq(test), sim, rtol=2e-2, atol=2e-2)


def test_gptq_and_exact_svd_options():
    lin, x = outlier_layer(seed=1, d=128, out=128, n=512)
    base = SVDQLinear.from_float(lin, W4, A4, rank=8)
    plain = calibrate_unit([base], x, x.abs().amax(0), SVDQuantConfig(rank=8, num_grids=5, svd=SVDMethod.EXACT))
    gq = SVDQLinear.from_float(lin, W4, A4, rank=8)
    with_gptq = calibrate_unit([gq], x, x.abs().amax(0), SVDQuantConfig(rank=8, num_grids=5, svd=SVDMethod.EXACT, gptq=True))
    assert with_gptq.error < plain.error
    # The GPTQ residual is on the grid of the layer's scales: packing it changes nothing.
    sim = gq(x)
    gq.deploy()
    torch.testing.assert_close(gq(x), sim, rtol=2e-2, atol=2e-2)


def test_shared_lowrank_units():
    lin, x = outlier_layer(seed=2, d=128, out=128, n=256)
    layers = [SVDQLinear.from_float(nn.Linear(128, 64), W4, A4, rank=8) for _ in range(3)]
    res = calibrate_unit(layers, x, x.abs().amax(0), SVDQuantConfig(rank=8, num_grids=4, shared_lowrank=True))
    assert all(torch.equal(l.lowrank_down, layers[0].lowrank_down) for l in layers)
    assert all(torch.equal(l.smooth, layers[0].smooth) for l in layers)
    assert res.error < 0.05


def test_rank_too_large_names_module_and_leaves_model_unchanged():
    pipe, kw = build("pixart")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    recipe = dataclasses.replace(load_recipe("svdquant-w4a4"), options={"rank": 100})
    with pytest.raises(DQError, match=r"rank 100 exceeds layer 'transformer_blocks\.0\.") as e:
        dq.quantize(pipe, recipe, calib=[((), {})])
    assert "not changed" in str(e.value)
    after = pipe.transformer.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, QuantLinear) for m in pipe.transformer.modules())


def test_planner_adaln_weight_only_and_gelu_shift():
    from dq.calib import calibrator_for
    from dq.nn.select import select_layers

    pipe, _ = build("pixart")
    t = pipe.transformer
    recipe = dataclasses.replace(load_recipe("svdquant-w4a4"), options={"rank": 8, "act_shift": True})
    sel = select_layers(t, recipe.weight, recipe.act, recipe.layers, recipe.skip, recipe.only)
    calibrator_for(recipe.calibration).plan(t, sel, recipe)
    kinds = {p.kind for p in sel.plans.values()}
    assert kinds == {"svdq_linear", "linear"}
    adaln = sel.plans["adaln_single.linear"]
    assert adaln.kind == "linear" and adaln.act is None
    fc2 = sel.plans["transformer_blocks.0.ff.net.2"]
    assert fc2.act.format == "uint4" and fc2.options["act_shift"] > 0.17
    q = sel.plans["transformer_blocks.0.attn1.to_q"]
    assert q.options == {"rank": 8, "branch_dtype": "float16", "act_shift": 0.0} and q.act.format == "int4"
