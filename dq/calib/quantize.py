"""The core's entry point: quantize a denoiser with a recipe and one calibration-data object.

`plan_quantization` decides which layers are swapped for which quantized kind (the family's skip rules,
then the method's own plan) without touching the model, so bad input fails before any data is collected;
`quantize_model` swaps, calibrates and deploys. Where calibration data comes from is decided above the
core (`dq.pipelines`); here it is a `CalibData`, or None for data-free methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import nn
from tqdm.auto import tqdm

from dq.calib.base import Calibrator, calibrator_for
from dq.calib.data import CalibData
from dq.errors import DQError
from dq.nn import swap_layers
from dq.nn.base import QuantLayerMixin
from dq.nn.select import LayerSelection, select_layers
from dq.sizes import module_bytes

if TYPE_CHECKING:
    from dq.recipes import Recipe


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


@dataclass
class QuantPlan:
    """The layers a recipe will quantize (and keep), and the calibrator that will set them."""

    selection: LayerSelection
    calibrator: Calibrator


def has_quant_layers(model: nn.Module) -> bool:
    """Whether quantized layers are already swapped into `model`."""
    return any(isinstance(m, QuantLayerMixin) for m in model.modules())


def plan_quantization(denoiser: nn.Module, recipe: Recipe) -> QuantPlan:
    """Which layers `recipe` quantizes and how; the model is not changed. DQError on bad input."""
    if has_quant_layers(denoiser):
        raise DQError(
            f"{type(denoiser).__name__} is already quantized; dq does not quantize twice. "
            "Load the float model again and quantize that."
        )
    calibrator = calibrator_for(recipe.calibration)
    selection = select_layers(denoiser, recipe.weight, recipe.act, recipe.layers, recipe.skip, recipe.only)
    calibrator.plan(denoiser, selection, recipe)
    return QuantPlan(selection, calibrator)


def quantize_model(denoiser: nn.Module, recipe: Recipe, data: CalibData | None = None, plan: QuantPlan | None = None) -> QuantReport:
    """Swap, calibrate and deploy the layers `recipe` selects, in place.

    Args:
        denoiser: the float model (a UNet or a transformer).
        recipe: what to quantize and how.
        data: the calibration samples for methods that need data (`recipe.needs_data`), else None.
        plan: the result of `plan_quantization(denoiser, recipe)` if already made.

    Example:
        >>> report = quantize_model(unet, load_recipe("w4a16"))
    """
    if recipe.needs_data and data is None:
        raise DQError(
            f"recipe {recipe.name!r} calibrates on data ({recipe.method}) and got none; pass calibration data "
            "(dq.quantize(pipe, recipe, calib=dq.CalibConfig(...)) collects it from the pipeline)."
        )
    plan = plan or plan_quantization(denoiser, recipe)
    report = QuantReport(recipe=recipe.name, bytes_before=module_bytes(denoiser))
    layers = swap_layers(denoiser, plan.selection.plans)
    plan.calibrator.calibrate(denoiser, layers, recipe, data if recipe.needs_data else None)
    for layer in tqdm(layers.values(), desc=f"dq: packing {recipe.name}", leave=False):
        layer.deploy()
    report.quantized = list(layers)
    report.skipped = plan.selection.skipped
    report.bytes_after = module_bytes(denoiser)
    return report
