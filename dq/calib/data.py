"""Calibration data: the denoiser's inputs at chosen steps, and how calibrators replay them.

This is the one typed object the core calibrates on. Where the samples come from (running a diffusers
pipeline, a store on disk, a test) is decided above the core (`dq.pipelines.calibration`).

A stored sample is one prompt at one step: every positional/keyword tensor the denoiser was called with,
sliced to that prompt's rows (both CFG branches), in float16 on CPU. With a step cache enabled while the
samples were recorded (cache-aware calibration), each sample also keeps that step's cache state, and
`CalibData.replay` pins it while the denoiser runs, so a replay computes exactly what the cache computes
on that step.
A sample can also live on disk (`stored`), read back only while its batch is replayed: block-sequential
calibration spills a block's inputs there when they exceed its memory budget. And a sample can carry a
block's inputs in other states of the model beside the quantized model's (`stream_kwargs`, by stream: FLOAT,
the float model; WEIGHTS, weights quantized and activations float): block-sequential calibration of a method
that reconstructs (BRECQ's asymmetric reconstruction) replays, in each quantization state, the inputs the
whole model in that state gives the block, as it does in memory (`stream_of`).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
from torch import nn

from dq.sizes import nested_bytes

QUANTIZED, WEIGHTS, FLOAT = "quantized", "weights", "float"  # a block's input streams: the model's quantization states
QUANT_STATES = {QUANTIZED: (True, True), WEIGHTS: (True, False), FLOAT: (False, False)}  # stream -> quant_state(weights, acts)


def stream_of(weights: bool, acts: bool) -> str:
    """The stream of a replay under quant_state(weights=..., acts=...) (QUANT_STATES); with float weights it is
    FLOAT whatever the activations (no stream quantizes activations of float weights)."""
    return next(stream for stream, state in QUANT_STATES.items() if state == (weights, weights and acts))


class CacheReplay(Protocol):
    """What a step cache offers calibration: run one denoiser call in a recorded cache state."""

    def pinned(self, state: dict[str, Any]) -> AbstractContextManager[None]: ...


@dataclass
class CalibSample:
    """The denoiser inputs of one prompt at one step (all CFG rows), stored in float16 on CPU.

    cache_state: the step cache's state on this step (step, refresh, reused tensors), None without a cache.
    stream_kwargs: a block's inputs in other quantization states of the model than the quantized one (`kwargs`),
        by stream (FLOAT, WEIGHTS), when block-sequential calibration carries them; else empty.
    """

    step: int
    timestep: float
    prompt: int
    args: tuple
    kwargs: dict
    rows: int
    cache_state: dict[str, Any] | None = None
    stored: Path | None = None  # args, kwargs and stream_kwargs spilled to this file (read back per batch)
    stream_kwargs: dict[str, dict] = field(default_factory=dict)

    def inputs(self) -> tuple[tuple, dict]:
        """(args, kwargs): in memory, or read back from the file the sample was spilled to."""
        return self.all_inputs()[:2]

    def all_inputs(self) -> tuple[tuple, dict, dict[str, dict]]:
        """(args, kwargs, stream_kwargs), in memory or read back from the file the sample was spilled to."""
        if self.stored is None:
            return self.args, self.kwargs, self.stream_kwargs
        return torch.load(self.stored, map_location="cpu", weights_only=True)

    def spill(self, path: Path) -> None:
        """Move the sample's inputs to `path`; they are read back per batch."""
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save((self.args, self.kwargs, self.stream_kwargs), path)
        self.stored, self.args, self.kwargs, self.stream_kwargs = path, (), {}, {}

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
    stream_kwargs: dict[str, dict] = field(default_factory=dict)  # other streams' inputs, where the samples carry them

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

    def groups(self, batch_size: int, by_step: bool = False, max_samples: int | None = None) -> list[list[CalibSample]]:
        """The samples of every batch `batches` collates, in its order.

        by_step: every batch holds one step only (per-timestep statistics, and quantizers whose
        timestep group must be one per call). Cached steps of a step cache are always batched per
        step, apart from refresh steps: one denoiser call replays one cache state.
        """
        pool = self.samples if max_samples is None else _spread(self.samples, max_samples)
        keyed: dict[tuple[int, bool], list[CalibSample]] = {}
        for s in pool:
            keyed.setdefault((s.step if by_step or s.cached else -1, s.cached), []).append(s)
        return [keyed[key][i : i + batch_size] for key in sorted(keyed) for i in range(0, len(keyed[key]), batch_size)]

    def batches(self, batch_size: int, by_step: bool = False, max_samples: int | None = None) -> Iterator[CalibBatch]:
        """Collated batches of up to `batch_size` samples (float16 on CPU), as `groups` forms them."""
        for chunk in self.groups(batch_size, by_step, max_samples):
            yield collate_samples(chunk)

    def replay(self, denoiser: nn.Module, batch: CalibBatch, stream: str = QUANTIZED) -> Any:
        """Call the denoiser on a batch, on its device and dtype, in the batch's cache state.

        stream: the quantization state the caller runs the denoiser in (`quant_state`; `stream_of` names it):
        the batch's inputs in that state where it carries them (block-sequential calibration), else `kwargs`.
        """
        p = next(denoiser.parameters())
        kwargs = batch.stream_kwargs.get(stream, batch.kwargs)
        args, kwargs = to_device(batch.args, p.device, p.dtype), to_device(kwargs, p.device, p.dtype)
        state = batch.cache_state
        pinned = nullcontext() if self.cache is None or state is None else self.cache.pinned(to_device(state, p.device, p.dtype))
        with pinned:
            return denoiser(*args, **kwargs)


def collate_samples(chunk: list[CalibSample]) -> CalibBatch:
    """One batch of samples collated along rows (spilled samples read back)."""
    rows = [s.rows for s in chunk]
    state = None if chunk[0].cache_state is None else collate([s.cache_state for s in chunk], rows)
    inputs = [s.all_inputs() for s in chunk]
    streams = {name: collate([st[name] for _, _, st in inputs], rows) for name in inputs[0][2]}
    return CalibBatch(chunk, collate([a for a, _, _ in inputs], rows), collate([k for _, k, _ in inputs], rows), state, streams)


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


def split(obj: Any, rows: list[int]) -> list[Any]:
    """The per-sample structures of a collated one (collate's inverse): tensors with a row dimension (all the
    rows) are cut along it into compact copies, everything else is shared."""
    if isinstance(obj, torch.Tensor):
        if obj.dim() > 0 and obj.shape[0] == sum(rows):
            return [part.clone() for part in obj.split(rows)]
        return [obj] * len(rows)
    if isinstance(obj, (tuple, list)):
        parts = [split(o, rows) for o in obj]
        return [type(obj)(p[i] for p in parts) for i in range(len(rows))]
    if isinstance(obj, dict):
        parts = {k: split(v, rows) for k, v in obj.items()}
        return [{k: p[i] for k, p in parts.items()} for i in range(len(rows))]
    return [obj] * len(rows)


def to_device(obj: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move stored tensors to `device`, floating ones to `dtype`."""
    return map_tensors(obj, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype))
