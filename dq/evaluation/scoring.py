"""Build the metrics of a run (before any generation) and score every variant's images read back from disk.

Every variant except FP is scored against the FP images of the same prompts and seeds (FID, PSNR, SSIM,
LPIPS) and against its prompts (CLIP score). Where the model is a reference pipeline, FID against real
images of the reference domain (``fid_real``) is reported for every variant, FP included.

Each process scores its own batches; the metrics are torchmetrics states, so ``compute()`` gathers them
across processes (per-image scores are concatenated and ordered by prompt index; FID feature sums are
summed). Scores are computed on the PNGs on disk, so a resumed run scores exactly what an uninterrupted one
would.

Each metric is built by the ``MetricBuilder`` registered under its name in ``BUILDERS`` (``@builds("fid", ...)``);
a metric that needs no settings (PSNR, SSIM) registers none and is built by calling its ``dq.metrics.METRICS``
class with no arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from dq import reference
from dq.errors import DQError
from dq.evaluation.eval_config import ScoringConfig
from dq.evaluation.generation import Item
from dq.evaluation.rundir import RunDir, read_pixels
from dq.evaluation.variants import Variant
from dq.metrics import FID, LPIPS, METRICS, HFCLIPScore, OpenCLIPScore, load_open_clip
from dq.metrics.base import PerImageMetric
from dq.reference.clip import clip_checkpoint, domain_clip
from dq.registry import Registry

logger = logging.getLogger(__name__)

EVAL_METRICS = ("fid", "clip", "psnr", "ssim", "lpips")
PAIRED = ("fid", "psnr", "ssim", "lpips")  # compared with the FP image of the same prompt and seed

EvalMetric = PerImageMetric | FID | HFCLIPScore  # what eval drives: update(images, ...), compute(), settings()


@dataclass
class MetricSet:
    """The constructed metrics of a run, their recorded settings, and the metrics left out (with reasons)."""

    metrics: dict[str, EvalMetric] = field(default_factory=dict)
    real_fid: Optional[FID] = None
    settings: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class _Clip:
    """A resolved CLIP model: an open_clip model with its tokenizer, or a transformers checkpoint directory."""

    label: str
    open_clip: Optional[tuple[torch.nn.Module, Any]] = None
    hf_dir: Optional[str] = None
    weights: Optional[str] = None


@dataclass
class BuildContext:
    """What a metric builder reads: the scoring settings, the model kind, the device and the run's one CLIP model."""

    scoring: ScoringConfig
    reference_domain: bool
    device: torch.device
    _clip: Optional[tuple[Optional[_Clip], Optional[DQError]]] = field(default=None, init=False, repr=False)

    def clip(self) -> Optional[_Clip]:
        """The CLIP model of --clip-model, resolved on first use and shared by every metric; raises its DQError."""
        if self._clip is None:
            try:
                self._clip = (_resolve_clip(self.scoring, self.reference_domain, self.device), None)
            except DQError as error:
                self._clip = (None, error)
        clip, error = self._clip
        if error is not None:
            raise error
        return clip

    def fid_backbone(self) -> str:
        """The FID backbone: --fid-backbone, else the domain CLIP for reference pipelines and Inception otherwise."""
        return self.scoring.fid_backbone or ("clip" if self.reference_domain else "inception")


Build = Callable[[BuildContext], EvalMetric]  # constructs one metric; a DQError means it cannot be built here


def _no_flags(scoring: ScoringConfig) -> tuple[Any, ...]:
    return ()


def _own_settings(metric: EvalMetric, ctx: BuildContext) -> dict[str, Any]:
    return metric.settings()


@dataclass(frozen=True)
class MetricBuilder:
    """How eval builds one metric of ``dq.metrics.METRICS`` from the run's settings.

    Args:
        build: Construct the metric; raise a DQError when it cannot be (missing weights or dependency).
        flags: The user's settings of this metric; any of them set makes a failure an error instead of a skip.
        record: The settings recorded in ``results.json`` for the constructed metric.
        real_twin: For reference pipelines, also build a second one scored against real images (``fid_real``).
    """

    build: Build
    flags: Callable[[ScoringConfig], tuple[Any, ...]] = _no_flags
    record: Callable[[EvalMetric, BuildContext], dict[str, Any]] = _own_settings
    real_twin: bool = False

    def configured(self, scoring: ScoringConfig) -> bool:
        """Whether the user set a flag of this metric (then a failure is an error, not a skip)."""
        return any(v is not None for v in self.flags(scoring))


BUILDERS: Registry[MetricBuilder] = Registry("eval metric builder")


