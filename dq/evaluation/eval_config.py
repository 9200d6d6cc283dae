"""What an eval run is: the model, the variants, the prompts and seeds, and how images are scored.

``EvalConfig`` checks its plain fields on construction; ``evaluate`` checks the rest (model, variants, prompts,
metrics) before any model is loaded, so bad input fails in seconds with a DQError that names it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dq.errors import DQError
from dq.evaluation.prompts import REFERENCE_PROMPTS
from dq.evaluation.variants import FP, Variant
from dq.recipes import load_recipe


@dataclass
class ScoringConfig:
    """How images are scored; changing it re-scores a run without regenerating images.

    Args:
        metrics: Metric names, or None for every metric whose weights are available.
        fid_backbone: ``"inception"``, ``"clip"`` (the --clip-model), an open_clip model name, or None for the
            default (the domain CLIP for reference pipelines, Inception otherwise).
        fid_weights: Local weights of the FID backbone.
        clip_model: ``"domain"``, an open_clip name (``local-dir:``/``hf-hub:`` ids too), a local transformers CLIP
            directory, or None for the default (the domain CLIP for reference pipelines).
        clip_weights: Local checkpoint of an open_clip ``clip_model`` name.
        lpips_weights: Local torchvision backbone weights for LPIPS.
        lpips_net: LPIPS backbone, ``"alex"`` or ``"vgg"``.
        antialias: Antialias when resizing images for FID and CLIP.
    """

    metrics: Optional[list[str]] = None
    fid_backbone: Optional[str] = None
    fid_weights: Optional[str] = None
    clip_model: Optional[str] = None
    clip_weights: Optional[str] = None
    lpips_weights: Optional[str] = None
    lpips_net: str = "alex"
    antialias: bool = True


@dataclass
class EvalConfig:
    """One eval run: the generation settings (fixed for the life of a RUN directory) and the scoring settings.

    Args:
        model: A reference pipeline name, a local diffusers directory, or a hub id.
        out: The RUN directory.
        variants: Variant names (a list, or one comma-separated string); ``"fp"`` is added first when missing.
        prompts: A prompt file or ``"reference"``.
        n: Number of prompts (None: the whole file, 16 for ``"reference"``).
        seed: Image ``i`` uses the seed ``seed + i``.
        steps: Denoising steps.
        guidance: Classifier-free guidance scale; None keeps the pipeline's default.
        height, width, num_frames: Output size; None keeps the pipeline's default.
        batch_size: Prompts per pipeline call. Batches are fixed slices of the prompt list, so any number of
            processes produces the same images.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"``; None picks float16 on CUDA and float32 on CPU.
        scoring: How images are scored.
        overwrite: Replace a RUN made with a different configuration.

    Example:
        >>> cfg = EvalConfig(model="ref-sd", out="runs/sd", variants=["fp", "w8a8"], prompts="reference", n=8)
        >>> dq.evaluation.evaluate(cfg)["variants"]["w8a8"]["metrics"]["psnr"]["value"]
    """

    model: str
    out: str | Path
    variants: str | list[str] = field(default_factory=lambda: [FP])
    prompts: str = REFERENCE_PROMPTS
    n: Optional[int] = None
    seed: int = 0
    steps: int = 20
    guidance: Optional[float] = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    batch_size: int = 4
    dtype: Optional[str] = None
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.batch_size < 1:
            raise DQError(f"--batch-size {self.batch_size}: expected a positive number.")
        if self.steps < 1:
            raise DQError(f"--steps {self.steps}: expected a positive number of denoising steps.")
        if self.dtype not in (None, "float32", "float16", "bfloat16"):
            raise DQError(f"--dtype {self.dtype}: expected float32, float16 or bfloat16.")


def generation_record(cfg: EvalConfig, model_id: str, variants: list[Variant], prompts: list[str], dtype: str) -> dict:
    """The part of a run's configuration that determines its images; a RUN directory keeps it for life."""
    return {
        "model": model_id,
        "variants": [
            {
                "name": v.name,
                "recipe": v.recipe,
                "cache": v.cache_spec,
                "recipe_spec": None if v.recipe is None else load_recipe(v.recipe).to_dict(),
            }
            for v in variants
        ],
        "prompts": {"source": cfg.prompts, "count": len(prompts), "sha256": prompts_digest(prompts)},
        "seed": cfg.seed,
        "steps": cfg.steps,
        "guidance": cfg.guidance,
        "height": cfg.height,
        "width": cfg.width,
        "num_frames": cfg.num_frames,
        "batch_size": cfg.batch_size,
        "dtype": dtype,
    }


def prompts_digest(prompts: list[str]) -> str:
    """SHA-256 of the prompt list, so a changed prompt file is noticed."""
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode("utf-8")).hexdigest()
