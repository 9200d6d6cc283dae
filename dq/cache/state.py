"""Step tracking shared by every dq cache method, built on diffusers' ModelHook / StateManager.

One `StepHook` sits on the denoiser. Before each denoiser call it works out which denoising step this is
and whether it is a refresh step; the block hooks of the method read that from the shared state.

A new pipeline call is detected without touching the pipeline: the denoising timestep never increases
within a call, so a timestep >= the previous one, or a different latent shape (resolution, batch size),
starts a new call and drops every cached tensor. Pipelines that set `cache_context` (Wan, Flux) key the
state by context name ("cond"/"uncond"); UNet and PixArt pipelines set none and use one default state.
`maybe_free_model_hooks` also resets the state at the end of calls of models that are CacheMixins.

Block hooks act only inside a denoiser call (`CacheState.active`); a block called on its own (as block
reconstruction does) runs uncached. Calibration replays a recorded step by handing the step's cache state
(see `replay_state`) to `StepHook.pin` before the denoiser call; the hook applies it to that one call.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch
from diffusers.hooks.hooks import BaseState, ModelHook, StateManager
from torch import nn

from dq.errors import DQError

if TYPE_CHECKING:
    from dq.cache.config import CacheConfig

DEFAULT_CONTEXT = "default"


def replay_state(state: "CacheState") -> dict[str, Any]:
    """What a calibration sample must carry to replay this denoiser call as the cache ran it: the step,
    whether it refreshed, and (on a cached step) the reused tensors."""
    return {"step": state.step, "refresh": state.refresh, "outputs": {} if state.refresh else dict(state.outputs)}


class CacheState(BaseState):
    """Per-context state of one cache: step position and the cached tensors."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, *args: Any, **kwargs: Any) -> None:
        self.step = -1
        self.last_timestep: float | None = None
        self.shape: tuple[int, ...] | None = None
        self.num_steps: int | None = None
        self.refresh_steps: frozenset[int] = frozenset()
        self.refresh = True
        self.active = False  # inside a denoiser call
        self.replaying = False  # a calibration replay pinned this call's state
        self.outputs: dict[str, Any] = {}
        self.extra: dict[str, Any] = {}


class CacheStateManager(StateManager):
    """A StateManager that falls back to one default context when the pipeline sets no cache_context."""

    def get_state(self) -> CacheState:
        name = self._context.name if self._context is not None else DEFAULT_CONTEXT
        if name not in self._state_cache:
            self._state_cache[name] = self._state_cls(*self._init_args, **self._init_kwargs)
        return self._state_cache[name]

    @property
    def context_step_index(self) -> int | None:
        return None if self._context is None else self._context.step_index

    @property
    def context_num_steps(self) -> int | None:
        return None if self._context is None else self._context.num_inference_steps


@dataclass
class CacheStats:
    """Evaluation counters: `evaluated[kind]` / `skipped[kind]` units, refresh and cached steps."""

    evaluated: dict[str, int] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    refresh_steps: int = 0
    cached_steps: int = 0

    def count(self, kind: str, ran: bool, n: int = 1) -> None:
        table = self.evaluated if ran else self.skipped
        table[kind] = table.get(kind, 0) + n

    def evaluation_ratio(self, kind: str) -> float:
        """Fraction of `kind` units actually evaluated (1.0 = no saving)."""
        ran, skip = self.evaluated.get(kind, 0), self.skipped.get(kind, 0)
        return ran / max(ran + skip, 1)

    def reset(self) -> None:
        self.evaluated.clear()
        self.skipped.clear()
        self.refresh_steps = self.cached_steps = 0


def _argument_getter(module: nn.Module) -> Callable[[tuple, dict, str], Any]:
    names = list(inspect.signature(type(module).forward).parameters)[1:]

    def get(args: tuple, kwargs: dict, name: str) -> Any:
        if name in kwargs:
            return kwargs[name]
        if name == "__first__":
            return args[0] if args else kwargs.get(names[0])
        i = names.index(name) if name in names else None
        return args[i] if i is not None and i < len(args) else None

    return get


class StepHook(ModelHook):
    """Denoiser-level hook: detects new calls, counts steps, decides refresh vs cached per step."""

    _is_stateful = True

    def __init__(self, manager: CacheStateManager, config: CacheConfig, num_steps_fn: Callable[[], int | None],
                 stats: CacheStats) -> None:
        super().__init__()
        self.manager = manager
        self.config = config
        self.num_steps_fn = num_steps_fn
        self.stats = stats
        self.force_refresh = False
        self.pinned: dict[str, Any] | None = None  # the recorded state the next call replays
        self._get = None

    def initialize_hook(self, module: nn.Module) -> nn.Module:
        self._get = _argument_getter(module)
        return module

    def pre_forward(self, module: nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        state = self.manager.get_state()
        if self.pinned is not None:
            self._replay(state, self.pinned)
            return args, kwargs
        sample = self._get(args, kwargs, "__first__")
        shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else None
        t = self._get(args, kwargs, "timestep")
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (float(t) if t is not None else None)
        index = self.manager.context_step_index
        new_call = (
            state.step < 0
            or shape != state.shape
            or (index is not None and index <= state.step)
            or (index is None and t is not None and state.last_timestep is not None and t >= state.last_timestep)
        )
        if new_call:
            state.reset()
            state.shape = shape
            state.num_steps = self.manager.context_num_steps or self.config.num_inference_steps or self.num_steps_fn()
            if state.num_steps is None and self.config.needs_num_steps:
                raise DQError(
                    "this cache schedule depends on the number of denoising steps, which could not be read from "
                    "the pipeline; set num_inference_steps in the cache config."
                )
            state.refresh_steps = self.config.steps_for(state.num_steps) if state.num_steps else frozenset()
        state.step = index if index is not None else state.step + 1
        state.last_timestep = t
        if state.num_steps is not None and state.step >= state.num_steps:
            raise DQError(
                f"the denoiser was called for step {state.step} but the cache schedule covers "
                f"{state.num_steps} steps; set num_inference_steps in the cache config to the real step count."
            )
        state.refresh = self.force_refresh or not state.outputs or self._scheduled(state)
        state.active = True
        if state.refresh:
            self.stats.refresh_steps += 1
        else:
            self.stats.cached_steps += 1
        return args, kwargs

    def _replay(self, state: CacheState, replay: dict[str, Any]) -> None:
        """Set the state a recorded call ran with (see replay_state); counters are left alone."""
        state.reset()
        state.step, state.refresh, state.outputs = replay["step"], replay["refresh"], dict(replay["outputs"])
        state.active = state.replaying = True

    def post_forward(self, module: nn.Module, output: Any) -> Any:
        state = self.manager.get_state()
        if state.replaying:
            state.reset()  # a replayed step belongs to no pipeline call
        state.active = False
        return output

    def _scheduled(self, state: CacheState) -> bool:
        if state.num_steps is not None:
            return state.step in state.refresh_steps
        c = self.config  # uniform schedule without a known step count
        return state.step < c.start or (state.step - c.start) % c.interval == 0

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.manager.reset()
        return module
