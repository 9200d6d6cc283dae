"""The base of every cache config: the refresh schedule, JSON round trip, and the method registry."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, NamedTuple

from torch import nn

from dq.cache.schedule import quadratic_schedule, uniform_schedule, validate_refresh_steps
from dq.errors import DQError
from dq.registry import Registry

SCHEDULES = ("uniform", "quadratic", "explicit")


@dataclass
class CacheConfig:
    """Fields every step-schedule cache shares.

    Args:
        interval: N, refresh every N steps (1 = no caching).
        schedule: "uniform" ((step - start) % N == 0), "quadratic" (DeepCache non-uniform, around `center`
            with exponent `power`) or "explicit" (`refresh_steps`, e.g. from CacheQuant's DP).
        start: uniform schedule only; steps before it always refresh.
        refresh_steps: the explicit refresh steps (0-based, denoising order).
        num_inference_steps: the step count the schedule is built for; None = read it from the pipeline's
            scheduler at the first step of each call.
    """

    method: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    # Steps are cached on a fixed schedule, so calibration can replay them (see dq.cache.calibration_replay).
    replayable: ClassVar[bool] = True

    interval: int = 3
    schedule: str = "uniform"
    start: int = 0
    center: int = 15
    power: float = 1.4
    refresh_steps: tuple[int, ...] | None = None
    num_inference_steps: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise DQError(f"unknown cache schedule {self.schedule!r}; expected one of {', '.join(SCHEDULES)}.")
        if int(self.interval) < 1:
            raise DQError(f"the cache interval must be >= 1 (1 = no caching), got {self.interval}.")
        if self.refresh_steps is not None:
            self.refresh_steps = tuple(int(s) for s in self.refresh_steps)
            self.schedule = "explicit"
        elif self.schedule == "explicit":
            raise DQError("schedule='explicit' needs refresh_steps (a list of step indices starting at 0).")

    def steps_for(self, num_steps: int) -> frozenset[int]:
        """The refresh steps for a call of `num_steps` steps; raises DQError if they do not fit."""
        if self.schedule == "uniform":
            return frozenset(uniform_schedule(num_steps, self.interval, self.start))
        if self.schedule == "quadratic":
            return frozenset(quadratic_schedule(num_steps, self.interval, self.center, self.power))
        return frozenset(validate_refresh_steps(self.refresh_steps, num_steps))

    @property
    def needs_num_steps(self) -> bool:
        return self.schedule != "uniform"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict with the method name and a version, for save/reload and the eval report."""
        data = {"method": self.method, "version": 1}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("tensor"):
                continue
            data[f.name] = list(value) if isinstance(value, tuple) else value
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheConfig":
        """Inverse of to_dict; unknown keys raise a DQError naming them."""
        data = {k: v for k, v in data.items() if k not in ("method", "version")}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise DQError(f"{cls.__name__}: unknown field(s) {unknown}; allowed: {sorted(names)}.")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


class CacheMethod(NamedTuple):
    """A registered cache method: its config class and `apply(denoiser, config, handle) -> None`."""

    config_cls: type[CacheConfig]
    apply: Callable[[nn.Module, CacheConfig, Any], Any]


CACHE_METHODS: Registry[CacheMethod] = Registry("cache method")


def register_cache_method(config_cls: type[CacheConfig]) -> Callable:
    """Decorator for `apply_<method>(denoiser, config, handle)`: registers it under `config_cls.method`."""

    def decorator(fn: Callable) -> Callable:
        CACHE_METHODS.add(config_cls.method, CacheMethod(config_cls, fn))
        return fn

    return decorator


def method_for(config: CacheConfig) -> CacheMethod:
    for name in CACHE_METHODS:
        entry = CACHE_METHODS.get(name)
        if type(config) is entry.config_cls:
            return entry
    raise DQError(f"{type(config).__name__} is not a registered cache config; registered: {CACHE_METHODS.names()}.")
