"""diffusers adapters: calibration data from a pipeline, the quantizer backend, the LoRA bridge, dq.quantize."""

from dq.calib import QuantReport
from dq.pipelines.backend import DQQuantizer, register_backend
from dq.pipelines.calibration import CalibConfig
from dq.pipelines.config import DQConfig
from dq.pipelines.quantize import quantize

__all__ = ["CalibConfig", "DQConfig", "DQQuantizer", "QuantReport", "quantize", "register_backend"]
