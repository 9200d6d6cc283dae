"""dq.quantize: quantize a pipeline's denoiser in place, calibrating on data the pipeline generates."""

from __future__ import annotations

from typing import TYPE_CHECKING

from dq.calib import CalibData, QuantReport, plan_quantization, quantize_model
from dq.errors import DQError
from dq.nn.denoiser import find_denoiser
from dq.pipelines.backend import attach_quantizer
from dq.pipelines.calibration import CalibConfig, calibration_data
from dq.pipelines.lora import enable_pipeline_lora
from dq.recipes import Recipe, load_recipe

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def quantize(pipe: DiffusionPipeline, recipe: str | Recipe, calib: CalibConfig | CalibData | None = None) -> QuantReport:
    """Quantize the denoiser of a diffusers pipeline in place with a recipe.

    Args:
        pipe: a diffusers pipeline (or, for data-free recipes, a denoiser model).
        recipe: a bundled recipe name (`dq recipes` lists them), a YAML path, or a Recipe.
        calib: for recipes that calibrate on data: a dq.CalibConfig (the FP pipeline runs on its prompts),
            already collected dq.calib.CalibData, or None (the bundled default set). If a step cache is
            enabled (dq.enable_cache) the data is collected with it, and cached steps are replayed as the
            cache runs them (cache-aware calibration, CacheQuant).

    Example:
        >>> import dq
        >>> report = dq.quantize(pipe, "w4a16")
        >>> pipe.save_pretrained("out")   # packed weights + quantization_config
    """
    denoiser = find_denoiser(pipe)
    if getattr(denoiser, "is_quantized", False):  # a checkpoint loaded quantized, by dq or another backend
        raise DQError(
            f"{type(denoiser).__name__} is already quantized; dq does not quantize twice. "
            "Load the float pipeline again and quantize that."
        )
    recipe = load_recipe(recipe)
    plan = plan_quantization(denoiser, recipe)  # bad input fails here, before any data is collected
    data = calibration_data(pipe, recipe, calib) if recipe.needs_data else None
    report = quantize_model(denoiser, recipe, data, plan)
    attach_quantizer(denoiser, recipe)
    enable_pipeline_lora(pipe)
    return report
