"""The app's work without the UI: generate one prompt with every variant, time it, score it against FP.

Every variant draws its initial noise from the same CPU generator seeded with the request's seed, so the FP
image and each quantized image differ only by quantization (and caching). A step cache is enabled just for the
variant's call and removed afterwards, so cached and uncached variants share one quantized pipeline.

Timing: the first call of a freshly built pipeline is preceded by an untimed 1-step call of the same shape
(allocator growth, kernel selection, autotuning). Latency per image is the wall time of the call; latency per
step is the denoiser's total time divided by the steps (a mean, not a median, so steps a cache makes cheap
count; pipelines that run CFG as two calls count both). Warm-up and timing are ``dq.metrics.perf``'s
``warm_up`` and ``timed_call``; peak memory is ``dq.metrics.peak_memory``:
the CUDA allocator's peak on GPU, the process peak RSS on CPU; both cover everything resident in the process,
including the other loaded variants.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np
import torch

import dq
from dq.app.models import BuiltVariant, PipelineCache, model_defaults
from dq.errors import DQError
from dq.evaluation.generation import is_video_pipeline, to_uint8
from dq.evaluation.variants import FP, Variant, parse_variants
from dq.metrics import LPIPS, PSNR
from dq.metrics.perf import timed_call, warm_up
from dq.nn.denoiser import find_denoiser

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass
class GenerationRequest:
    """What the user asked for.

    Args:
        model: Reference name, local diffusers directory (dq-quantized too) or hub id.
        prompt: The prompt.
        variants: Variant names (``fp``, recipes, ``recipe+cache``); FP is added when missing.
        negative_prompt: Negative prompt ("" for none).
        seed: Seed of the initial noise, shared by every variant.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale; None keeps the pipeline's default.
        height, width: Output size; None keeps the model's default.
        num_frames: Clip length for video pipelines; None keeps the model's default.
    """

    model: str
    prompt: str
    variants: list[str]
    negative_prompt: str = ""
    seed: int = 0
    steps: int = 20
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None

    def validate(self) -> None:
        """Raise a DQError for input no pipeline call could accept."""
        if not self.prompt.strip():
            raise DQError("the prompt is empty; type what to generate.")
        if self.steps < 1:
            raise DQError(f"steps is {self.steps}; expected at least 1.")
        for name in ("height", "width", "num_frames"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise DQError(f"{name} is {value}; expected a positive number, or leave it empty for the default.")


@dataclass
class VariantResult:
    """One variant's output and measurements.

    Args:
        spec: The variant.
        pixels: uint8 ``(H, W, 3)`` image or ``(F, H, W, 3)`` clip.
        seconds: Wall time of the pipeline call.
        step_seconds: Duration of each denoiser forward call.
        peak_memory_bytes: Peak memory during the call (see the module docstring for what it covers).
        memory_source: What ``peak_memory_bytes`` measured.
        weight_bytes: Bytes of the denoiser's parameters and buffers.
        build_seconds: Time it took to load or quantize the pipeline (0 when it was reused).
        steps: Denoising steps of the call (pipelines without batched CFG call the denoiser twice per step).
        psnr: PSNR vs FP in dB (inf when identical), None for FP.
        lpips: LPIPS vs FP, None for FP or when LPIPS is unavailable.
    """

    spec: Variant
    pixels: np.ndarray
    seconds: float
    step_seconds: list[float]
    peak_memory_bytes: Optional[int]
    memory_source: str
    weight_bytes: int
    build_seconds: float = 0.0
    steps: Optional[int] = None
    psnr: Optional[float] = None
    lpips: Optional[float] = None

    @property
    def per_step_seconds(self) -> Optional[float]:
        """Denoiser time per denoising step (all its denoiser calls), averaged over the call's steps."""
        if not self.step_seconds:
            return None
        return sum(self.step_seconds) / (self.steps or len(self.step_seconds))


@dataclass
class Comparison:
    """All variants of one request, FP first."""

    request: GenerationRequest
    results: list[VariantResult]
    video: bool
    device: str
    notes: list[str] = field(default_factory=list)

    @property
    def fp(self) -> VariantResult:
        """The FP baseline."""
        return self.results[0]

    def result(self, name: str) -> VariantResult:
        """The result of the variant called ``name``."""
        for result in self.results:
            if result.spec.name == name:
                return result
        raise DQError(f"no variant {name!r} in this comparison; it has {', '.join(r.spec.name for r in self.results)}.")


