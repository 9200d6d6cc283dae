"""Calibration data: the denoiser's inputs at chosen steps, and how calibrators replay them.

This is the one typed object the core calibrates on. Where the samples come from (running a diffusers
pipeline, a store on disk, a test) is decided above the core (`dq.pipelines.calibration`).

A stored sample is one prompt at one step: every positional/keyword tensor the denoiser was called with,
sliced to that prompt's rows (both CFG branches), in float16 on CPU. With a step cache enabled while the
samples were recorded (cache-aware calibration), each sample also keeps that step's cache state, and
`CalibData.replay` pins it while the denoiser runs, so a replay computes exactly what the cache computes
on that step.
A sample can also live on disk (`stored`), read back only while its batch is replayed: block-sequential
calibration spills a block's inputs there when they exceed its memory budget. And a sample can carry the
float model's inputs beside the quantized model's (`float_kwargs`): block-sequential calibration of a method
whose targets are the float model's outputs (BRECQ's asymmetric reconstruction) replays those for its targets.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from dq.sizes import nested_bytes


class CacheReplay(Protocol):
    """What a step cache offers calibration: run one denoiser call in a recorded cache state."""

    def pinned(self, state: dict[str, Any]) -> AbstractContextManager[None]: ...


@dataclass
class CalibSample:
    """The denoiser inputs of one prompt at one step (all CFG rows), stored in float16 on CPU.

    cache_state: the step cache's state on this step (step, refresh, reused tensors), None without a cache.
    float_kwargs: the float model's inputs where they differ from the quantized model's (`kwargs`): a block's
        inputs in the float model, when block-sequential calibration carries both streams; else None.
    """

    step: int
    timestep: float
    prompt: int
    args: tuple
    kwargs: dict
    rows: int
    cache_state: dict[str, Any] | None = None
    stored: Path | None = None  # args, kwargs and float_kwargs spilled to this file (read back per batch)
    float_kwargs: dict | None = None

    def inputs(self) -> tuple[tuple, dict]:
        """(args, kwargs): in memory, or read back from the file the sample was spilled to."""
        return self.all_inputs()[:2]

    def all_inputs(self) -> tuple[tuple, dict, dict | None]:
        """(args, kwargs, float_kwargs), in memory or read back from the file the sample was spilled to."""
        if self.stored is None:
            return self.args, self.kwargs, self.float_kwargs
        return torch.load(self.stored, map_location="cpu", weights_only=True)

    def spill(self, path: Path) -> None:
        """Move the sample's inputs to `path`; they are read back per batch."""
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((self.args, self.kwargs, self.float_kwargs), path)
        self.stored, self.args, self.kwargs, self.float_kwargs = path, (), {}, None

    @property
    def cached(self) -> bool:
        """A cached (not refreshed) step of the step cache the samples were recorded with."""
        return self.cache_state is not None and not self.cache_state["refresh"]


@dataclass
class CalibBatch:
    """Samples collated along rows: the denoiser's args and kwargs, and their shared cache state."""

    samples: list[CalibSample]
    args: tuple
    kwargs: dict
    cache_state: dict[str, Any] | None
    float_kwargs: dict | None = None  # the float model's inputs, where the samples carry them

    @property
    def timesteps(self) -> torch.Tensor:
        """The timestep of every row, in row order."""
        return torch.cat([torch.full((s.rows,), s.timestep) for s in self.samples])


@dataclass
class CalibData:
    """Collected calibration samples, the schedule they came from, and the cache that recorded them."""

    samples: list[CalibSample]
    schedule: list[float]  # timestep of every executed step, in order
    drawn: list[float] = field(default_factory=list)  # NDTC: the drawn t of each prompt
    cache: CacheReplay | None = None

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def steps(self) -> list[int]:
        """Distinct step indices present, ascending."""
        return sorted({s.step for s in self.samples})

    @property
    def nbytes(self) -> int:
        return sum(nested_bytes(s.all_inputs()) for s in self.samples)

    def rows(self) -> int:
        return sum(s.rows for s in self.samples)

    def subset(self, samples: list[CalibSample]) -> "CalibData":
        """The same data restricted to `samples` (schedule and cache kept)."""
        return CalibData(samples, self.schedule, self.drawn, self.cache)

    def batches(self, batch_size: int, by_step: bool = False, max_samples: int | None = None) -> Iterator[CalibBatch]:
        """Collated batches of up to `batch_size` samples (float16 on CPU).

        by_step: every batch holds one step only (per-timestep statistics, and quantizers whose
        timestep group must be one per call). Cached steps of a step cache are always batched per
        step, apart from refresh steps: one denoiser call replays one cache state.
        """
        pool = self.samples if max_samples is None else _spread(self.samples, max_samples)
        keyed: dict[tuple[int, bool], list[CalibSample]] = {}
        for s in pool:
            keyed.setdefault((s.step if by_step or s.cached else -1, s.cached), []).append(s)
        for key in sorted(keyed):
            group = keyed[key]
            for i in range(0, len(group), batch_size):
                chunk = group[i : i + batch_size]
                rows = [s.rows for s in chunk]
                state = None if chunk[0].cache_state is None else collate([s.cache_state for s in chunk], rows)
                inputs = [s.all_inputs() for s in chunk]
                floats = None if inputs[0][2] is None else collate([f for _, _, f in inputs], rows)
                yield CalibBatch(chunk, collate([a for a, _, _ in inputs], rows), collate([k for _, k, _ in inputs], rows), state, floats)

    def replay(self, denoiser: nn.Module, batch: CalibBatch, float_model: bool = False) -> Any:
        """Call the denoiser on a batch, on its device and dtype, in the batch's cache state.

        float_model: with the float model's inputs where the batch carries them (the float targets of
        block-sequential calibration); the caller switches the quantizers off (`quant_state`).
        """
        p = next(denoiser.parameters())
        kwargs = batch.float_kwargs if float_model and batch.float_kwargs is not None else batch.kwargs
        args, kwargs = to_device(batch.args, p.device, p.dtype), to_device(kwargs, p.device, p.dtype)
        state = batch.cache_state
        pinned = nullcontext() if self.cache is None or state is None else self.cache.pinned(to_device(state, p.device, p.dtype))
        with pinned:
            return denoiser(*args, **kwargs)


def _spread(samples: list[CalibSample], n: int) -> list[CalibSample]:
    """n samples spread evenly over the list (which is ordered by prompt, then step)."""
    if n >= len(samples):
        return samples
    idx = torch.linspace(0, len(samples) - 1, n).round().long().tolist()
    return [samples[i] for i in idx]


def map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`obj` with `fn` applied to every tensor inside nested tuples, lists and dicts."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def collate(items: list[Any], rows: list[int]) -> Any:
    """Concatenate per-sample structures along rows; tensors without a row dimension are shared."""
    first = items[0]
    if isinstance(first, torch.Tensor):
        if first.dim() > 0 and first.shape[0] == rows[0]:
            return torch.cat(items, dim=0)
        return first
    if isinstance(first, tuple):
        return tuple(collate([it[i] for it in items], rows) for i in range(len(first)))
    if isinstance(first, list):
        return [collate([it[i] for it in items], rows) for i in range(len(first))]
    if isinstance(first, dict):
        return {k: collate([it[k] for it in items], rows) for k in first}
    return first


def to_device(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move stored tensors to `device`, floating ones to `dtype`."""
    return map_tensors(obj, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
