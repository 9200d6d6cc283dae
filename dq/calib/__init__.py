"""Calibration: the core's entry point, the calibration data it takes, and one file per method."""

from dq.calib import ptq4dm, qdiffusion, rtn, svdquant, tfmq, timestep  # noqa: F401  each registers its method
from dq.calib.base import METHODS, Calibrator, CalibratorConfig, Sampling, calibrator_for, load_config, register_calibrator
from dq.calib.data import CalibBatch, CalibData, CalibSample
from dq.calib.quantize import QuantPlan, QuantReport, has_quant_layers, plan_quantization, quantize_model

__all__ = [
    "METHODS",
    "CalibBatch",
    "CalibData",
    "CalibSample",
    "Calibrator",
    "CalibratorConfig",
    "QuantPlan",
    "QuantReport",
    "Sampling",
    "calibrator_for",
    "has_quant_layers",
    "load_config",
    "plan_quantization",
    "quantize_model",
    "register_calibrator",
]