def builds(name: str, **options: Any) -> Callable[[Build], Build]:
    """Register the decorated function as the builder of metric ``name`` (``options``: the other MetricBuilder fields)."""

    def decorator(build: Build) -> Build:
        BUILDERS.add(name, MetricBuilder(build, **options))
        return build

    return decorator


def builder(name: str) -> MetricBuilder:
    """The builder registered for ``name``, or the default one: the ``METRICS`` class constructed without arguments."""
    if name in BUILDERS:
        return BUILDERS.get(name)
    return MetricBuilder(build=lambda ctx: METRICS.get(name)())


def build_metrics(scoring: ScoringConfig, reference_domain: bool, device: torch.device) -> MetricSet:
    """Construct every metric the run will report; missing weights raise here, before any image is generated.

    With ``scoring.metrics`` None, every metric whose weights are available is used and the others are listed
    in ``skipped``; a metric asked for by name (or configured through its flags) raises a DQError instead.

    Args:
        scoring: The scoring settings.
        reference_domain: Whether the model is a dq reference pipeline (domain CLIP and real images exist).
        device: Where the metrics run.

    Example:
        >>> build_metrics(ScoringConfig(metrics=["psnr", "ssim"]), False, torch.device("cpu")).metrics.keys()
        dict_keys(['psnr', 'ssim'])
    """
    explicit = scoring.metrics is not None
    names = list(dict.fromkeys(scoring.metrics)) if explicit else list(EVAL_METRICS)
    unknown = [n for n in names if n not in EVAL_METRICS]
    if unknown:
        raise DQError(f"--metrics: unknown metric(s) {', '.join(unknown)}; available: {', '.join(EVAL_METRICS)}.")
    if not names:
        raise DQError("--metrics is empty; expected some of " + ", ".join(EVAL_METRICS) + ".")
    result = MetricSet()
    ctx = BuildContext(scoring, reference_domain, device)
    for name in names:
        spec = builder(name)
        try:
            metric = spec.build(ctx)
            if spec.real_twin and reference_domain:
                result.real_fid = spec.build(ctx).to(device)
        except DQError as error:
            if explicit or spec.configured(scoring):
                raise
            result.skipped[name] = str(error)
            logger.info("dq eval: skipping %s: %s", name, error)
            continue
        result.metrics[name] = metric.to(device)
        result.settings[name] = spec.record(metric, ctx)
    return result


def _resolve_clip(scoring: ScoringConfig, reference_domain: bool, device: torch.device) -> Optional[_Clip]:
    """Load the CLIP model named by --clip-model (the domain CLIP by default for reference pipelines)."""
    spec = scoring.clip_model or ("domain" if reference_domain else None)
    if spec is None:
        return None
    if spec == "domain":
        model, _, tokenizer = domain_clip(device=device)
        return _Clip(label="dq-reference-domain-clip", open_clip=(model, tokenizer), weights=str(clip_checkpoint()))
    local = Path(spec).expanduser()
    if local.is_dir() and (local / "config.json").is_file() and not (local / "open_clip_config.json").is_file():
        return _Clip(label=f"transformers:{local}", hf_dir=str(local))
    if scoring.clip_weights is not None and not Path(scoring.clip_weights).expanduser().is_file():
        raise DQError(f"--clip-weights {scoring.clip_weights}: no such file; expected an open_clip checkpoint.")
    model, tokenizer, label = load_open_clip(spec, scoring.clip_weights)
    return _Clip(label=label, open_clip=(model.to(device), tokenizer), weights=scoring.clip_weights)


def _clip_settings(metric: EvalMetric, ctx: BuildContext) -> dict[str, Any]:
    """The metric's settings plus which CLIP it was (the metric only sees a model object)."""
    clip = ctx.clip()
    return {**metric.settings(), "backbone": clip.label, "weights": clip.weights}


@builds("clip", flags=lambda s: (s.clip_model, s.clip_weights), record=_clip_settings)
def _clip_metric(ctx: BuildContext) -> OpenCLIPScore | HFCLIPScore:
    """CLIP score with the --clip-model (open_clip, or a transformers checkpoint directory)."""
    clip = ctx.clip()
    if clip is None:
        raise DQError(
            "the clip metric needs a CLIP model and dq downloads none: pass --clip-model "
            "(an open_clip name with --clip-weights PATH, local-dir:PATH, or a local transformers CLIP directory)."
        )
    if clip.hf_dir is not None:
        return HFCLIPScore(clip.hf_dir)
    model, tokenizer = clip.open_clip
    return OpenCLIPScore(model, tokenizer=tokenizer, antialias=ctx.scoring.antialias)


