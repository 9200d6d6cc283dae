"""Load a pipeline from what a user types: a reference name, a local directory, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dq.errors import DQError


def _components_saved_as_none(directory: Path) -> dict[str, None]:
    """Components a local pipeline was saved without (model_index.json entry [null, null])."""
    index = directory / "model_index.json"
    if not index.is_file():
        raise DQError(f"{str(directory)!r} is not a diffusers pipeline directory: it has no model_index.json.")
    entries = json.loads(index.read_text())
    return {name: None for name, value in entries.items() if isinstance(value, list) and value[0] is None}


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A DiffusionPipeline for `model`: a dq reference name (ref-sd, ...), a local diffusers directory, or a hub id.

    A dq-quantized directory loads quantized (`import dq` registered the backend).

    Example:
        >>> pipe = load_pipeline("ref-sd")
    """
    from diffusers import DiffusionPipeline

    from dq import reference

    if model in reference.names():
        return reference.load(model, device=device, dtype=dtype)
    path = Path(model).expanduser()
    if path.exists():
        kwargs = _components_saved_as_none(path)
    elif model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise DQError(
            f"model {model!r} is neither an existing local directory, a hub id (org/name), "
            f"nor a reference pipeline ({', '.join(reference.names())})."
        )
    else:
        kwargs = {}
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if path.exists() else model, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise DQError(f"could not load pipeline {model!r}: {e}") from None
    return pipe.to(device)
