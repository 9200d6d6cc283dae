"""Public entry points: enable_cache / disable_cache, variant parsing for eval, stats and trajectories."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Iterator

import torch
from torch import nn

from dq.cache.config import CACHE_METHODS, CacheConfig, method_for
from dq.cache.handle import HANDLE_ATTR, CacheHandle, Recorder, handle_of, install
from dq.cache.state import CacheStats, replay_state
from dq.errors import DQError
from dq.nn.denoiser import find_denoiser

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline


def _num_steps_fn(pipe: DiffusionPipeline) -> Callable[[], int | None]:
    scheduler = getattr(pipe, "scheduler", None)

    def num_steps() -> int | None:
        timesteps = getattr(scheduler, "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    return num_steps


def make_config(config_or_name: CacheConfig | str, **overrides: Any) -> CacheConfig:
    """A cache config from a registered method name (with field overrides) or a config object.

    Example:
        >>> make_config("deepcache", interval=5, branch=0)
        DeepCacheConfig(interval=5, ..., branch=0)
    """
    if isinstance(config_or_name, CacheConfig):
        return dataclasses.replace(config_or_name, **overrides) if overrides else config_or_name
    if not isinstance(config_or_name, str):
        raise DQError(f"expected a cache method name or config, got {type(config_or_name).__name__}.")
    cls = CACHE_METHODS.get(config_or_name).config_cls
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise DQError(f"{config_or_name}: unknown option(s) {unknown}; allowed: {sorted(names)}.")
    return cls(**overrides)


def enable_cache(pipe: DiffusionPipeline, config_or_name: CacheConfig | str = "deepcache", **overrides: Any) -> CacheHandle:
    """Enable a step cache on a pipeline's denoiser, as diffusers ModelHooks.

    Args:
        pipe: a diffusers pipeline (or its denoiser). Works on quantized denoisers and with LoRA loaded.
        config_or_name: a config (DeepCacheConfig, BlockCacheConfig, FirstBlockCacheConfig, CacheQuantConfig)
            or a registered name: "deepcache", "block-cache", "first-block-cache", "cachequant".
        overrides: config fields when a name is given (interval=3, branch=0, threshold=0.1, ...).

    Returns the CacheHandle (hooks, state, `stats`). State resets at the start of every pipeline call.

    Example:
        >>> import dq
        >>> dq.enable_cache(pipe, "deepcache", interval=3, branch=0)
        >>> image = pipe("a corgi").images[0]
        >>> dq.disable_cache(pipe)
    """
    config = make_config(config_or_name, **overrides)
    denoiser = find_denoiser(pipe)
    if handle_of(denoiser) is not None:
        raise DQError(
            f"a {handle_of(denoiser).config.method} cache is already enabled on {type(denoiser).__name__}; "
            "call dq.disable_cache(pipe) first."
        )
    method = method_for(config)
    handle = install(denoiser, config, _num_steps_fn(pipe))
    try:
        method.apply(denoiser, config, handle)
    except BaseException:
        handle.remove()
        raise
    setattr(denoiser, HANDLE_ATTR, handle)
    return handle


def disable_cache(pipe: DiffusionPipeline) -> None:
    """Remove dq's cache hooks from the pipeline's denoiser; the uncached forward is restored exactly.

    Example:
        >>> dq.disable_cache(pipe)
    """
    denoiser = find_denoiser(pipe)
    handle = handle_of(denoiser)
    if handle is None:
        return
    handle.remove()
    delattr(denoiser, HANDLE_ATTR)


def cache_stats(pipe: DiffusionPipeline) -> CacheStats:
    """Evaluation counters of the enabled cache (DQError if none is enabled)."""
    return _handle(pipe).stats


def _handle(pipe: DiffusionPipeline) -> CacheHandle:
    handle = handle_of(find_denoiser(pipe))
    if handle is None:
        raise DQError("no dq cache is enabled on this pipeline; call dq.enable_cache(pipe, ...) first.")
    return handle


@contextlib.contextmanager
def recording(pipe: DiffusionPipeline, recorder: Recorder, every_step: bool = False) -> Iterator[CacheHandle]:
    """Within the block, call `recorder(step, feature)` whenever the cache computes its feature.

    every_step=True refreshes at every step (the uncached model), which records the full trajectory F_t.
    """
    handle = _handle(pipe)
    old = handle.recorder, handle.step_hook.force_refresh
    handle.recorder, handle.step_hook.force_refresh = recorder, every_step
    try:
        yield handle
    finally:
        handle.recorder, handle.step_hook.force_refresh = old


@dataclasses.dataclass
class CalibrationReplay:
    """Lets calibration see what the model sees on cached steps (cache-aware calibration).

    While the FP pipeline runs for calibration data, `capture()` after each denoiser call returns that
    call's cache state (step, refresh or cached, the reused tensors); the sample stores it, and replaying
    the sample inside `pinned(state)` runs the denoiser in that state, so the layers that read the cached
    feature see it, and the skipped layers are not run, exactly as at inference.
    """

    handle: CacheHandle
    denoiser: nn.Module

    def capture(self) -> dict[str, Any]:
        return replay_state(self.handle.state())

    @contextlib.contextmanager
    def pinned(self, state: dict[str, Any]) -> Iterator[None]:
        """Denoiser calls within the block replay the recorded cache `state` (in the cache enabled now)."""
        handle = handle_of(self.denoiser)
        if handle is None:
            raise DQError(
                "the calibration data was recorded with a step cache that is no longer enabled; enable it again "
                f"(dq.enable_cache(pipe, {self.handle.config.method!r})) before calibrating on it."
            )
        hook = handle.step_hook
        hook.pinned = state
        try:
            yield
        finally:
            hook.pinned = None


def calibration_replay(pipe: DiffusionPipeline) -> CalibrationReplay | None:
    """The replay of the cache enabled on the pipeline's denoiser, or None when none is enabled.

    DQError for an adaptive cache (first-block-cache): whether a step is cached depends on the quantized
    model's own features, so recorded FP decisions cannot stand for it.
    """
    handle = handle_of(find_denoiser(pipe))
    if handle is None:
        return None
    if not handle.config.replayable:
        raise DQError(
            f"the {handle.config.method} cache decides at run time which steps to skip, so calibration cannot "
            "replay its steps; call dq.disable_cache(pipe) before dq.quantize and enable it afterwards."
        )
    return CalibrationReplay(handle, find_denoiser(pipe))


def record_trajectory(pipe: DiffusionPipeline, calls: list[dict[str, Any]]) -> list[list[torch.Tensor]]:
    """Run `pipe(**call)` for each call with every step refreshed; return the feature per call and step.

    Needs an enabled cache (it defines which feature is cached). Features are stored on CPU in float32.
    """
    trajectories: list[list[torch.Tensor]] = []
    for call in calls:
        steps: dict[int, torch.Tensor] = {}
        with recording(pipe, lambda s, f: steps.__setitem__(s, f.float().cpu()), every_step=True):
            pipe(**call)
        trajectories.append([steps[s] for s in sorted(steps)])
    return trajectories


def parse_variant(variant: str) -> tuple[str | None, CacheConfig | None]:
    """Split an eval variant "recipe+cache[:k=v,...]" into (recipe or None, cache config or None).

    Example:
        >>> parse_variant("svdquant-w4a4+deepcache:interval=5,branch=0")
        ('svdquant-w4a4', DeepCacheConfig(interval=5, ..., branch=0))
        >>> parse_variant("fp+block-cache")
        (None, BlockCacheConfig(...))
    """
    head, plus, tail = variant.partition("+")
    recipe = None if head in ("", "fp", "fp16", "bf16", "fp32") else head
    if not plus:
        return recipe, None
    if "+" in tail:
        raise DQError(f"variant {variant!r} names more than one cache; dq enables one cache method at a time.")
    name, _, opts = tail.partition(":")
    overrides: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if not eq:
            raise DQError(f"variant {variant!r}: cache option {item!r} is not key=value.")
        overrides[key.strip()] = _literal(value.strip())
    return recipe, make_config(name, **overrides)


def _literal(value: str) -> Any:
    if "/" in value:
        return tuple(_literal(v) for v in value.split("/"))
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)
