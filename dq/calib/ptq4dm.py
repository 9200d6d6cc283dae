"""PTQ4DM: normally-distributed timestep calibration (NDTC) with MSE-searched scales.

Following PTQ4DM's released code (see the anchors): each calibration sample is the denoiser input at
one timestep drawn from N(mu * T, sigma * T) (mu = sigma = 0.4 as released), labelled with the step
the FP sampler actually ran (the released code mirrors the labels; dq does not). Weights get
per-channel scales and activations per-tensor static scales, both by the MSE (p=2) search of the
clipping range (QDrop's 'mse' scale method, the base PTQ4DM builds on). No reconstruction: the cost
is one FP sampling run per calibration prompt plus one replay of the samples.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dq.calib.collect import calibration_data
from dq.calib.observers import OBSERVERS
from dq.calib.qdiffusion import init_weight_scales
from dq.calib.registry import CALIBRATORS, CalibContext
from dq.calib.timestep import calibrate_activations
from dq.errors import DQError

OPTIONS = {"weight_observer": "mse", "act_observer": "mse", "timestep_groups": 1, "batch_size": 8}


def method_options(recipe: Any, defaults: dict) -> dict:
    """recipe.options over `defaults`; unknown keys and unknown observer names are DQErrors."""
    opts = dict(recipe.options or {})
    unknown = sorted(set(opts) - set(defaults))
    if unknown:
        raise DQError(f"recipe {recipe.name!r}: unknown option(s) {unknown} for method {recipe.method!r}; allowed: {sorted(defaults)}.")
    merged = {**defaults, **opts}
    for key in ("weight_observer", "act_observer"):
        if key in merged:
            OBSERVERS.get(merged[key])
    if int(merged.get("timestep_groups", 1)) < 1:
        raise DQError(f"recipe {recipe.name!r}: timestep_groups must be >= 1.")
    return merged


@CALIBRATORS.register("ptq4dm")
def calibrate_ptq4dm(denoiser: nn.Module, layers: dict[str, nn.Module], recipe: Any, context: CalibContext) -> None:
    """PTQ4DM (Shang et al., CVPR 2023): NDTC data, MSE-searched weight and activation scales."""
    opts = method_options(recipe, OPTIONS)
    data = calibration_data(context, recipe, sampling="ndtc")
    init_weight_scales(layers, opts["weight_observer"])
    calibrate_activations(denoiser, layers, data, opts["act_observer"], int(opts["timestep_groups"]), int(opts["batch_size"]))
