"""Fréchet distance between the evaluated images and a reference set, on torchmetrics' ``FrechetInceptionDistance``.

Two feature backbones:

- ``"inception"`` (default): the standard FID Inception-v3 with torch-fidelity's weights. torch-fidelity
  downloads them on first use, so dq reads them from a local file (``weights_path``, CLI ``--fid-weights PATH``)
  or from the torch hub cache, and raises before any generation when neither has them.
- an open_clip image tower (``CLIPImageFeatures``): any open_clip model, e.g. the domain CLIP of dq's reference
  pipelines, where Inception's ImageNet features say little about the images.

The feature sums are torchmetrics states reduced by sum, so under ``accelerate launch`` each rank updates with its
shard of prompts and ``compute()`` gathers the statistics of all ranks through torchmetrics' sync.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional, Sequence, Union

import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from dq.errors import DQError
from dq.metrics.base import METRICS
from dq.metrics.clip_backbone import CLIPImageFeatures, OpenCLIPSpec, load_open_clip
from dq.metrics.images import Images, to_uint8

INCEPTION_FEATURES = 2048
INCEPTION_SIZE = 299


@METRICS.register("fid")
class FID(nn.Module):
    """FID of the evaluated images against the reference images (by default the FP pipeline's).

    Args:
        backbone: ``"inception"``, or an open_clip model (object, name, or ``(name, pretrained)`` pair).
        weights_path: Local weights of the backbone: torch-fidelity's Inception state dict
            (``weights-inception-2015-12-05-6726825d.pth``), or an open_clip checkpoint for a model name.
        antialias: Antialias when resizing to the backbone input size. For Inception, ``False`` uses
            torch-fidelity's TF1-compatible resize, giving numbers comparable with legacy FID.
        image_size: Input size of an open_clip backbone; defaults to the tower's size.

    Example:
        >>> fid = FID(weights_path="weights-inception-2015-12-05-6726825d.pth")  # before generating
        >>> fid.update(quantized_images, reference=fp_images)
        >>> fid.compute()  # {"value": 3.1}
    """

    name = "fid"
    needs = ("reference",)

    def __init__(
        self,
        backbone: Union[Literal["inception"], OpenCLIPSpec] = "inception",
        weights_path: Optional[str | os.PathLike] = None,
        antialias: bool = True,
        image_size: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.antialias = antialias
        if isinstance(backbone, str) and backbone == "inception":
            self.weights_path = resolve_inception_weights(weights_path)
            self.backbone = "inception-v3-compat"
            self.resize: dict[str, Any] = {"resize": [INCEPTION_SIZE, INCEPTION_SIZE], "antialias": antialias}
            self.metric = FrechetInceptionDistance(
                feature=INCEPTION_FEATURES, feature_extractor_weights_path=self.weights_path, antialias=antialias
            )
        else:
            model, _, self.backbone = load_open_clip(backbone, weights_path)
            self.weights_path = None if weights_path is None else str(weights_path)
            features = CLIPImageFeatures(model, image_size=image_size, antialias=antialias)
            self.resize = features.settings()
            self.metric = FrechetInceptionDistance(feature=features)

    def update(
        self,
        images: Images,
        reference: Optional[Images] = None,
        prompts: Optional[Sequence[str]] = None,
        ids: Optional[Sequence[int]] = None,
    ) -> None:
        """Add a batch of evaluated images and, optionally, reference images (``prompts`` and ``ids`` are unused).

        Args:
            images: The evaluated (e.g. quantized) images.
            reference: Reference images (e.g. the FP images for the same prompts and seeds).
        """
        device = self.metric.device
        if reference is not None:
            self.metric.update(to_uint8(reference).to(device), real=True)
        self.metric.update(to_uint8(images).to(device), real=False)

    def compute(self) -> dict[str, Any]:
        """Return ``{"value": float}``, or ``{"value": None, "reason": ...}`` with fewer than 2 images a side."""
        try:
            return {"value": self.metric.compute().item()}
        except RuntimeError as error:
            if "More than one sample" not in str(error):
                raise
            return {"value": None, "reason": "FID needs at least 2 evaluated and 2 reference images"}

    def reset(self) -> None:
        """Clear the accumulated statistics."""
        self.metric.reset()

    def settings(self) -> dict[str, Any]:
        """Return the backbone, its weights, the resize settings and the feature size."""
        return {
            "metric": self.name,
            "backbone": self.backbone,
            "weights": self.weights_path,
            "num_features": int(self.metric.real_features_sum.numel()),
            **self.resize,
        }


def resolve_inception_weights(weights_path: Optional[str | os.PathLike] = None) -> str:
    """Return a local file holding torch-fidelity's FID Inception weights, or raise a DQError naming --fid-weights.

    Args:
        weights_path: An explicit local file; without one, the torch hub cache
            (``$TORCH_HOME/hub/checkpoints``) is searched for the file torch-fidelity would download.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    filename = os.path.basename(URL_INCEPTION_V3)
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise DQError(
                f"--fid-weights {path}: no such file; expected torch-fidelity's Inception weights ({filename})."
            )
        return str(path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.is_file():
        return str(cached)
    raise DQError(
        f"FID needs the Inception weights {filename}, which are not in {cached.parent} and dq does not download. "
        f"Fetch {URL_INCEPTION_V3} on a machine with internet and pass --fid-weights PATH "
        "(FID(weights_path=PATH) in Python), or use a CLIP backbone."
    )
