"""Build the metrics of a run (before any generation) and score every variant's images read back from disk.

Every variant except FP is scored against the FP images of the same prompts and seeds (FID, PSNR, SSIM,
LPIPS) and against its prompts (CLIP score). Where the model is a reference pipeline, FID against real
images of the reference domain (``fid_real``) is reported for every variant, FP included.

Each process scores its own batches; the metrics are torchmetrics states, so ``compute()`` gathers them
across processes (per-image scores are concatenated and ordered by prompt index; FID feature sums are
summed). Scores are computed on the PNGs on disk, so a resumed run scores exactly what an uninterrupted one
would.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

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
    clip: Optional[_Clip] = None
    clip_error: Optional[DQError] = None
    if "clip" in names or (scoring.fid_backbone in (None, "clip") and "fid" in names):
        try:
            clip = _resolve_clip(scoring, reference_domain, device)
        except DQError as error:
            clip_error = error
    for name in names:
        try:
            if name == "clip":
                if clip is None:
                    raise clip_error or DQError(
                        "the clip metric needs a CLIP model and dq downloads none: pass --clip-model "
                        "(an open_clip name with --clip-weights PATH, local-dir:PATH, or a local transformers CLIP directory)."
                    )
                metric = _clip_metric(clip, scoring)
            elif name == "fid":
                metric = _fid(scoring, clip, reference_domain, clip_error)
                if reference_domain:
                    result.real_fid = _fid(scoring, clip, reference_domain, clip_error)
            elif name == "lpips":
                metric = _lpips(scoring)
            else:
                metric = METRICS.get(name)()
        except DQError as error:
            if explicit or _configured(name, scoring):
                raise
            result.skipped[name] = str(error)
            logger.info("dq eval: skipping %s: %s", name, error)
            continue
        result.metrics[name] = metric.to(device)
        result.settings[name] = metric.settings()
    if result.real_fid is not None:
        result.real_fid = result.real_fid.to(device)
    if clip is not None:
        # The metrics only see a model object; record which CLIP it was.
        if "clip" in result.settings:
            result.settings["clip"].update(backbone=clip.label, weights=clip.weights)
        if "fid" in result.settings and (scoring.fid_backbone or ("clip" if reference_domain else "inception")) == "clip":
            result.settings["fid"].update(backbone=clip.label, weights=clip.weights)
    return result


def _configured(name: str, scoring: ScoringConfig) -> bool:
    """Whether the user set a flag of this metric (then a failure is an error, not a skip)."""
    flags = {
        "fid": (scoring.fid_backbone, scoring.fid_weights),
        "clip": (scoring.clip_model, scoring.clip_weights),
        "lpips": (scoring.lpips_weights,),
    }
    return any(v is not None for v in flags.get(name, ()))


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


def _clip_metric(clip: _Clip, scoring: ScoringConfig) -> OpenCLIPScore | HFCLIPScore:
    if clip.hf_dir is not None:
        return HFCLIPScore(clip.hf_dir)
    model, tokenizer = clip.open_clip
    return OpenCLIPScore(model, tokenizer=tokenizer, antialias=scoring.antialias)


def _fid(scoring: ScoringConfig, clip: Optional[_Clip], reference_domain: bool, clip_error: Optional[DQError]) -> FID:
    """FID on the backbone --fid-backbone names (default: domain CLIP for reference pipelines, else Inception)."""
    backbone = scoring.fid_backbone or ("clip" if reference_domain else "inception")
    if backbone == "inception":
        return FID("inception", weights_path=scoring.fid_weights, antialias=scoring.antialias)
    if backbone == "clip":
        if clip is None or clip.open_clip is None:
            if clip_error is not None:
                raise clip_error
            raise DQError(
                "--fid-backbone clip needs an open_clip model: pass --clip-model (an open_clip name with --clip-weights, "
                "or local-dir:PATH), or use --fid-backbone inception --fid-weights PATH."
            )
        return FID(clip.open_clip[0], antialias=scoring.antialias)
    return FID(backbone, weights_path=scoring.fid_weights, antialias=scoring.antialias)


def _lpips(scoring: ScoringConfig) -> LPIPS:
    metric = LPIPS(scoring.lpips_net, weights_path=scoring.lpips_weights)
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
