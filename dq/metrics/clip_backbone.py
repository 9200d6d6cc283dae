"""open_clip models for the CLIP-based metrics: loading, and the image tower as a batched feature module."""

from __future__ import annotations

import os
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from dq.errors import DQError

# A loaded open_clip model, or an open_clip model name with its weights: a pretrained tag or a local file.
OpenCLIPSpec = Union[nn.Module, str, tuple[str, Union[str, os.PathLike]]]

_OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def load_open_clip(
    spec: OpenCLIPSpec, pretrained: Optional[str | os.PathLike] = None
) -> tuple[nn.Module, Optional[Callable[..., torch.Tensor]], str]:
    """Return ``(model, tokenizer, label)`` for an open_clip model given as an object or by name.

    Args:
        spec: A loaded open_clip model (e.g. ``dq.reference.domain_clip()[0]``), a model name (or an
            open_clip ``local-dir:`` / ``hf-hub:`` identifier), or a ``(name, pretrained)`` pair.
        pretrained: With a model name: a pretrained tag (downloads into open_clip's cache) or a local file.

    For a model object the tokenizer is None (pass the one that came with it); ``label`` names the backbone
    in recorded settings.
    """
    if isinstance(spec, nn.Module):
        return spec.eval(), None, f"open_clip:{type(spec).__name__}"
    if isinstance(spec, tuple):
        spec, pretrained = spec
    if pretrained is None and not spec.startswith(("local-dir:", "hf-hub:")):
        raise DQError(
            f"open_clip model {spec!r} was given without weights; a randomly initialised CLIP measures nothing. "
            "Pass a pretrained tag or a local checkpoint file."
        )
    import open_clip

    pretrained = None if pretrained is None else str(pretrained)
    try:
        model, _, _ = open_clip.create_model_and_transforms(spec, pretrained=pretrained)
    except (RuntimeError, ValueError, FileNotFoundError) as error:
        raise DQError(f"could not load open_clip model {spec!r} with pretrained={pretrained!r}: {error}") from error
    return model.eval(), open_clip.get_tokenizer(spec), f"open_clip:{spec}:{pretrained}"


class CLIPImageFeatures(nn.Module):
    """An open_clip image tower as a batched feature extractor: images ``(N, 3, H, W)`` -> features ``(N, d)``.

    Images are uint8 in ``[0, 255]`` or float in ``[0, 1]``. They are resized to the tower's input size
    (``interpolation`` with ``antialias``), normalised with the model's mean/std and encoded with
    ``encode_image``. ``num_features`` is ``d``, as torchmetrics' ``FrechetInceptionDistance(feature=...)``
    expects.

    Args:
        model: An open_clip model (anything with ``encode_image`` and a ``visual`` tower).
        image_size: Input size; defaults to the tower's configured size.
        antialias: Antialias when resizing (as open_clip's PIL preprocessing does).
        interpolation: ``"bicubic"`` (open_clip's default) or ``"bilinear"``.
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: Optional[int] = None,
        antialias: bool = True,
        interpolation: str = "bicubic",
    ) -> None:
        super().__init__()
        self.model = model.eval()
        cfg: dict[str, Any] = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = image_size or cfg.get("size") or model.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.antialias = antialias
        self.interpolation = interpolation
        device = next(model.parameters()).device
        mean, std = cfg.get("mean", _OPENAI_MEAN), cfg.get("std", _OPENAI_STD)
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        probe = torch.zeros(1, 3, *self.image_size, dtype=torch.uint8, device=device)
        self.num_features = int(self(probe).shape[-1])

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode=self.interpolation, antialias=self.antialias)
        x = ((x - self.mean) / self.std).to(next(self.model.parameters()).dtype)
        return self.model.encode_image(x).float()

    def settings(self) -> dict[str, Any]:
        """Return the resize settings for recorded results."""
        return {"resize": list(self.image_size), "interpolation": self.interpolation, "antialias": self.antialias}
