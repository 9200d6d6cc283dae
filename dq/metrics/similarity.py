"""Fidelity of each quantized image to the FP image generated with the same prompt and seed.

PSNR and SSIM come from ``torchmetrics.functional``; LPIPS from torchmetrics'
``LearnedPerceptualImagePatchSimilarity``. Images are compared as float ``[0, 1]`` tensors (``data_range=1``),
whatever form they arrive in (see ``dq.metrics.images``). Higher PSNR/SSIM and lower LPIPS mean closer to FP.
"""

from __future__ import annotations

import logging
import os
import tempfile
from abc import abstractmethod
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Sequence

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from dq.errors import DQError
from dq.metrics.base import METRICS, PerImageMetric
from dq.metrics.images import Images, to_float

logger = logging.getLogger(__name__)

LPIPSNet = Literal["alex", "vgg"]

# torchvision weight enums whose files LearnedPerceptualImagePatchSimilarity downloads for its backbone.
_LPIPS_BACKBONE_WEIGHTS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights"}


class PairedImageMetric(PerImageMetric):
    """Base for metrics that compare each image with its FP reference of the same prompt and seed."""

    needs = ("reference",)

    def _scores(
        self, images: Images, reference: Optional[Images], prompts: Optional[Sequence[str]]
    ) -> torch.Tensor:
        if reference is None:
            raise DQError(f"{self.name} compares each image with its FP reference; got reference=None.")
        preds, target = to_float(images).to(self.device), to_float(reference).to(self.device)
        if preds.shape != target.shape:
            raise DQError(
                f"{self.name}: images have shape {tuple(preds.shape)} but references {tuple(target.shape)}; "
                "expected one FP image of the same size per evaluated image."
            )
        return self._pair_scores(preds, target)

    @abstractmethod
    def _pair_scores(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return one score per pair of float ``(N, 3, H, W)`` batches in ``[0, 1]``."""


@METRICS.register("psnr")
class PSNR(PairedImageMetric):
    """Peak signal-to-noise ratio in dB per image pair; ``inf`` for identical images.

    Example:
        >>> metric = PSNR()
        >>> metric.update(quantized_images, reference=fp_images)
        >>> metric.compute()["value"]
    """

    name = "psnr"
    higher_is_better = True

    def _pair_scores(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return peak_signal_noise_ratio(preds, target, data_range=1.0, reduction="none", dim=(1, 2, 3))

    def settings(self) -> dict[str, Any]:
        return {"metric": self.name, "data_range": 1.0}


@METRICS.register("ssim")
class SSIM(PairedImageMetric):
    """Structural similarity per image pair (Gaussian window); 1 for identical images.

    Args:
        kernel_size: Gaussian window size.
        sigma: Gaussian window standard deviation.
    """

    name = "ssim"
    higher_is_better = True

    def __init__(self, kernel_size: int = 11, sigma: float = 1.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kernel_size = kernel_size
        self.sigma = sigma

    def _pair_scores(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return structural_similarity_index_measure(
            preds, target, data_range=1.0, kernel_size=self.kernel_size, sigma=self.sigma, reduction="none"
        )

    def settings(self) -> dict[str, Any]:
        return {"metric": self.name, "data_range": 1.0, "kernel_size": self.kernel_size, "sigma": self.sigma}


@METRICS.register("lpips")
class LPIPS(PairedImageMetric):
    """LPIPS distance per image pair with torchmetrics' ``LearnedPerceptualImagePatchSimilarity``.

    The LPIPS heads ship with torchmetrics; the backbone (torchvision AlexNet or VGG16) is a download. It is
    read from ``weights_path`` or from the torch hub cache (``$TORCH_HOME/hub/checkpoints``). When neither has
    it, the metric logs a warning and reports ``{"value": None, "reason": ...}`` instead of failing the run.

    Args:
        net: Backbone, ``"alex"`` (the LPIPS default) or ``"vgg"``.
        weights_path: Local copy of the torchvision backbone state dict (e.g. ``alexnet-owt-7be5be79.pth``).

    Example:
        >>> metric = LPIPS("alex", weights_path="alexnet-owt-7be5be79.pth")
        >>> metric.update(quantized_images, reference=fp_images)
        >>> metric.compute()  # {"value": 0.04, "per_image": [...], "ids": [...]}
    """

    name = "lpips"
    higher_is_better = False

    def __init__(self, net: LPIPSNet = "alex", weights_path: Optional[str | os.PathLike] = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if net not in _LPIPS_BACKBONE_WEIGHTS:
            raise DQError(f"unknown LPIPS net {net!r}; expected one of {', '.join(_LPIPS_BACKBONE_WEIGHTS)}.")
        self.net_type = net
        self.weights_file = lpips_backbone_filename(net)
        local = _resolve_lpips_weights(net, weights_path)
        self.weights_path = str(local) if local is not None else None
        self.lpips = None
        if local is None:
            self.unavailable = (
                f"LPIPS needs the torchvision {net} backbone weights ({self.weights_file}); none were passed and "
                f"none are in {Path(torch.hub.get_dir()) / 'checkpoints'}. Pass --lpips-weights PATH."
            )
            logger.warning("skipping LPIPS: %s", self.unavailable)
            return
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        with _hub_checkpoint(local, self.weights_file):
            self.lpips = LearnedPerceptualImagePatchSimilarity(net_type=net, reduction="none", normalize=True)

    def _pair_scores(self, preds: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.lpips.net(preds, target, normalize=True).reshape(-1)

    def settings(self) -> dict[str, Any]:
        return {"metric": self.name, "net": self.net_type, "weights": self.weights_path, "input_range": [0, 1]}


def lpips_backbone_filename(net: LPIPSNet) -> str:
    """Return the file name torchvision downloads for the LPIPS backbone ``net`` (its hub cache name).

    Args:
        net: ``"alex"`` or ``"vgg"``.
    """
    import torchvision

    weights = getattr(torchvision.models, _LPIPS_BACKBONE_WEIGHTS[net]).DEFAULT
    return os.path.basename(weights.url)


def _resolve_lpips_weights(net: LPIPSNet, weights_path: Optional[str | os.PathLike]) -> Optional[Path]:
    """Return a local backbone weights file, None when there is none, or raise for a bad explicit path."""
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise DQError(
                f"--lpips-weights {path}: no such file; expected the torchvision {net} state dict "
                f"({lpips_backbone_filename(net)})."
            )
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / lpips_backbone_filename(net)
    return cached if cached.is_file() else None


@contextmanager
def _hub_checkpoint(path: Path, filename: str) -> Iterator[None]:
    """Serve ``path`` as torch hub's cached ``filename`` so torchvision loads it instead of downloading."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cache.is_file() and cache.resolve() == path.resolve():
        yield
        return
    # torch.hub has no public "unset"; restore the private field so $TORCH_HOME keeps working afterwards.
    previous = torch.hub._hub_dir
    with tempfile.TemporaryDirectory(prefix="dq-hub-") as tmp:
        (Path(tmp) / "checkpoints").mkdir()
        (Path(tmp) / "checkpoints" / filename).symlink_to(path.resolve())
        torch.hub.set_dir(tmp)
        try:
            yield
        finally:
            torch.hub._hub_dir = previous
