"""Calibration: collect data, observe ranges, reconstruct. Each method registers in CALIBRATORS."""

from dq.calib.registry import CALIBRATORS, CalibContext
from dq.calib.collect import CalibConfig, CalibData
from dq.calib import ptq4dm as _ptq4dm  # noqa: F401  registers "ptq4dm"
from dq.calib import qdiffusion as _qdiffusion  # noqa: F401  registers "qdiffusion"
from dq.calib import tfmq as _tfmq  # noqa: F401  registers "tfmq"
from dq.calib import timestep as _timestep  # noqa: F401  registers "timestep"
from dq.calib import svdquant as _svdquant  # noqa: F401  registers "svdquant" and "smoothquant"

__all__ = ["CALIBRATORS", "CalibConfig", "CalibContext", "CalibData"]
