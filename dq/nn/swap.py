"""Swap float layers for quantized ones in place, by module name."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from torch import nn

from dq.errors import DQError
from dq.nn.base import QuantLayerMixin
from dq.nn.quant_conv import QuantConv2d
from dq.nn.quant_linear import QuantLinear
from dq.quant import QuantSpec, spec_from_dict, spec_to_dict

# float layer type -> quantized layer type; later layer kinds (SVDQLinear) register here too.
QUANT_LAYER_TYPES: dict[str, type[QuantLayerMixin]] = {"linear": QuantLinear, "conv2d": QuantConv2d}
FLOAT_LAYER_KIND: dict[type[nn.Module], str] = {nn.Linear: "linear", nn.Conv2d: "conv2d"}


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is quantized: the quantized layer kind, its weight and activation specs, and
    kind-specific options (JSON-safe; passed to the layer class's `wrap`, e.g. a low-rank rank)."""

    kind: str
    weight: QuantSpec
    act: QuantSpec | None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "weight": spec_to_dict(self.weight),
            "act": None if self.act is None else spec_to_dict(self.act),
            "options": dict(self.options),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "LayerPlan":
        if d.get("kind") not in QUANT_LAYER_TYPES:
            raise DQError(f"unknown layer kind {d.get('kind')!r}; known: {sorted(QUANT_LAYER_TYPES)}.")
        act = None if d.get("act") is None else spec_from_dict(d["act"])
        return cls(d["kind"], spec_from_dict(d["weight"]), act, dict(d.get("options") or {}))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def swap_layers(root: nn.Module, plans: dict[str, LayerPlan], init_scales: bool = True) -> dict[str, QuantLayerMixin]:
    """Replace each named float layer with its quantized layer (simulate mode), sharing parameters.

    With init_scales=False the weight scales are left unset (used when a state dict will follow).
    """
    swapped = {}
    for name, plan in plans.items():
        module = root.get_submodule(name)
        if isinstance(module, QuantLayerMixin):
            raise DQError(f"layer {name!r} is already quantized ({type(module).__name__}); load the float model to quantize again.")
        layer_cls = QUANT_LAYER_TYPES[plan.kind]
        if init_scales:
            layer = layer_cls.from_float(module, plan.weight, plan.act, **plan.options)
        else:
            layer = layer_cls.wrap(module, plan.weight, plan.act, **plan.options)
        _set_module(root, name, layer)
        swapped[name] = layer
    return swapped


def plan_of(layer: QuantLayerMixin) -> LayerPlan:
    """The plan that rebuilds `layer` (stored in a checkpoint's quantization_config)."""
    return LayerPlan(layer.kind, layer.weight_quantizer.spec, layer.act_quantizer.spec, layer.layer_options())


def quant_layers(root: nn.Module) -> Iterator[tuple[str, QuantLayerMixin]]:
    """All quantized layers under root, with their names."""
    for name, module in root.named_modules():
        if isinstance(module, QuantLayerMixin):
            yield name, module


def deploy_all(root: nn.Module) -> None:
    """Switch every quantized layer under root to deploy mode (packed weights)."""
    for _, layer in quant_layers(root):
        layer.deploy()