def call_arguments(pipe: DiffusionPipeline, request: GenerationRequest) -> dict[str, Any]:
    """Keyword arguments of the pipeline call for this request (the generator is added per call)."""
    params = inspect.signature(pipe.__call__).parameters
    kwargs: dict[str, Any] = {k: v for k, v in model_defaults(request.model.strip()).items() if k in params}
    kwargs.update(prompt=request.prompt, num_inference_steps=int(request.steps), output_type="np")
    if request.negative_prompt.strip():
        if "negative_prompt" not in params:
            raise DQError(f"{type(pipe).__name__} takes no negative prompt; clear the negative prompt box.")
        kwargs["negative_prompt"] = request.negative_prompt
    if request.guidance is not None:
        kwargs["guidance_scale"] = float(request.guidance)
    for name in ("height", "width", "num_frames"):
        value = getattr(request, name)
        if value is not None and name in params:
            kwargs[name] = int(value)
    # Resolution binning would silently change the requested size (and rejects small models' sample sizes).
    if "use_resolution_binning" in params:
        kwargs["use_resolution_binning"] = False
    # PixArt's caption cleaning needs bs4 and ftfy and otherwise warns on every call; use the prompt as typed.
    if "clean_caption" in params:
        kwargs["clean_caption"] = False
    return kwargs


def run_variant(built: BuiltVariant, spec: Variant, kwargs: dict[str, Any], seed: int, video: bool,
                device: torch.device, warmup: bool = True) -> VariantResult:
    """Generate with one variant: warm up a fresh pipeline, enable its cache, time the call, return pixels.

    Args:
        built: The pipeline (FP or quantized) from the PipelineCache.
        spec: The variant; its cache, if any, is enabled for this call only.
        kwargs: The call arguments (``call_arguments``).
        seed: Seed of the CPU generator for the initial noise.
        video: Whether the pipeline returns clips.
        device: Where the pipeline runs (for synchronization and memory).
        warmup: Make an untimed 1-step call first when the pipeline has not run yet.
    """
    pipe = built.pipe
    if warmup and not built.warm:
        warm_up(pipe, **kwargs, generator=torch.Generator("cpu").manual_seed(seed))
    built.warm = True
    if spec.cache is not None:
        dq.enable_cache(pipe, spec.cache)
    try:
        call = timed_call(lambda: pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(seed)),
                          find_denoiser(pipe), device)
    finally:
        if spec.cache is not None:
            dq.disable_cache(pipe)
    output = call.output
    return VariantResult(
        spec=spec,
        pixels=to_uint8(np.asarray(output.frames[0] if video else output.images[0])),
        seconds=call.seconds,
        step_seconds=call.step_seconds,
        peak_memory_bytes=call.peak.bytes,
        memory_source=call.peak.source,
        weight_bytes=built.weight_bytes,
        steps=int(kwargs["num_inference_steps"]),
    )


