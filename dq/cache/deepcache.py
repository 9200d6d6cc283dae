"""DeepCache for UNets, as diffusers ModelHooks on the UNet's blocks (the UNet's forward is untouched).

Skip connections are numbered in the order the UNet produces them: 0 is `conv_in`'s output, then one per
down resnet and one per downsampler. With branch b, a refresh step runs the whole UNet and every hooked
unit stores its output. A cached step runs only the units that produce skips 0..b and the up resnets that
consume them; every other unit (deep down blocks, mid block, deep up blocks) returns its stored output.
The up resnets that still run only read skips 0..b, which are fresh, so the stale skips of the skipped
down units are never consumed. The stored output feeding the first running up resnet is "the feature".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks.hooks import ModelHook
from torch import nn

from dq.cache.blocks import unet_layout
from dq.cache.config import CacheConfig, register_cache_method
from dq.cache.handle import CacheHandle
from dq.errors import DQError

SKIP_HOOK = "dq_deepcache_skip"
COUNT_HOOK = "dq_deepcache_count"


@dataclass
class DeepCacheConfig(CacheConfig):
    """[DeepCache](https://arxiv.org/abs/2312.00858): reuse the UNet's deep up-path feature across steps.

    Args:
        branch: skip-connection index b (0 = `conv_in`'s skip: shallowest, fastest); the up-path feature
            entering the resnet that consumes skip b is cached.
        interval / schedule / center / power / refresh_steps: see CacheConfig. DeepCache's non-uniform
            schedule is schedule="quadratic", interval=5, center=15, power=1.4.

    Example:
        >>> dq.enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))
    """

    method = "deepcache"
    paper = "https://arxiv.org/abs/2312.00858"

    branch: int = 0


@dataclass
class Unit:
    """One hookable piece of the UNet: its module, where it is, and whether cached steps run it."""

    name: str
    module: nn.Module
    runs: bool
    units: int  # resnets/attentions/samplers it contains, for the evaluation count


@dataclass
class DeepCachePlan:
    """Which units a cached step runs for branch b, and which stored output is the feature."""

    branch: int
    num_skips: int
    units: list[Unit]
    feature: str


def _leaf_units(block: nn.Module) -> int:
    return sum(len(getattr(block, a, None) or []) for a in ("resnets", "attentions", "downsamplers", "upsamplers"))


def plan_deepcache(unet: nn.Module, branch: int) -> DeepCachePlan:
    """Map skip connections to down producers and up consumers, and decide each unit's fate for `branch`."""
    layout = unet_layout(unet)
    down, up, mid = getattr(unet, layout.down), getattr(unet, layout.up), getattr(unet, layout.mid, None)
    units: list[Unit] = []
    skip = 0  # conv_in
    for i, block in enumerate(down):
        first = skip + 1
        parts = []
        for j, resnet in enumerate(block.resnets):
            skip += 1
            parts.append((f"{layout.down}.{i}.resnets.{j}", resnet, skip))
            attentions = getattr(block, "attentions", None)
            if attentions is not None and j < len(attentions):
                parts.append((f"{layout.down}.{i}.attentions.{j}", attentions[j], skip))
        for k, sampler in enumerate(getattr(block, "downsamplers", None) or []):
            skip += 1
            parts.append((f"{layout.down}.{i}.downsamplers.{k}", sampler, skip))
        if first > branch:
            units.append(Unit(f"{layout.down}.{i}", block, False, _leaf_units(block)))
        else:
            units += [Unit(n, m, s <= branch, 1) for n, m, s in parts]
    num_skips = skip + 1
    if not 0 <= branch < num_skips:
        raise DQError(
            f"DeepCache branch {branch} does not exist: {type(unet).__name__} has {num_skips} skip connections "
            f"(branches 0..{num_skips - 1}; 0 = shallowest, fastest)."
        )
    order: list[Unit] = []
    if mid is not None:
        order.append(Unit(layout.mid, mid, False, _leaf_units(mid)))
    stack = list(range(num_skips))
    for i, block in enumerate(up):
        n = len(block.resnets)
        taken, stack = stack[-n:], stack[:-n]
        consumed = [taken[-(j + 1)] for j in range(n)]  # resnet j pops the last remaining skip
        if min(consumed) > branch:
            order.append(Unit(f"{layout.up}.{i}", block, False, _leaf_units(block)))
            continue
        attentions = getattr(block, "attentions", None)
        for j, resnet in enumerate(block.resnets):
            order.append(Unit(f"{layout.up}.{i}.resnets.{j}", resnet, consumed[j] <= branch, 1))
            if attentions is not None and j < len(attentions):
                order.append(Unit(f"{layout.up}.{i}.attentions.{j}", attentions[j], consumed[j] <= branch, 1))
        for k, sampler in enumerate(getattr(block, "upsamplers", None) or []):
            order.append(Unit(f"{layout.up}.{i}.upsamplers.{k}", sampler, True, 1))
    first_run = next(i for i, u in enumerate(order) if u.runs)
    return DeepCachePlan(branch, num_skips, units + order, order[first_run - 1].name)


def _tensor(out: Any) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out[0]


def _with_tensor(out: Any, tensor: torch.Tensor) -> Any:
    return tensor if isinstance(out, torch.Tensor) else (tensor, *out[1:])


class DeepCacheSkipHook(ModelHook):
    """Runs and stores the unit on refresh steps; returns the stored output on cached steps."""

    def __init__(self, handle: CacheHandle, key: str, units: int, is_feature: bool) -> None:
        super().__init__()
        self.handle, self.key, self.units, self.is_feature = handle, key, units, is_feature

    def new_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if self.handle.idle():
            return self.fn_ref.original_forward(*args, **kwargs)
        state = self.handle.state()
        if state.refresh:
            out = self.fn_ref.original_forward(*args, **kwargs)
            state.outputs[self.key] = out
            self.handle.stats.count("unit", True, self.units)
            if self.is_feature:
                self.handle.emit_feature(state, _tensor(out))
            return out
        self.handle.stats.count("unit", False, self.units)
        out = state.outputs[self.key]
        if self.is_feature:
            out = _with_tensor(out, self.handle.reuse_feature(state, _tensor(out)))
        return out


class CountHook(ModelHook):
    """Counts evaluations of a unit that always runs."""

    def __init__(self, handle: CacheHandle, kind: str = "unit") -> None:
        super().__init__()
        self.handle, self.kind = handle, kind

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        if not self.handle.idle():
            self.handle.stats.count(self.kind, True)
        return args, kwargs


@register_cache_method(DeepCacheConfig)
def apply_deepcache(unet: nn.Module, config: DeepCacheConfig, handle: CacheHandle) -> None:
    """Register DeepCache's hooks on `unet` (the step hook is already on it, in `handle`).

    Example:
        >>> dq.enable_cache(pipe, DeepCacheConfig(interval=3, branch=0))   # the public entry point
    """
    plan = plan_deepcache(unet, config.branch)
    handle.info.update(branch=plan.branch, num_skips=plan.num_skips, feature=plan.feature, channel_dim=1)
    for unit in plan.units:
        if unit.runs:
            handle.register(unit.module, CountHook(handle), COUNT_HOOK)
        else:
            hook = DeepCacheSkipHook(handle, unit.name, unit.units, unit.name == plan.feature)
            handle.register(unit.module, hook, SKIP_HOOK)
