"""dq.quantize: quantize a pipeline's denoiser in place and report what changed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from dq.cache import calibration_replay
from dq.calib import CALIBRATORS, CalibContext
from dq.errors import DQError
from dq.nn import swap_layers
from dq.nn.base import QuantLayerMixin
from dq.pipelines.walker import find_denoiser, select_layers
from dq.recipes import Recipe, load_recipe


@dataclass
class QuantReport:
    """What `dq.quantize` did: layers quantized and skipped (with reasons), and denoiser bytes."""

    recipe: str
    quantized: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    bytes_before: int = 0
    bytes_after: int = 0

    @property
    def compression(self) -> float:
        """bytes_after / bytes_before of the whole denoiser (parameters and buffers)."""
        return self.bytes_after / max(self.bytes_before, 1)

    def __str__(self) -> str:
        return (
            f"dq.quantize[{self.recipe}]: {len(self.quantized)} layers quantized, {len(self.skipped)} kept in high "
            f"precision; denoiser {self.bytes_before / 2**20:.2f} MiB -> {self.bytes_after / 2**20:.2f} MiB "
            f"({self.compression:.3f}x)"
        )


def module_nbytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of `module` (packed codes count as stored)."""
    tensors = list(module.parameters()) + [b for b in module.buffers() if b is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "is_quantized", False) or any(isinstance(m, QuantLayerMixin) for m in model.modules())


def quantize_model(denoiser: nn.Module, recipe: Recipe, context: CalibContext) -> QuantReport:
    """Swap, calibrate and deploy the layers `recipe` selects. Returns the report; raises DQError on bad input."""
    if recipe.act is not None and not recipe.act.dynamic and recipe.method == "rtn":
        raise DQError(
            f"recipe {recipe.name!r} has static activation scales but method 'rtn' collects no data; "
            "use dynamic ('token') activations or a calibrating method."
        )
    calibrator = CALIBRATORS.get(recipe.method)
    report = QuantReport(recipe=recipe.name, bytes_before=module_nbytes(denoiser))
    selection = select_layers(denoiser, recipe.weight, recipe.act, recipe.layers, recipe.skip, recipe.only)
    # A method may choose layer kinds and options (e.g. svdquant: Linear -> "svdq_linear" with a rank)
    # by carrying a `plan_layers(denoiser, selection, recipe)` hook; it edits the selection in place.
    planner = getattr(calibrator, "plan_layers", None)
    if planner is not None:
        planner(denoiser, selection, recipe)
    layers = swap_layers(denoiser, selection.plans)
    calibrator(denoiser, layers, recipe, context)
    for layer in tqdm(layers.values(), desc=f"dq: packing {recipe.name}", leave=False):
        layer.deploy()
    report.quantized = list(layers)
    report.skipped = selection.skipped
    report.bytes_after = module_nbytes(denoiser)
    return report


def quantize(pipe: Any, recipe: str | Recipe, calib: Any = None) -> QuantReport:
    """Quantize the denoiser of a diffusers pipeline in place with a recipe.

    Args:
        pipe: a diffusers pipeline (or a denoiser model).
        recipe: a bundled recipe name (`dq recipes` lists them), a YAML path, or a Recipe.
        calib: a dq.CalibConfig for recipes that calibrate on data (None: data-free, or the bundled default set).
            If a step cache is enabled (dq.enable_cache) the calibration data is collected with it, and
            cached steps are replayed as the cache runs them (cache-aware calibration, CacheQuant).

    Example:
        >>> import dq
        >>> report = dq.quantize(pipe, "w4a16")
        >>> pipe.save_pretrained("out")   # packed weights + quantization_config
    """
    from dq.pipelines.backend import attach_quantizer

    denoiser = find_denoiser(pipe)
    if is_quantized(denoiser):
        raise DQError(
            f"{type(denoiser).__name__} is already quantized; dq does not quantize twice. "
            "Load the float pipeline again and quantize that."
        )
    recipe = load_recipe(recipe)
    # With a step cache enabled, calibration sees what the model sees on cached steps (dq.cache replay).
    replay = calibration_replay(pipe) if recipe.needs_data else None
    report = quantize_model(denoiser, recipe, CalibContext(pipeline=pipe, calib=calib, cache_replay=replay))
    attach_quantizer(denoiser, recipe)
    return report
