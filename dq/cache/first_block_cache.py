"""First Block Cache: adaptive reuse of the remaining blocks' residual, decided by the first block's change.

Every step runs the first transformer block. If its output residual changed, relative to the one seen at
the last full step, by less than `threshold` (mean |r - r_prev| / mean |r_prev|), the remaining blocks
are skipped and their stored residual is added to the first block's output; otherwise they all run and
the residual is stored again. Same decision rule as ParaAttention / diffusers' FirstBlockCacheConfig, on
dq's step tracking so that it also resets between calls of pipelines that set no cache_context (PixArt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from dq.cache.block_cache import BlockHook, _outputs, _pack, _states, _sub
from dq.cache.blocks import dit_blocks
from dq.cache.config import CacheConfig, register_cache_method
from dq.cache.handle import CacheHandle
from dq.errors import DQError

FBC_HOOK = "dq_first_block_cache"


@dataclass
class FirstBlockCacheConfig(CacheConfig):
    """[First Block Cache](https://github.com/chengzeyi/ParaAttention#first-block-cache-our-dynamic-caching):
    skip all blocks after the first while the first block's residual changes less than `threshold`.

    Args:
        threshold: relative L1 change of the first block's residual under which the rest is reused.
        max_cached_steps: at most this many consecutive cached steps (None: no limit).

    Example:
        >>> dq.enable_cache(pipe, FirstBlockCacheConfig(threshold=0.08))
    """

    method = "first-block-cache"
    replayable = False  # whether a step is cached depends on the features of that run
    paper = "https://github.com/chengzeyi/ParaAttention#first-block-cache-our-dynamic-caching"

    threshold: float = 0.05
    max_cached_steps: int | None = None
    interval: int = 1  # the step hook refreshes every step; the head block decides

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interval != 1 or self.schedule != "uniform":
            raise DQError("first-block-cache decides adaptively; it takes no interval or schedule (use threshold).")
        if self.threshold < 0:
            raise DQError(f"threshold must be >= 0, got {self.threshold}.")


class FBCHeadHook(BlockHook):
    """The first block: always runs, decides whether the rest runs this step."""

    def __init__(self, handle: CacheHandle, threshold: float, max_cached: int | None) -> None:
        super().__init__(handle)
        self.threshold, self.max_cached = threshold, max_cached

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.handle.idle():
            return self.fn_ref.original_forward(*args, **kwargs)
        state = self.handle.state()
        h_in, _ = _states(self.meta, args, kwargs)
        out = self.fn_ref.original_forward(*args, **kwargs)
        self.handle.stats.count("block", True)
        h, e = _outputs(self.meta, out)
        residual = h - h_in
        prev = state.extra.get("head_residual")
        streak = state.extra.get("streak", 0)
        reuse = (
            prev is not None
            and "tail_residual" in state.outputs
            and (self.max_cached is None or streak < self.max_cached)
            and float((residual - prev).abs().mean() / prev.abs().mean().clamp_min(1e-12)) < self.threshold
        )
        state.extra["compute"] = not reuse
        if not reuse:
            state.extra.update(head_residual=residual, head_out=(h, e), streak=0)
            return out
        state.extra["streak"] = streak + 1
        r_h, r_e = state.outputs["tail_residual"]
        return _pack(self.meta, h + self.handle.reuse_feature(state, r_h), e if r_e is None or e is None else e + r_e)


class FBCBlockHook(BlockHook):
    """A later block: runs when the head decided to compute (the tail stores the residual), else passes through."""

    def __init__(self, handle: CacheHandle, is_tail: bool) -> None:
        super().__init__(handle)
        self.is_tail = is_tail

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.handle.idle():
            return self.fn_ref.original_forward(*args, **kwargs)
        state = self.handle.state()
        if state.extra.get("compute", True):
            out = self.fn_ref.original_forward(*args, **kwargs)
            self.handle.stats.count("block", True)
            if self.is_tail:
                h_out, e_out = _outputs(self.meta, out)
                h_head, e_head = state.extra["head_out"]
                state.outputs["tail_residual"] = (h_out - h_head, _sub(e_out, e_head))
                self.handle.emit_feature(state, state.outputs["tail_residual"][0])
            return out
        self.handle.stats.count("block", False)
        h, e = _states(self.meta, args, kwargs)
        return _pack(self.meta, h, e)


@register_cache_method(FirstBlockCacheConfig)
def apply_first_block_cache(model: nn.Module, config: FirstBlockCacheConfig, handle: CacheHandle) -> None:
    """Register First Block Cache hooks on `model`'s transformer blocks (step hook already in `handle`).

    Example:
        >>> dq.enable_cache(pipe, FirstBlockCacheConfig(threshold=0.05))   # the public entry point
    """
    blocks = dit_blocks(model)
    if len(blocks) < 2:
        raise DQError(f"first-block-cache needs at least 2 transformer blocks; {type(model).__name__} has {len(blocks)}.")
    handle.info.update(num_blocks=len(blocks), channel_dim=-1)
    handle.register(blocks[0][1], FBCHeadHook(handle, config.threshold, config.max_cached_steps), FBC_HOOK)
    for i, (_, block) in enumerate(blocks[1:], start=1):
        handle.register(block, FBCBlockHook(handle, i == len(blocks) - 1), FBC_HOOK)
