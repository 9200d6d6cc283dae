"""DQConfig: dq's diffusers quantization config (quant_method "dq"), stored in the denoiser's config.json."""

from __future__ import annotations

import json
import weakref
from enum import Enum
from typing import Any

from diffusers.quantizers.quantization_config import QuantizationConfigMixin
from torch import nn

from dq.errors import DQError
from dq.nn import LayerPlan, plan_of, quant_layers
from dq.recipes import Recipe, load_recipe

CONFIG_VERSION = 1


class DQQuantizationMethod(str, Enum):
    """diffusers reads `quant_method.value`; dq has one method."""

    DQ = "dq"


class DQConfig(QuantizationConfigMixin):
    """Quantization config for `from_pretrained(..., quantization_config=dq.DQConfig(recipe="w4a16"))`.

    Args:
        recipe: a bundled recipe name, a recipe dict, or a Recipe. Only data-free recipes can be applied
            at load time; calibrated ones go through `dq.quantize(pipe, recipe, calib=...)`.
        modules: filled by dq once the model is quantized: module name -> layer plan. A checkpoint's
            config carries it so reloading rebuilds exactly those layers.
        version: format version of this config.

    Example:
        >>> from diffusers import UNet2DConditionModel
        >>> unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", quantization_config=dq.DQConfig("w4a16"))
    """

    def __init__(
        self,
        recipe: str | dict | Recipe = "w8a8",
        modules: dict[str, dict] | None = None,
        version: int = CONFIG_VERSION,
        **unused: Any,
    ) -> None:
        if unused:
            raise DQError(f"DQConfig got unknown field(s) {sorted(unused)}; allowed: recipe, modules, version.")
        if version != CONFIG_VERSION:
            raise DQError(f"this checkpoint's dq config is version {version}; this dq reads version {CONFIG_VERSION}. Upgrade dq.")
        self.quant_method = DQQuantizationMethod.DQ
        resolved = Recipe.from_dict(recipe, origin="quantization_config.recipe") if isinstance(recipe, dict) else load_recipe(recipe)
        self.recipe = resolved.to_dict()
        self.modules = dict(modules or {})
        self.version = version

    @property
    def recipe_obj(self) -> Recipe:
        return Recipe.from_dict(self.recipe, origin="quantization_config.recipe")

    def layer_plans(self) -> dict[str, LayerPlan]:
        return {name: LayerPlan.from_dict(d) for name, d in self.modules.items()}

    def bind(self, model: nn.Module) -> None:
        """Follow `model`'s quantized layers: `modules` is then read from them whenever the config is written
        (an SVDQ branch grows when a LoRA fuses into it, and shrinks again when it unfuses)."""
        self._model = weakref.ref(model)

    def to_dict(self) -> dict[str, Any]:
        model = self._model() if getattr(self, "_model", None) is not None else None
        if model is not None:  # PEFT wraps layers as <name>.base_layer; the checkpoint keeps the model's names
            self.modules = {name.replace(".base_layer", ""): plan_of(layer).to_dict() for name, layer in quant_layers(model)}
        return {"quant_method": self.quant_method.value, "recipe": self.recipe, "modules": self.modules, "version": self.version}

    def to_json_string(self, use_diff: bool = True) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def __repr__(self) -> str:
        return f"DQConfig(recipe={self.recipe['name']!r}, modules={len(self.modules)}, version={self.version})"

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs: Any):
        d = {k: v for k, v in config_dict.items() if k != "quant_method"}
        config = cls(**d)
        return (config, kwargs) if return_unused_kwargs else config
