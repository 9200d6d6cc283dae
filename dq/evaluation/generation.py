"""Seeded paired generation: every variant draws image ``i`` of prompt ``i`` from the seed ``seed + i``.

Prompts are cut into fixed batches (slices of ``batch_size`` of the prompt list). A batch is generated only
when one of its images is missing on disk, and only the missing images are written, each atomically; so a
re-run regenerates nothing and a killed run loses no finished image. Batches, not prompts, are shared between
processes, so one process and N processes make the same pipeline calls and the same images.

Timing protocol: before its first timed batch of a variant, each process makes one untimed 1-step call of the
same batch shape (warm-up: allocator growth, kernel selection, autotuning). Then every batch is timed as it is
generated, and its time, per-step times and peak memory go to ``RUN/perf/<variant>/<batch>.json`` next to the
images. A resumed run therefore reports the timings measured when the images were made, without regenerating.
"""

from __future__ import annotations

import gc
import inspect
import logging
import statistics
import time
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

import dq
from dq.evaluation.rundir import RunDir, read_json, write_frames, write_json, write_png
from dq.evaluation.variants import Variant
from dq.metrics.perf import timed_call, warm_up
from dq.nn.denoiser import find_denoiser
from dq.sizes import module_bytes

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One image to generate: prompt index, prompt, seed."""

    index: int
    prompt: str
    seed: int


def make_items(prompts: list[str], seed: int) -> list[Item]:
    """Image ``i`` is prompt ``i`` with seed ``seed + i``."""
    return [Item(i, p, seed + i) for i, p in enumerate(prompts)]


def make_batches(items: list[Item], batch_size: int) -> list[list[Item]]:
    """Fixed consecutive slices of the items; batch ``b`` is the same whatever the number of processes."""
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def is_video_pipeline(pipe: DiffusionPipeline) -> bool:
    """Whether the pipeline makes clips (its ``__call__`` takes ``num_frames``)."""
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def call_arguments(pipe: DiffusionPipeline, steps: int, guidance: Optional[float], overrides: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments every generation call shares (prompts and generators are added per batch).

    Args:
        pipe: The pipeline.
        steps: Denoising steps.
        guidance: Guidance scale, or None for the pipeline's default.
        overrides: Further call arguments (output size, frames), e.g. a reference pipeline's defaults.
    """
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {"num_inference_steps": steps, "output_type": "np"}
    if guidance is not None:
        kwargs["guidance_scale"] = guidance
    # Resolution binning would silently change the requested size (and rejects small models' sample sizes).
    if "use_resolution_binning" in params:
        kwargs["use_resolution_binning"] = False
    kwargs.update(overrides)
    return kwargs


def to_uint8(array: np.ndarray) -> np.ndarray:
    """Float ``[0, 1]`` pipeline output to uint8, rounding as diffusers' ``numpy_to_pil`` does."""
    return (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)


class VariantBuilder:
    """Build the pipeline of a variant: load a fresh copy of the model, quantize it with the recipe, enable caching.

    Args:
        load: Zero-argument callable returning a freshly loaded FP pipeline on the target device.
    """

    def __init__(self, load: Callable[[], DiffusionPipeline]) -> None:
        self.load = load

    def build(self, variant: Variant) -> tuple[DiffusionPipeline, dict[str, Any]]:
        """Return ``(pipeline, info)``; info holds weight bytes, the quantization summary and build seconds."""
        start = time.perf_counter()
        pipe = self.load()
        info: dict[str, Any] = {"variant": variant.name, "recipe": variant.recipe, "cache": variant.cache_spec}
        if variant.recipe is not None:
            report = dq.quantize(pipe, variant.recipe)
            info["quantization"] = {
                "recipe": report.recipe,
                "layers_quantized": len(report.quantized),
                "layers_skipped": len(report.skipped),
            }
        if variant.cache is not None:
            dq.enable_cache(pipe, variant.cache)
        pipe.set_progress_bar_config(disable=True)
        info["weight_bytes"] = module_bytes(find_denoiser(pipe))
        info["build_seconds"] = time.perf_counter() - start
        return pipe, info


