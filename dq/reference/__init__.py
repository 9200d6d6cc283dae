"""Bundled reference pipelines, trained in-repo on procedural shapes, plus a domain CLIP.

Example:
    >>> from dq import reference
    >>> pipe = reference.load("ref-sd")
    >>> prompts = reference.prompts("heldout", n=4)
    >>> images = pipe(prompts, **reference.generation_kwargs("ref-sd")).images
    >>> real = reference.real_samples(prompts)          # dataset images for an FID reference set
"""

from __future__ import annotations

from pathlib import Path

import torch

from dq.errors import DQError

from . import data
from .clip import CONFIG_NAME, clip_checkpoint, domain_clip, register_config

WEIGHTS_DIR = Path(__file__).parent / "weights"

_PIPELINES = {
    "ref-sd": "StableDiffusionPipeline",
    "ref-pixart": "PixArtSigmaPipeline",
    "ref-video": "WanPipeline",
}
_CALL_KWARGS = {
    "ref-sd": {"height": 32, "width": 32},
    "ref-pixart": {"height": 32, "width": 32, "use_resolution_binning": False},
    "ref-video": {"height": 32, "width": 32, "num_frames": data.NUM_FRAMES},
}

__all__ = [
    "CONFIG_NAME",
    "clip_checkpoint",
    "domain_clip",
    "generation_kwargs",
    "is_video",
    "load",
    "name_of",
    "name_of_source",
    "names",
    "path",
    "prompts",
    "real_samples",
    "register_config",
]


def names() -> list[str]:
    """Names of the bundled reference pipelines."""
    return list(_PIPELINES)


def _check(name: str) -> None:
    if name not in _PIPELINES:
        raise DQError(f"unknown reference pipeline {name!r}; available: {', '.join(names())}")


def path(name: str) -> Path:
    """Directory of ``name``'s weights, loadable with the stock diffusers class's ``from_pretrained``."""
    _check(name)
    return WEIGHTS_DIR / name


def is_video(name: str) -> bool:
    """Whether ``name`` generates clips (and takes video prompts)."""
    _check(name)
    return name == "ref-video"


def generation_kwargs(name: str) -> dict:
    """Call arguments ``name`` needs besides the prompt: 32x32 output (and 9 frames for video).

    The stock defaults target 512px+ checkpoints (PixArt's resolution binning, Wan's 480x832x81).
    """
    _check(name)
    return dict(_CALL_KWARGS[name])


def load(name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """Load a reference pipeline with its stock diffusers class (weights are stored in fp16).

    Example:
        >>> pipe = load("ref-pixart")
        >>> image = pipe("a small red circle at the top left on a black background",
        ...              num_inference_steps=20, **generation_kwargs("ref-pixart")).images[0]
    """
    import diffusers

    directory = path(name)
    if not (directory / "model_index.json").exists():
        raise DQError(f"weights for {name!r} not found in {directory}; rebuild with `python -m dq.reference.train_*`")
    pipeline_cls = getattr(diffusers, _PIPELINES[name])
    pipe = pipeline_cls.from_pretrained(directory, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def name_of(pipe) -> str | None:
    """The reference name a pipeline was loaded from (by its directory), or None for any other pipeline."""
    return name_of_source(getattr(pipe, "name_or_path", None))


def name_of_source(source: str | Path | None) -> str | None:
    """The reference name `source` is, or whose directory it is; None for anything else."""
    if not source:
        return None
    if str(source) in names():
        return str(source)
    resolved = Path(source).expanduser().resolve()
    return next((name for name in names() if path(name).resolve() == resolved), None)


def prompts(split: str = "heldout", n: int | None = None, video: bool = False) -> list[str]:
    """Deterministic prompts of the ``"heldout"`` or ``"train"`` split, cycled to ``n`` if given."""
    return data.prompts(split, n, video)


def real_samples(captions: list[str], seed: int = 0) -> list:
    """Real dataset images (PIL) or clips (lists of PIL frames) for ``captions``; an FID reference set."""
    return data.real_samples(captions, seed)
