"""diffusers adapters: denoiser discovery, layer selection rules, the quantizer backend, dq.quantize."""

from dq.pipelines.backend import DQQuantizer, register_backend
from dq.pipelines.config import DQConfig
from dq.pipelines.quantize import QuantReport, quantize
from dq.pipelines.walker import find_denoiser, select_layers

__all__ = ["DQConfig", "DQQuantizer", "QuantReport", "find_denoiser", "quantize", "register_backend", "select_layers"]
