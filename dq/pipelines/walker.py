"""Moved: dq.nn.denoiser.find_denoiser and dq.nn.select (removed once the adapters import those)."""

from dq.nn.denoiser import find_denoiser
from dq.nn.select import DEFAULT_SKIP, LayerSelection, select_layers

__all__ = ["DEFAULT_SKIP", "LayerSelection", "find_denoiser", "select_layers"]
