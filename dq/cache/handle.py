"""CacheHandle: what `enable_cache` leaves on a denoiser, so that hooks can be found, reset and removed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers.hooks.hooks import HookRegistry, ModelHook
from torch import nn

from dq.cache.state import CacheState, CacheStateManager, CacheStats, StepHook

if TYPE_CHECKING:
    from dq.cache.config import CacheConfig

HANDLE_ATTR = "_dq_cache"
STEP_HOOK = "dq_cache_step"

# (step, feature tensor) -> None; called with the cache's feature whenever it is computed.
Recorder = Callable[[int, torch.Tensor], None]


@dataclass
class FeatureCorrection:
    """DEC's cache-error correction: at cached step i the reused feature F_c becomes a_i * F_c + b_i per channel."""

    scale: dict[int, torch.Tensor] = field(default_factory=dict)
    shift: dict[int, torch.Tensor] = field(default_factory=dict)
    channel_dim: int = 1

    def apply(self, step: int, feature: torch.Tensor) -> torch.Tensor:
        if step not in self.scale:
            return feature
        view = [1] * feature.ndim
        view[self.channel_dim] = -1
        a = self.scale[step].to(feature).view(view)
        b = self.shift[step].to(feature).view(view)
        return feature * a + b


@dataclass
class CacheHandle:
    """The hooks of one enabled cache on one denoiser, with its config, state and counters."""

    denoiser: nn.Module
    config: Any
    manager: CacheStateManager
    stats: CacheStats
    step_hook: StepHook
    hooked: list[tuple[nn.Module, str]] = field(default_factory=list)
    recorder: Recorder | None = None
    correction: FeatureCorrection | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def register(self, module: nn.Module, hook: ModelHook, name: str) -> None:
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self.hooked.append((module, name))

    def state(self) -> CacheState:
        return self.manager.get_state()

    def idle(self) -> bool:
        """True outside a denoiser call: a block called on its own runs uncached."""
        return not self.manager.get_state().active

    def emit_feature(self, state: CacheState, feature: torch.Tensor) -> None:
        """Called by the method's feature hook when the cached feature is computed (a refresh step)."""
        if self.recorder is not None:
            self.recorder(state.step, feature.detach())

    def reuse_feature(self, state: CacheState, feature: torch.Tensor) -> torch.Tensor:
        """The cached feature as used on a cached step, after DEC correction if fitted."""
        return feature if self.correction is None else self.correction.apply(state.step, feature)

    def remove(self) -> None:
        for module, name in reversed(self.hooked):
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None:
                registry.remove_hook(name, recurse=False)
        self.hooked.clear()
        self.manager.reset()
        root = getattr(self.denoiser, "_diffusers_hook", None)
        if root is not None:
            root.invalidate_child_registries_cache()


def install(denoiser: nn.Module, config: CacheConfig, num_steps_fn: Callable[[], int | None]) -> CacheHandle:
    """Create the handle and the denoiser-level step hook; the method then registers its block hooks."""
    manager = CacheStateManager(CacheState)
    stats = CacheStats()
    step_hook = StepHook(manager, config, num_steps_fn, stats)
    handle = CacheHandle(denoiser=denoiser, config=config, manager=manager, stats=stats, step_hook=step_hook)
    handle.register(denoiser, step_hook, STEP_HOOK)
    return handle


def handle_of(denoiser: nn.Module) -> CacheHandle | None:
    return getattr(denoiser, HANDLE_ATTR, None)
