"""The four bundled calibrated recipes end to end on the tiny SD pipeline: quantize, run, save, reload."""

import dataclasses

import pytest
import torch

import dq
from dq.errors import DQError
from dq.recipes import load_recipe
from tiny_pipelines import run

from calib_fixtures import tiny_sd_calib

FAST = {"iters": 4, "act_iters": 2, "tib_iters": 4, "recon_samples": 2, "batch_size": 2}


@pytest.mark.parametrize("name", ["w8a8-ptq4dm", "w4a8-timestep", "w4a8-qdiffusion", "w4a8-tfmq"])
def test_recipe_quantizes_saves_and_reloads(name, tmp_path):
    from diffusers import UNet2DConditionModel

    recipe = load_recipe(name)
    assert recipe.needs_data and recipe.source and recipe.description
    options = {k: v for k, v in FAST.items() if k in recipe.options}
    recipe = dataclasses.replace(recipe, options={**recipe.options, **options})
    if name in ("w4a8-qdiffusion", "w4a8-tfmq"):  # reconstruction replays per unit: one decoder block keeps it fast
        recipe = dataclasses.replace(recipe, only=("up_blocks.1.*", "time_embedding.*"))
    pipe, cfg = tiny_sd_calib(steps=2, samples=2, sampling={"w8a8-ptq4dm": "ndtc", "w4a8-qdiffusion": "uniform"}.get(name, "all"))
    kwargs = dict(cfg.pipeline_kwargs, num_inference_steps=3, output_type="latent")  # 3 steps: unseen timesteps
    ref = run(pipe, kwargs)
    report = dq.quantize(pipe, recipe, calib=cfg)
    assert report.quantized
    out = run(pipe, kwargs)
    assert torch.isfinite(out).all()
    assert float((out - ref).norm() / ref.norm()) < 0.5
    kinds = {type(m).__name__ for m in pipe.unet.modules()}
    if name in ("w4a8-qdiffusion", "w4a8-tfmq"):
        assert "QuantSplitConv2d" in kinds
    if name == "w4a8-timestep":
        assert pipe.unet.conv_in is not None and any(
            getattr(m, "timestep_ranges", None) is not None and m.groups == 2 for m in pipe.unet.modules()
        )
    if name == "w4a8-tfmq":
        assert "time_embedding.linear_2" in report.quantized
        assert pipe.unet.time_embedding.linear_2.act_quantizer.groups == 2  # FSC: one set per step
    pipe.unet.save_pretrained(tmp_path)
    pipe.unet = UNet2DConditionModel.from_pretrained(tmp_path)
    assert torch.equal(run(pipe, kwargs), out)


def test_unknown_option_and_wrong_calib_type_are_errors():
    pipe, cfg = tiny_sd_calib(steps=2, samples=1)
    with pytest.raises(DQError, match=r"unknown option\(s\) \['observer'\]"):
        dataclasses.replace(load_recipe("w8a8-ptq4dm"), options={"observer": "mse"})
    with pytest.raises(DQError, match=r"unknown observer 'l3'; registered: "):
        dataclasses.replace(load_recipe("w8a8-ptq4dm"), options={"act_observer": "l3"})
    with pytest.raises(DQError, match="CalibConfig"):
        dq.quantize(pipe, "w4a8-timestep", calib={"prompts": ["x"]})
