"""Block caching for DiTs (FORA / Delta-DiT style): reuse the residual of a range of transformer blocks.

On a refresh step every block runs; the range's residual R = h_out(end-1) - h_in(start) (and the same for
the encoder stream of dual-stream blocks) is stored. On a cached step the first block of the range returns
h_in + R and the other blocks of the range pass their inputs through, so the range costs nothing.
Blocks are found through per-class metadata (dq.cache.blocks) and diffusers' TransformerBlockRegistry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks._helpers import TransformerBlockMetadata
from diffusers.hooks.hooks import ModelHook
from torch import nn

from dq.cache.blocks import block_metadata, dit_blocks
from dq.cache.config import CacheConfig, register_cache_method
from dq.cache.deepcache import CountHook
from dq.cache.handle import CacheHandle
from dq.errors import DQError

RANGE_HOOK = "dq_block_cache_range"
COUNT_HOOK = "dq_block_cache_count"


@dataclass
class BlockCacheConfig(CacheConfig):
    """Reuse of the deep transformer blocks' residual across steps ([FORA](https://arxiv.org/abs/2407.01425),
    [Delta-DiT](https://arxiv.org/abs/2406.01125)) on a fixed schedule.

    Args:
        blocks: (start, end) block range to cache, over the model's block lists concatenated in execution
            order; negative end counts from the end. Default (1, -1): all but the first and the last block.
        interval / schedule / refresh_steps: see CacheConfig.

    Example:
        >>> dq.enable_cache(pipe, BlockCacheConfig(interval=3))
    """

    method = "block-cache"
    paper = "https://arxiv.org/abs/2407.01425"

    blocks: tuple[int, int] = (1, -1)

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blocks = tuple(int(b) for b in self.blocks)
        if len(self.blocks) != 2:
            raise DQError(f"blocks must be a (start, end) pair, got {self.blocks}.")


def resolve_range(blocks: tuple[int, int], count: int, model: str) -> tuple[int, int]:
    """Absolute [start, end) of a block range; DQError if empty or out of the model's block count."""
    start, end = blocks
    end_abs = end + count if end < 0 else end
    if not (0 <= start < end_abs <= count):
        raise DQError(
            f"block range {tuple(blocks)} does not fit {model}, which has {count} transformer blocks "
            f"(indices 0..{count - 1}); choose 0 <= start < end <= {count} (negative end counts from the end)."
        )
    return start, end_abs


def _states(meta: TransformerBlockMetadata, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    h = meta._get_parameter_from_args_kwargs(meta.hidden_states_argument_name, args, kwargs)
    e = None
    if meta.return_encoder_hidden_states_index is not None:
        e = meta._get_parameter_from_args_kwargs(meta.encoder_hidden_states_argument_name, args, kwargs)
    return h, e


def _outputs(meta: TransformerBlockMetadata, out: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(out, torch.Tensor):
        return out, None
    e = None if meta.return_encoder_hidden_states_index is None else out[meta.return_encoder_hidden_states_index]
    return out[meta.return_hidden_states_index], e


def _pack(meta: TransformerBlockMetadata, h: torch.Tensor, e: torch.Tensor | None) -> Any:
    if meta.return_encoder_hidden_states_index is None:
        return h
    out = [None, None]
    out[meta.return_hidden_states_index] = h
    out[meta.return_encoder_hidden_states_index] = e
    return tuple(out)


def _sub(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    return None if a is None or b is None else a - b


class BlockHook(ModelHook):
    """A hook on one transformer block; reads the block's hidden states through diffusers' block metadata."""

    def __init__(self, handle: CacheHandle) -> None:
        super().__init__()
        self.handle = handle
        self.meta: TransformerBlockMetadata | None = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self.meta = block_metadata(module)
        return module


class RangeBlockHook(BlockHook):
    """One block of the cached range: head stores inputs / applies the residual, tail stores the residual."""

    def __init__(self, handle: CacheHandle, is_head: bool, is_tail: bool) -> None:
        super().__init__(handle)
        self.is_head, self.is_tail = is_head, is_tail

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.handle.idle():
            return self.fn_ref.original_forward(*args, **kwargs)
        state = self.handle.state()
        h, e = _states(self.meta, args, kwargs)
        if state.refresh:
            if self.is_head:
                state.extra["range_in"] = (h, e)
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.handle.stats.count("block", True)
            if self.is_tail:
                h_out, e_out = _outputs(self.meta, out)
                h_in, e_in = state.extra["range_in"]
                state.outputs["residual"] = (h_out - h_in, _sub(e_out, e_in))
                self.handle.emit_feature(state, state.outputs["residual"][0])
            return out
        self.handle.stats.count("block", False)
        if self.is_head:
            r_h, r_e = state.outputs["residual"]
            h = h + self.handle.reuse_feature(state, r_h)
            e = e if r_e is None or e is None else e + r_e
        return _pack(self.meta, h, e)


@register_cache_method(BlockCacheConfig)
def apply_block_cache(model: nn.Module, config: BlockCacheConfig, handle: CacheHandle) -> None:
    """Register the block-range hooks on `model`'s transformer blocks (step hook already in `handle`).

    Example:
        >>> dq.enable_cache(pipe, BlockCacheConfig(interval=3, blocks=(1, -1)))   # the public entry point
    """
    blocks = dit_blocks(model)
    start, end = resolve_range(config.blocks, len(blocks), type(model).__name__)
    handle.info.update(blocks=(start, end), num_blocks=len(blocks), channel_dim=-1)
    for i, (name, block) in enumerate(blocks):
        if start <= i < end:
            handle.register(block, RangeBlockHook(handle, i == start, i == end - 1), RANGE_HOOK)
        else:
            handle.register(block, CountHook(handle, "block"), COUNT_HOOK)
