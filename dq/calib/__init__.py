"""Calibration: collect data, observe ranges, reconstruct. Each method registers in CALIBRATORS."""

from dq.calib.registry import CALIBRATORS, CalibContext
from dq.calib import svdquant as _svdquant  # noqa: F401  registers "svdquant" and "smoothquant"

__all__ = ["CALIBRATORS", "CalibContext"]
