"""Layer selection: decide, by rule, which float layers of a denoiser a recipe quantizes, and how."""

from __future__ import annotations

from dataclasses import dataclass, field
from fnmatch import fnmatch

from torch import nn

from dq.errors import DQError
from dq.nn.swap import FLOAT_LAYER_KIND, LayerPlan
from dq.quant import PerGroup, PerToken, Progressive, QuantSpec

# Kept in high precision by default: what the SVDQuant, Q-Diffusion and ViDiT-Q code keep. Globs over
# full module names; bare names match only top-level modules (the model's own input/output layers).
DEFAULT_SKIP = (
    "conv_in",
    "conv_out",
    "proj_out",
    "norm_out*",
    "final_layer*",
    "*time_embed*",
    "*timestep_embedder*",
    "*time_text_embed*",
    "*time_proj*",
    "*guidance_embedder*",
    "*text_embedder*",
    "*add_embedding*",
    "*condition_embedder*",
    "*pos_embed*",
    "*patch_embed*",
    "*x_embedder*",
    "*context_embedder*",
    "*caption_proj*",
    "*encoder_hid_proj*",
    "adaln_single*",
    "*norm*",
)


@dataclass
class LayerSelection:
    """The walker's decision: a plan per quantized layer, and a reason per layer kept in high precision."""

    plans: dict[str, LayerPlan] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def fits(spec: QuantSpec | None, in_features: int) -> bool:
    """Whether a layer with `in_features` inputs splits into the spec's groups."""
    g = None if spec is None else spec.granularity
    if isinstance(g, (PerGroup, PerToken, Progressive)) and getattr(g, "group_size", None):
        return in_features % g.group_size == 0
    return True


def _matches(name: str, patterns: tuple[str, ...]) -> str | None:
    return next((p for p in patterns if fnmatch(name, p)), None)


def select_layers(
    denoiser: nn.Module,
    weight: QuantSpec,
    act: QuantSpec | None,
    layer_kinds: tuple[str, ...],
    skip: tuple[str, ...] = (),
    only: tuple[str, ...] = (),
    use_default_skip: bool = True,
) -> LayerSelection:
    """Plan which nn.Linear / nn.Conv2d layers are quantized; works on any architecture.

    Raises DQError naming the model class when it has no layer this recipe can quantize.
    """
    selection = LayerSelection()
    skip_patterns = (DEFAULT_SKIP if use_default_skip else ()) + tuple(skip)
    for name, module in denoiser.named_modules():
        kind = FLOAT_LAYER_KIND.get(type(module))
        if kind is None:
            continue
        if kind not in layer_kinds:
            selection.skipped[name] = f"layer kind {kind} not in recipe"
        elif only and not _matches(name, only):
            selection.skipped[name] = "not matched by `only`"
        elif pattern := _matches(name, skip_patterns):
            selection.skipped[name] = f"kept in high precision by rule {pattern!r}"
        else:
            in_features = module.in_features if kind == "linear" else module.weight[0].numel()
            act_channels = module.in_features if kind == "linear" else module.in_channels
            if not (fits(weight, in_features) and fits(act, act_channels)):
                selection.skipped[name] = f"input size {in_features} is not a multiple of the group size"
            else:
                selection.plans[name] = LayerPlan(kind, weight, act)
    if not selection.plans:
        raise DQError(
            f"{type(denoiser).__name__} has no layer this recipe can quantize "
            f"(looked for {', '.join(layer_kinds)} layers outside the skip rules). "
            "Check the recipe's `only`/`skip` patterns, or pass a model with nn.Linear/nn.Conv2d layers."
        )
    return selection
