"""dq: quantization for diffusers pipelines. `import dq` registers dq as a diffusers quantization backend."""

from dq.cache import disable_cache, enable_cache
from dq.errors import DQError
from dq.pipelines import CalibConfig, DQConfig, QuantReport, quantize, register_backend
from dq.recipes import Recipe

register_backend()

__version__ = "0.1.0"

__all__ = ["CalibConfig", "DQConfig", "DQError", "QuantReport", "Recipe", "disable_cache", "enable_cache", "quantize"]
