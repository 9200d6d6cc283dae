"""Load a pipeline from what a user types: a reference name, a local directory, or a hub id."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dq import reference
from dq.errors import DQError


def is_hub_id(model: str) -> bool:
    """Whether ``model`` has the shape of a hub id (``org/name``) rather than of a local path."""
    return not model.startswith((".", "/", "~")) and model.count("/") == 1


def check_model(model: str) -> str:
    """The canonical form of a model a user typed: a reference name or hub id as is, a local directory resolved.

    Raises a DQError (before any weights are read) for a file, a directory without model_index.json, or a name
    that is none of the three.

    Example:
        >>> check_model("ref-sd")
        'ref-sd'
    """
    if model in reference.names():
        return model
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise DQError(f"{model!r} is a file; expected a diffusers pipeline directory (with model_index.json).")
        if not (path / "model_index.json").is_file():
            raise DQError(f"{model!r} is not a diffusers pipeline directory: it has no model_index.json.")
        return str(path.resolve())
    if not is_hub_id(model):
        raise DQError(
            f"model {model!r} is neither an existing local directory, a hub id (org/name), "
            f"nor a reference pipeline ({', '.join(reference.names())})."
        )
    return model


def components_saved_as_none(directory: Path) -> dict[str, None]:
    """Components a local pipeline was saved without (model_index.json entry [null, null])."""
    entries = json.loads((directory / "model_index.json").read_text())
    return {name: None for name, value in entries.items() if isinstance(value, list) and value[0] is None}


def load_pipeline(model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """A DiffusionPipeline for `model`: a dq reference name (ref-sd, ...), a local diffusers directory, or a hub id.

    A dq-quantized directory loads quantized (`import dq` registered the backend).

    Example:
        >>> pipe = load_pipeline("ref-sd")
    """
    from diffusers import DiffusionPipeline

    model = check_model(model)
    if model in reference.names():
        return reference.load(model, device=device, dtype=dtype)
    path = Path(model)
    kwargs = components_saved_as_none(path) if path.is_dir() else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise DQError(f"could not load pipeline {model!r}: {e}") from None
    return pipe.to(device)
