"""Round-to-nearest: min-max weight scales (set when the layers are swapped) and dynamic activations; no data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from dq.calib.base import Calibrator, CalibratorConfig, register_calibrator
from dq.errors import DQError
from dq.nn.base import QuantLayerMixin
from dq.nn.select import LayerSelection

if TYPE_CHECKING:
    from dq.calib.data import CalibData
    from dq.recipes import Recipe


@dataclass(frozen=True)
class RTNConfig(CalibratorConfig):
    """Data-free quantization: nothing to set beyond the scales computed at swap time."""

    method: ClassVar[str] = "rtn"


@register_calibrator(RTNConfig)
class RTNCalibrator(Calibrator[RTNConfig]):
    def plan(self, denoiser: nn.Module, selection: LayerSelection, recipe: Recipe) -> None:
        if recipe.act is not None and not recipe.act.dynamic:
            raise DQError(
                f"recipe {recipe.name!r} has static activation scales but method 'rtn' collects no data; "
                "use dynamic ('token') activations or a calibrating method."
            )

    def calibrate(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Recipe, data: CalibData | None) -> None:
        """Nothing to do: weight scales were set at swap time and activations are quantized per call."""
