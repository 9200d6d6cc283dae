"""PTQ4DM: normally-distributed timestep calibration (NDTC) with MSE-searched scales.

Following PTQ4DM's released code (see the anchors): each calibration sample is the denoiser input at
one timestep drawn from N(mu * T, sigma * T) (mu = sigma = 0.4 as released), labelled with the step
the FP sampler actually ran (the released code mirrors the labels; dq does not). Weights get
per-channel scales and activations per-tensor static scales, both by the MSE (p=2) search of the
clipping range (QDrop's 'mse' scale method, the base PTQ4DM builds on). No reconstruction: the cost
is one FP sampling run per calibration prompt plus one replay of the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from torch import nn

from dq.calib.base import Calibrator, Sampling, register_calibrator
from dq.calib.data import WEIGHTS, CalibData, CalibSample
from dq.calib.qdiffusion import init_weight_scales
from dq.calib.timestep import TimestepConfig, calibrate_activations, check_observer
from dq.nn.base import QuantLayerMixin

if TYPE_CHECKING:
    from dq.recipes import Recipe


@dataclass(frozen=True)
class PTQ4DMConfig(TimestepConfig):
    """PTQ4DM settings: the timestep calibrator's, with PTQ4DM's defaults, plus the weight observer.

    Args:
        weight_observer, act_observer: range observers (dq.calib.observers.OBSERVERS); "mse" as released.
        timestep_groups: static activation scale sets over timestep intervals (1 = PTQ4DM's single set).
        batch_size: calibration samples per replayed denoiser call.
    """

    method: ClassVar[str] = "ptq4dm"
    sampling: ClassVar[Sampling | None] = Sampling.NDTC
    weight_observer: str = "mse"
    act_observer: str = "mse"
    timestep_groups: int = 1

    def validate(self) -> None:
        super().validate()
        check_observer(self.weight_observer)


@register_calibrator(PTQ4DMConfig)
class PTQ4DMCalibrator(Calibrator[PTQ4DMConfig]):
    """PTQ4DM (Shang et al., CVPR 2023): NDTC data, MSE-searched weight and activation scales."""

    streams = (WEIGHTS,)  # ranges observed with the weights quantized and the activations in float

    def calibrate(self, denoiser: nn.Module, layers: dict[str, QuantLayerMixin], recipe: Recipe, data: CalibData | None) -> None:
        c = self.config
        init_weight_scales(layers, c.weight_observer)
        calibrate_activations(denoiser, layers, data, c.act_observer, c.timestep_groups, c.batch_size)

    def replay_groups(self, data: CalibData) -> list[list[CalibSample]]:
        return data.groups(self.config.batch_size, by_step=True)  # calibrate_activations' batches
