"""Calibration: collect data, observe ranges, reconstruct. Each method registers in CALIBRATORS."""

from dq.calib.registry import CALIBRATORS, CalibContext

__all__ = ["CALIBRATORS", "CalibContext"]
