"""Load a pipeline from what a user types: a reference name, a local directory, or a hub id."""

from __future__ import annotations

from pathlib import Path

import torch

from dq.errors import DQError


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A DiffusionPipeline for `model`: a dq reference name (ref-sd, ...), a local diffusers directory, or a hub id.

    A dq-quantized directory loads quantized (`import dq` registered the backend).
    """
    from diffusers import DiffusionPipeline

    from dq import reference

    if model in reference.names():
        return reference.load(model, device=device, dtype=dtype)
    path = Path(model)
    if not path.exists() and (model.startswith((".", "/", "~")) or model.count("/") != 1):
        raise DQError(
            f"model {model!r} is neither a local directory, a hub id (org/name), "
            f"nor a reference pipeline ({', '.join(reference.names())})."
        )
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype)
    except (OSError, ValueError) as e:
        raise DQError(f"could not load pipeline {model!r}: {e}") from None
    return pipe.to(device)
