"""Where the cacheable blocks of a denoiser are: per-class metadata (data only) with generic fallbacks.

UNets: the attribute names of the down/mid/up paths. DiTs: the ordered block lists the forward runs one
after the other (Flux runs `transformer_blocks` then `single_transformer_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from diffusers.hooks._helpers import TransformerBlockMetadata, TransformerBlockRegistry
from torch import nn

from dq.errors import DQError


@dataclass(frozen=True)
class UNetLayout:
    """Attribute names of a UNet's encoder path, bottleneck and decoder path."""

    down: str = "down_blocks"
    mid: str = "mid_block"
    up: str = "up_blocks"


UNET_LAYOUTS: dict[str, UNetLayout] = {
    "UNet2DConditionModel": UNetLayout(),
    "UNet2DModel": UNetLayout(),
    "UNet3DConditionModel": UNetLayout(),
}

# Block lists in execution order, keyed by model class name.
DIT_BLOCK_LISTS: dict[str, tuple[str, ...]] = {
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "SanaTransformer2DModel": ("transformer_blocks",),
    "DiTTransformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "WanTransformer3DModel": ("blocks",),
    "CogVideoXTransformer3DModel": ("transformer_blocks",),
    "HunyuanVideoTransformer3DModel": ("transformer_blocks", "single_transformer_blocks"),
    "LTXVideoTransformer3DModel": ("transformer_blocks",),
}
GENERIC_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


def unet_layout(model: nn.Module) -> UNetLayout:
    """The UNet layout of `model`; DQError if it has no down/up block lists."""
    layout = UNET_LAYOUTS.get(type(model).__name__, UNetLayout())
    if not isinstance(getattr(model, layout.down, None), nn.ModuleList) or not isinstance(
        getattr(model, layout.up, None), nn.ModuleList
    ):
        raise DQError(
            f"{type(model).__name__} has no `{layout.down}`/`{layout.up}` block lists: DeepCache needs a UNet "
            "(e.g. UNet2DConditionModel). For transformers use 'block-cache' or 'first-block-cache'."
        )
    return layout


def dit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every transformer block of `model`, in execution order."""
    names = DIT_BLOCK_LISTS.get(type(model).__name__, GENERIC_BLOCK_LISTS)
    blocks = []
    for attr in names:
        seq = getattr(model, attr, None)
        if isinstance(seq, nn.ModuleList):
            blocks += [(f"{attr}.{i}", b) for i, b in enumerate(seq)]
    if not blocks:
        raise DQError(
            f"{type(model).__name__} has no transformer block list (looked for {', '.join(names)}); block caching "
            "needs a DiT. For UNets use 'deepcache'."
        )
    return blocks


def block_metadata(block: nn.Module) -> TransformerBlockMetadata:
    """diffusers' metadata of a transformer block class: where hidden/encoder states are in args and outputs."""
    try:
        return TransformerBlockRegistry.get(type(block))
    except ValueError:
        raise DQError(
            f"{type(block).__name__} is not in diffusers' TransformerBlockRegistry, so dq cannot tell where its "
            "hidden states are; register it with diffusers.hooks._helpers.TransformerBlockRegistry.register."
        ) from None
