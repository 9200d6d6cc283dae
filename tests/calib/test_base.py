"""Calibration methods as typed configs: one loader for recipe options, dispatch on the config's type."""

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

import dq
from dq.calib import METHODS, Calibrator, CalibratorConfig, Sampling, calibrator_for, load_config, register_calibrator
from dq.calib.svdquant import SmoothQuantConfig, SVDQuantCalibrator, Smoothing, SVDQuantConfig
from dq.quant.lowrank import SVDMethod
from dq.recipes import bundled_recipe_names, load_recipe


def test_options_become_typed_config():
    config = load_config("svdquant", {"rank": 16, "svd": "exact", "alpha": 1, "gptq": True})
    assert isinstance(config, SVDQuantConfig)
    assert config.svd is SVDMethod.EXACT and config.alpha == 1.0 and isinstance(config.alpha, float) and config.gptq
    # subclasses keep their own defaults: SmoothQuant is SVDQuant without a branch, alpha 0.5
    smooth = load_config("smoothquant", {})
    assert isinstance(smooth, SmoothQuantConfig) and smooth.rank == 0 and smooth.smooth is Smoothing.FIXED


@pytest.mark.parametrize("options,message", [
    ({"rnak": 3}, r"unknown option\(s\) \['rnak'\]; allowed: \[.*'rank'"),
    ({"svd": "qr"}, r"option svd='qr'; allowed: \['randomized', 'exact'\]"),
    ({"rank": "32"}, r"option rank must be int, got str"),
    ({"gptq": 1}, r"option gptq must be bool, got int"),
    ({"alpha": 2.0}, r"option alpha=2.0 must lie in \[0, 1\]"),
    ({"rank": -1}, r"option rank must be a non-negative integer"),
])
def test_bad_options_name_field_and_allowed_values(options, message):
    with pytest.raises(dq.DQError, match=r"recipe 'x': method 'svdquant': " + message):
        load_config("svdquant", options, origin="recipe 'x'")


def test_unknown_method_lists_registered_ones():
    with pytest.raises(dq.DQError, match=r"unknown calibration method 'brecq'; registered: .*qdiffusion.*svdquant"):
        load_config("brecq", {})


def test_needs_data_is_the_methods():
    for name in bundled_recipe_names():
        recipe = load_recipe(name)
        assert recipe.needs_data == (recipe.method != "rtn"), name
        assert recipe.needs_data == (recipe.calibration.sampling is not None)
    assert load_recipe("w8a8-ptq4dm").calibration.sampling is Sampling.NDTC
    assert load_recipe("w4a8-tfmq").calibration.sampling is Sampling.ALL


def test_dispatch_is_on_the_config_type():
    assert isinstance(calibrator_for(SmoothQuantConfig()), SVDQuantCalibrator)

    @dataclass(frozen=True)
    class Unregistered(CalibratorConfig):
        method: ClassVar[str] = "unregistered"

    with pytest.raises(dq.DQError, match="no calibrator is registered for Unregistered"):
        calibrator_for(Unregistered())


def test_a_new_method_is_one_config_and_one_calibrator():
    """What adding a method takes: a config, a registered Calibrator; recipes then name it."""

    @dataclass(frozen=True)
    class HalveConfig(CalibratorConfig):
        method: ClassVar[str] = "test-halve-scales"
        factor: float = 0.5

    @register_calibrator(HalveConfig)
    class HalveCalibrator(Calibrator[HalveConfig]):
        def calibrate(self, denoiser, layers, recipe, data):
            for layer in layers.values():
                layer.weight_quantizer.scale.mul_(self.config.factor)

    try:
        recipe = dataclasses.replace(load_recipe("w8a8"), name="halve", method="test-halve-scales", options={"factor": 0.25})
        assert isinstance(recipe.calibration, HalveConfig) and recipe.calibration.factor == 0.25 and not recipe.needs_data
        model = nn.Sequential(nn.Linear(8, 8))
        model.config = {}
        baseline = nn.Sequential(nn.Linear(8, 8))
        baseline.load_state_dict(model.state_dict())
        baseline.config = {}
        dq.calib.quantize_model(baseline, load_recipe("w8a8"))
        dq.calib.quantize_model(model, recipe)
        assert torch.allclose(model[0].weight_scale.float() * 4, baseline[0].weight_scale.float(), rtol=1e-3)
    finally:
        METHODS._members.pop("test-halve-scales")
