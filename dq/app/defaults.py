"""What the reference pipelines need at call time, and how to tell a video pipeline from an image one."""

from __future__ import annotations

import inspect
from typing import Any


def is_video_pipeline(pipe: Any) -> bool:
    """Whether the pipeline makes clips (its ``__call__`` takes ``num_frames``)."""
    return "num_frames" in inspect.signature(pipe.__call__).parameters


def reference_names() -> list[str]:
    """The bundled reference pipeline names, or [] while dq.reference provides none."""
    try:
        from dq import reference

        return list(reference.names())
    except (ImportError, AttributeError):
        return []


def model_defaults(model: str, video: bool) -> dict[str, Any]:
    """Call arguments a reference pipeline needs (32x32, 9 frames for video); {} for other models."""
    if model not in reference_names():
        return {}
    from dq import reference

    defaults = getattr(reference, "generation_kwargs", None)
    if callable(defaults):
        return dict(defaults(model))
    from dq.reference import data

    out: dict[str, Any] = {"height": data.IMAGE_SIZE, "width": data.IMAGE_SIZE}
    if video:
        out["num_frames"] = data.NUM_FRAMES
    return out