def generate_variant(
    variant: Variant,
    batches: list[tuple[int, list[Item]]],
    run: RunDir,
    builder: VariantBuilder,
    call_kwargs_for: Callable[[DiffusionPipeline], dict[str, Any]],
    video: bool,
    device: torch.device,
    show_progress: bool = True,
) -> int:
    """Generate the missing images of this process's batches of one variant; returns the number written.

    Args:
        variant: The variant.
        batches: ``(batch id, items)`` pairs assigned to this process.
        run: The RUN directory.
        builder: Builds the variant's pipeline (only when something is missing).
        call_kwargs_for: Pipeline -> shared call arguments.
        video: Whether outputs are clips.
        device: Where the pipeline runs (for timing and memory).
        show_progress: Show a tqdm bar.
    """
    todo = [(b, items) for b, items in batches if any(not _exists(run, variant, it, video) for it in items)]
    if not todo:
        return 0
    pipe, info = builder.build(variant)
    write_json(run.variant_path(variant.name), info)
    kwargs = call_kwargs_for(pipe)
    denoiser = find_denoiser(pipe)
    first = todo[0][1]
    warm_up(pipe, prompt=[it.prompt for it in first], generator=_generators(first), **kwargs)
    written = 0
    bar = tqdm(total=sum(len(items) for _, items in todo), desc=f"dq eval: generating {variant.name}",
               unit="img", disable=not show_progress)
    for batch_id, items in todo:
        run_batch = partial(pipe, prompt=[it.prompt for it in items], generator=_generators(items), **kwargs)
        call = timed_call(run_batch, denoiser, device)
        pixels = to_uint8(np.asarray(call.output.frames if video else call.output.images))
        for it, image in zip(items, pixels):
            path = run.image_path(variant.name, it.index, it.seed, video)
            if path.exists():
                continue  # finished by an earlier run: leave the file (and its mtime) alone
            (write_frames if video else write_png)(path, image)
            written += 1
        write_json(run.perf_path(variant.name, batch_id), {
            "batch": batch_id,
            "images": len(items),
            "seconds": call.seconds,
            "steps": call.denoiser_calls,
            "step_seconds_median": statistics.median(call.step_seconds) if call.step_seconds else None,
            "peak_memory_bytes": call.peak.bytes,
            "memory_source": call.peak.source,
            "device": str(device),
        })
        bar.update(len(items))
    bar.close()
    del pipe, denoiser
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return written


def _exists(run: RunDir, variant: Variant, item: Item, video: bool) -> bool:
    return run.image_path(variant.name, item.index, item.seed, video).exists()


def _generators(items: list[Item]) -> list[torch.Generator]:
    """One CPU generator per image, seeded with its seed (the same noise on every device)."""
    return [torch.Generator("cpu").manual_seed(it.seed) for it in items]


def summarize_perf(records: Iterable[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """Latency per image (median over batches), latency per step (median), peak memory (max) of a variant."""
    records = list(records)
    if not records:
        return None
    per_image = [r["seconds"] / r["images"] for r in records]
    steps = [r["step_seconds_median"] for r in records if r.get("step_seconds_median") is not None]
    memory = [r["peak_memory_bytes"] for r in records if r.get("peak_memory_bytes") is not None]
    return {
        "latency_per_image_s": statistics.median(per_image),
        "latency_per_step_s": statistics.median(steps) if steps else None,
        "peak_memory_bytes": max(memory) if memory else None,
        "memory_source": records[0].get("memory_source"),
        "device": records[0].get("device"),
        "timed_batches": len(records),
        "timed_images": sum(r["images"] for r in records),
    }


def read_perf(run: RunDir, variant: str) -> list[dict[str, Any]]:
    """Every batch timing record of a variant, in batch order."""
    folder = run.root / "perf" / variant
    return [read_json(p) for p in sorted(folder.glob("*.json"))] if folder.is_dir() else []

