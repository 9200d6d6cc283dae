"""Speed and memory of a pipeline: latency per image and per denoiser step, peak memory, denoiser weight bytes.

``timed_call`` is the one timed pipeline call (eval, the app and ``measure_pipeline`` use it), and ``warm_up``
the one untimed call before it. Timing uses CUDA events for CUDA work and ``time.perf_counter`` on CPU, always
after warm-up and reported as medians. Peak memory is the CUDA caching allocator's ``max_memory_allocated`` on GPU and the process peak RSS
(``VmHWM``, reset through ``/proc/self/clear_refs``) on CPU. Speed is measured, never asserted in tests.
"""

from __future__ import annotations

import logging
import platform
import resource
import statistics
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from dq.sizes import module_bytes

logger = logging.getLogger(__name__)


class StepTimer:
    """Count and time the forward calls of a denoiser while the context is active.

    Each pipeline step calls the denoiser once (classifier-free guidance is batched into that call), so
    ``calls`` counts steps for diffusers pipelines. Calls on CUDA tensors are timed with CUDA events, others with
    ``time.perf_counter``.

    Args:
        denoiser: The module whose forward calls are counted.

    Example:
        >>> with StepTimer(pipe.transformer) as timer:
        ...     pipe("a corgi", num_inference_steps=20)
        >>> timer.calls, statistics.median(timer.durations())
        (20, 0.041)
    """

    def __init__(self, denoiser: nn.Module) -> None:
        self.denoiser = denoiser
        self._starts: list[Any] = []
        self._ends: list[Any] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def calls(self) -> int:
        """Number of completed forward calls."""
        return len(self._ends)

    def durations(self) -> list[float]:
        """Seconds per completed forward call, in call order."""
        if any(isinstance(start, torch.cuda.Event) for start in self._starts):
            torch.cuda.synchronize()
        return [
            start.elapsed_time(end) / 1000 if isinstance(start, torch.cuda.Event) else end - start
            for start, end in zip(self._starts, self._ends)
        ]

    def reset(self) -> None:
        """Forget the recorded calls."""
        self._starts.clear()
        self._ends.clear()

    def __enter__(self) -> "StepTimer":
        self._handles = [
            self.denoiser.register_forward_pre_hook(self._pre_forward, with_kwargs=True),
            self.denoiser.register_forward_hook(self._post_forward),
        ]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if _on_cuda(args, kwargs):
            start = torch.cuda.Event(enable_timing=True)
            start.record()
        else:
            start = time.perf_counter()
        self._starts.append(start)

    def _post_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        start = self._starts[-1]
        if isinstance(start, torch.cuda.Event):
            end = torch.cuda.Event(enable_timing=True)
            end.record()
        else:
            end = time.perf_counter()
        self._ends.append(end)


def _on_cuda(args: tuple, kwargs: dict) -> bool:
    """Whether the first tensor argument of a call lives on a CUDA device."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.is_cuda
    return False


@dataclass
class MemoryPeak:
    """Peak memory measured over a ``peak_memory`` block; ``source`` says what was measured."""

    bytes: Optional[int] = None
    source: str = ""


@contextmanager
def peak_memory(device: torch.device | str) -> Iterator[MemoryPeak]:
    """Measure peak memory over the block: CUDA allocator peak on a CUDA device, process peak RSS on CPU.

    Args:
        device: The device the pipeline runs on.

    Example:
        >>> with peak_memory("cuda") as peak:
        ...     pipe("a corgi")
        >>> peak.bytes / 2**30
    """
    device = torch.device(device)
    result = MemoryPeak()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.bytes, result.source = torch.cuda.max_memory_allocated(device), "cuda_max_memory_allocated"
        return
    lifetime = not _reset_rss_peak()
    yield result
    result.bytes = _rss_peak()
    result.source = "process_peak_rss_since_start" if lifetime else "process_peak_rss"


_warned_rss = False


def _reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS counter (Linux); log once and return False where that is not possible."""
    global _warned_rss
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError as error:
        if not _warned_rss:
            logger.warning("cannot reset peak RSS (%s): CPU peak memory covers the whole process lifetime", error)
            _warned_rss = True
        return False