def _as_batch(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` or ``(F, H, W, 3)`` -> uint8 ``(N, 3, H, W)`` (frames of a clip are the batch)."""
    array = pixels[None] if pixels.ndim == 3 else pixels
    return torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2)


def score(results: list[VariantResult], lpips: Optional[LPIPS] = None) -> list[str]:
    """Fill in PSNR and LPIPS of every non-FP result against ``results[0]``; returns notes for the UI.

    PSNR and LPIPS of a clip are the mean over its frames.

    Args:
        results: FP first.
        lpips: A dq.metrics.LPIPS, or None to skip LPIPS.
    """
    notes: list[str] = []
    reference = _as_batch(results[0].pixels)
    psnr = PSNR()
    for result in results[1:]:
        images = _as_batch(result.pixels)
        psnr.reset()
        psnr.update(images, reference=reference)
        result.psnr = psnr.compute()["value"]
        if lpips is None:
            continue
        lpips.reset()
        try:
            lpips.update(images, reference=reference)
        except RuntimeError as error:  # e.g. the AlexNet backbone cannot pool images this small
            notes.append(f"LPIPS failed on {images.shape[-2]}x{images.shape[-1]} images: {error}")
            lpips = None
            continue
        computed = lpips.compute()
        result.lpips = computed["value"]
        if computed["value"] is None and computed.get("reason") and computed["reason"] not in " ".join(notes):
            notes.append(f"LPIPS n/a: {computed['reason']}")
    return notes


class Comparer:
    """Generate a request with every variant from a PipelineCache and score them against FP.

    Args:
        cache: Where pipelines are built and kept.
        lpips: A zero-argument callable returning a dq.metrics.LPIPS (built on first use), or None.
        warmup: Warm up each freshly built pipeline with an untimed 1-step call.

    Example:
        >>> comparer = Comparer(PipelineCache("cpu", torch.float32))
        >>> result = comparer.compare(GenerationRequest("ref-sd", "a red circle", ["w8a8"], steps=20))
        >>> [(r.spec.name, r.psnr) for r in result.results]
    """

    def __init__(self, cache: PipelineCache, lpips: Optional[Callable[[], LPIPS]] = None, warmup: bool = True) -> None:
        self.cache = cache
        self._lpips_factory = lpips
        self._lpips: Optional[LPIPS] = None
        self.warmup = warmup

    def lpips(self) -> Optional[LPIPS]:
        """The LPIPS metric, built once."""
        if self._lpips is None and self._lpips_factory is not None:
            self._lpips = self._lpips_factory()
        return self._lpips

    def compare(self, request: GenerationRequest, progress: Optional[Progress] = None) -> Comparison:
        """Generate the request with each variant (building pipelines on first use) and score them vs FP.

        Raises:
            DQError: bad input, a model that cannot be loaded, a recipe or cache that does not apply.
        """
        request.validate()
        # FP first and duplicates dropped: the UI composes overlapping selections. Fails before any model loads.
        specs = parse_variants(list(dict.fromkeys([FP, *(n.strip() for n in request.variants if n and n.strip())])))
        report = progress or (lambda fraction, desc: None)
        results: list[VariantResult] = []
        notes: list[str] = []
        video = False
        device = self.cache.device
        for i, spec in enumerate(specs):
            recipe_key = spec.recipe
            fresh = (request.model.strip(), recipe_key) not in self.cache.keys()
            action = "loading" if recipe_key is None else f"quantizing with {recipe_key}"
            report(i / len(specs), f"{spec.name}: {action}" if fresh else f"{spec.name}: generating")
            start = time.perf_counter()
            try:
                built = self.cache.get(request.model, recipe_key)
            except DQError as error:
                if recipe_key is None:
                    raise  # the model itself failed to load: the message names it
                raise DQError(f"variant {spec.name!r}: {error}") from None
            build_seconds = time.perf_counter() - start if fresh else 0.0
            if i == 0:
                video = is_video_pipeline(built.pipe)
            kwargs = call_arguments(built.pipe, request)
            report((i + 0.5) / len(specs), f"{spec.name}: generating")
            try:
                result = run_variant(built, spec, kwargs, int(request.seed), video, device, self.warmup)
            except DQError as error:
                raise DQError(f"variant {spec.name!r}: {error}") from None
            result.build_seconds = build_seconds
            if fresh and recipe_key is not None:
                notes.append(f"built {spec.name} in {build_seconds:.1f} s ({built.quantized_layers} layers quantized)")
            results.append(result)
        report(1.0, "scoring")
        if len(results) > 1:
            notes += score(results, self.lpips())
        return Comparison(request, results, video, str(device), notes)


def format_bytes(value: Optional[int]) -> str:
    """Bytes as MiB with two decimals ("n/a" for None)."""
    return "n/a" if value is None else f"{value / 2**20:.2f}"


def results_table(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Headers and one row per variant: latency per image and per step, speed-up, peak memory, denoiser weight
    size, and PSNR and LPIPS of the variant's image against the FP image.

    Example:
        >>> headers, rows = results_table(comparison)
        >>> dict(zip(headers, rows[1]))["PSNR (dB)"]
        '31.42'
    """
    headers = [
        "variant", "latency (s)", "per step (ms)", "speed-up", "peak mem (MiB)", "weights (MiB)", "weights vs FP",
        "PSNR (dB)", "LPIPS",
    ]
    fp = comparison.fp
    rows = []
    for r in comparison.results:
        per_step = r.per_step_seconds
        is_fp = r is fp
        rows.append([
            r.spec.name,
            f"{r.seconds:.3f}",
            "n/a" if per_step is None else f"{per_step * 1000:.2f}",
            f"{fp.seconds / r.seconds:.2f}x" if r.seconds > 0 else "n/a",
            format_bytes(r.peak_memory_bytes),
            format_bytes(r.weight_bytes),
            f"{r.weight_bytes / fp.weight_bytes:.3f}x" if fp.weight_bytes else "n/a",
            "—" if is_fp else _format_psnr(r.psnr),
            "—" if is_fp else ("n/a" if r.lpips is None else f"{r.lpips:.4f}"),
        ])
    return headers, rows


def _format_psnr(value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return "inf (identical)" if math.isinf(value) else f"{value:.2f}"