def _fid_settings(metric: EvalMetric, ctx: BuildContext) -> dict[str, Any]:
    """The metric's settings, plus which CLIP it was when the backbone is the --clip-model."""
    if ctx.fid_backbone() == "clip":
        return _clip_settings(metric, ctx)
    return metric.settings()


@builds("fid", flags=lambda s: (s.fid_backbone, s.fid_weights), record=_fid_settings, real_twin=True)
def _fid(ctx: BuildContext) -> FID:
    """FID on the backbone --fid-backbone names (default: domain CLIP for reference pipelines, else Inception)."""
    scoring, backbone = ctx.scoring, ctx.fid_backbone()
    if backbone == "inception":
        return FID("inception", weights_path=scoring.fid_weights, antialias=scoring.antialias)
    if backbone == "clip":
        clip = ctx.clip()
        if clip is None or clip.open_clip is None:
            raise DQError(
                "--fid-backbone clip needs an open_clip model: pass --clip-model (an open_clip name with --clip-weights, "
                "or local-dir:PATH), or use --fid-backbone inception --fid-weights PATH."
            )
        return FID(clip.open_clip[0], antialias=scoring.antialias)
    return FID(backbone, weights_path=scoring.fid_weights, antialias=scoring.antialias)


@builds("lpips", flags=lambda s: (s.lpips_weights,))
def _lpips(ctx: BuildContext) -> LPIPS:
    """LPIPS on --lpips-net with --lpips-weights; a backbone without local weights is a DQError."""
    metric = LPIPS(ctx.scoring.lpips_net, weights_path=ctx.scoring.lpips_weights)
    if metric.unavailable is not None:
        raise DQError(metric.unavailable)
    return metric


def real_images(prompts: list[str], seed: int) -> Optional[list[np.ndarray]]:
    """One real image (``(1, H, W, 3)``) or clip (``(F, H, W, 3)``) per prompt of the reference domain."""
    samples = reference.real_samples(prompts, seed=seed)
    return [np.stack([np.asarray(f.convert("RGB")) for f in (s if isinstance(s, list) else [s])]) for s in samples]


def _tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """Concatenate ``(F, H, W, 3)`` uint8 arrays into one ``(N, 3, H, W)`` uint8 tensor."""
    return torch.from_numpy(np.concatenate(frames)).permute(0, 3, 1, 2).contiguous()


def score_variants(
    variants: list[Variant],
    batches: list[tuple[int, list[Item]]],
    run: RunDir,
    metric_set: MetricSet,
    video: bool,
    real: Optional[list[np.ndarray]],
    show_progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score every variant on this process's batches and gather across processes.

    Returns ``{variant: {metric: compute() result}}``; every process gets the full result. All processes must
    call this together (``compute()`` is a collective under ``accelerate launch``).
    """
    fp = next(v for v in variants if v.is_fp)
    results: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(variants) * sum(len(items) for _, items in batches), desc="dq eval: scoring",
               unit="img", disable=not show_progress)
    for variant in variants:
        active = {n: m for n, m in metric_set.metrics.items() if not (variant.is_fp and n in PAIRED)}
        for metric in (*active.values(), metric_set.real_fid):
            if metric is not None:
                metric.reset()
        for _, items in batches:
            clips = [read_pixels(run.image_path(variant.name, it.index, it.seed, video)) for it in items]
            frames = [len(c) for c in clips]
            ids = [it.index * f + k for it, f in zip(items, frames) for k in range(f)]
            prompts = [it.prompt for it, f in zip(items, frames) for _ in range(f)]
            images = _tensor(clips)
            fp_images = None
            if not variant.is_fp and any(n in PAIRED for n in active):
                fp_images = _tensor([read_pixels(run.image_path(fp.name, it.index, it.seed, video)) for it in items])
            for metric in active.values():
                metric.update(images, reference=fp_images, prompts=prompts, ids=ids)
            if metric_set.real_fid is not None and real is not None:
                metric_set.real_fid.update(images, reference=_tensor([real[it.index] for it in items]))
            bar.update(len(items))
        results[variant.name] = {n: _plain(m.compute()) for n, m in active.items()}
        if metric_set.real_fid is not None and real is not None:
            results[variant.name]["fid_real"] = _plain(metric_set.real_fid.compute())
    bar.close()
    return results


def _plain(value: dict[str, Any]) -> dict[str, Any]:
    """Make a metric result JSON-plain (floats, lists, None)."""
    out = {}
    for key, item in value.items():
        if isinstance(item, torch.Tensor):
            item = item.tolist()
        out[key] = item
    return out
