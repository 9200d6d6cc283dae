"""Calibrators: each sets the quantizers of swapped (simulate-mode) layers before deployment.

A calibrator is a callable `(denoiser, layers, recipe, context) -> None` registered under the recipe's
`method` name. `layers` maps module names to quantized layers in simulate mode; `context` carries
what data-driven methods need (the pipeline, the calibration config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from dq.nn.base import QuantLayerMixin
from dq.registry import Registry


@dataclass
class CalibContext:
    """What a calibrator may use besides the model: the pipeline (None at load time), the CalibConfig, and
    the replay of a step cache enabled on the pipeline (dq.cache.CalibrationReplay, None without a cache),
    which makes the collected samples replay cached steps as the cache runs them."""

    pipeline: Any = None
    calib: Any = None
    cache_replay: Any = None


Calibrator = Callable[[nn.Module, dict[str, QuantLayerMixin], Any, CalibContext], None]
CALIBRATORS: Registry[Calibrator] = Registry("calibration method")


@CALIBRATORS.register("rtn")
def calibrate_rtn(denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Any, context: CalibContext) -> None:
    """Round-to-nearest: min-max weight scales (set when the layers were swapped), dynamic activations."""
