"""TFMQ-DM: temporal information block detection and TIAR on tiny UNet and PixArt models."""

import dataclasses

import pytest
import torch

from dq.calib.qdiffusion import init_weight_scales
from dq.calib.tfmq import TFMQConfig, find_temporal_block, plan_tib_layers, tiar
from dq.nn import LayerPlan, swap_layers
from dq.nn.select import LayerSelection
from dq.errors import DQError
from dq.recipes import load_recipe
from tiny_pipelines import build


def test_unet_tib_is_time_embedding_and_every_time_emb_proj():
    unet = build("sd")[0].unet
    tib = find_temporal_block(unet)
    projs = [n for n, _ in unet.named_modules() if n.endswith("time_emb_proj")]
    assert tib.keep_float == ["time_embedding.linear_1"]
    assert sorted(tib.layers) == sorted(["time_embedding.linear_2"] + projs)
    outs = tib.outputs(torch.tensor([1.0, 500.0]))
    assert len(outs) == 1 + len(projs) and outs[0].shape[0] == 2


def test_pixart_tib_is_adaln_single():
    transformer = build("pixart")[0].transformer
    tib = find_temporal_block(transformer)
    assert tib.keep_float == ["adaln_single.emb.timestep_embedder.linear_1"]
    assert sorted(tib.layers) == ["adaln_single.emb.timestep_embedder.linear_2", "adaln_single.linear"]


def test_no_tib_is_a_clear_error():
    with pytest.raises(DQError, match="no temporal information block"):
        find_temporal_block(build("flux")[0].transformer)


@pytest.mark.parametrize("family", ["sd", "pixart"])
def test_tiar_lowers_tib_output_error(family):
    pipe = build(family)[0]
    model = getattr(pipe, "unet", None) or pipe.transformer
    recipe = load_recipe("w4a8-tfmq")
    recipe = dataclasses.replace(recipe, weight=dataclasses.replace(recipe.weight, format="int3"))
    tib = find_temporal_block(model)
    selection = LayerSelection()
    added = plan_tib_layers(model, selection, tib, recipe)
    if family == "sd":
        assert "time_embedding.linear_2" in added
    # time_emb_proj layers the walker would have planned already: plan them here too for the test
    rest = {n: LayerPlan("linear", recipe.weight, recipe.act) for n in tib.layers if n not in selection.plans}
    layers = swap_layers(model, {**selection.plans, **rest})
    init_weight_scales(layers, "lp")
    for p in model.parameters():
        p.requires_grad_(False)
    ratio = tiar(model, layers, tib, [float(t) for t in range(1, 1000, 50)], TFMQConfig(lr=1e-2), iters=150)
    assert ratio < 0.9