def _rss_peak() -> int:
    """Peak resident set size of this process in bytes."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def warm_up(pipe: Callable[..., Any], **kwargs: Any) -> None:
    """One untimed 1-step call with the arguments of the calls to be timed (same batch shape).

    Allocator growth, kernel selection and autotuning happen here instead of in the first timed call.
    """
    pipe(**{**kwargs, "num_inference_steps": 1})


@dataclass
class TimedCall:
    """One timed call: its output, wall seconds, the denoiser's forward calls and the peak memory over it."""

    output: Any
    seconds: float
    step_seconds: list[float]
    peak: MemoryPeak

    @property
    def denoiser_calls(self) -> int:
        """Number of denoiser forward calls (the steps, for pipelines that batch classifier-free guidance)."""
        return len(self.step_seconds)


def timed_call(run: Callable[[], Any], denoiser: nn.Module, device: torch.device | str) -> TimedCall:
    """Call ``run()`` once, synchronized, timing it and each denoiser forward and measuring peak memory.

    Args:
        run: One pipeline call, e.g. ``lambda: pipe(prompts, num_inference_steps=20)``.
        denoiser: The pipeline's denoiser, whose forward calls are the steps.
        device: Where the pipeline runs.

    Example:
        >>> call = timed_call(lambda: pipe("a corgi", num_inference_steps=20), pipe.unet, "cuda")
        >>> call.seconds, call.denoiser_calls, call.peak.bytes
    """
    device = torch.device(device)
    with peak_memory(device) as peak, StepTimer(denoiser) as timer:
        _synchronize(device)
        start = time.perf_counter()
        output = run()
        _synchronize(device)
        seconds = time.perf_counter() - start
    return TimedCall(output, seconds, timer.durations(), peak)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class PerfResult:
    """Speed and memory of one pipeline configuration; all times in seconds, medians after warm-up."""

    latency_per_image_s: float
    latency_per_step_s: Optional[float]
    steps_per_call: float
    peak_memory_bytes: Optional[int]
    memory_source: str
    weight_bytes: int
    device: str
    warmup: int
    repeats: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)


def measure_pipeline(
    run: Callable[[], Any],
    denoiser: nn.Module,
    images_per_call: int = 1,
    warmup: int = 1,
    repeats: int = 3,
    device: Optional[torch.device | str] = None,
) -> PerfResult:
    """Time a pipeline call after warm-up and measure its peak memory and the denoiser's weight bytes.

    Args:
        run: One pipeline call with fixed arguments, e.g. ``lambda: pipe(prompts, num_inference_steps=20)``.
        denoiser: The pipeline's denoiser, whose forward calls are the steps.
        images_per_call: Images one call produces (batch size times ``num_images_per_prompt``).
        warmup: Untimed calls first (compilation, autotuning, allocator growth).
        repeats: Timed calls; latencies are their medians.
        device: Where the pipeline runs; defaults to the denoiser's device.

    Example:
        >>> result = measure_pipeline(lambda: pipe("a corgi", num_inference_steps=20), pipe.transformer)
        >>> result.to_dict()
    """
    device = torch.device(device) if device is not None else next(denoiser.parameters()).device
    for _ in range(warmup):
        run()
    calls = [timed_call(run, denoiser, device) for _ in range(repeats)]
    steps = [s for call in calls for s in call.step_seconds]
    peaks = [call.peak.bytes for call in calls if call.peak.bytes is not None]
    return PerfResult(
        latency_per_image_s=statistics.median(call.seconds for call in calls) / images_per_call,
        latency_per_step_s=statistics.median(steps) if steps else None,
        steps_per_call=len(steps) / repeats,
        peak_memory_bytes=max(peaks) if peaks else None,
        memory_source=calls[0].peak.source,
        weight_bytes=module_bytes(denoiser),
        device=str(device),
        warmup=warmup,
        repeats=repeats,
    )


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for benchmark tables; the platform's machine type elsewhere."""
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
