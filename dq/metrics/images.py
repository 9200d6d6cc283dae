"""Image batches in the forms diffusers pipelines return, converted to the tensors torchmetrics expects.

Accepted inputs (all images in a batch share one size):

- a list of ``PIL.Image.Image`` (``output_type="pil"``, the pipeline default), any mode, converted to RGB;
- a ``torch.uint8`` tensor ``(N, 3, H, W)`` or a list of ``(3, H, W)`` tensors, values in ``[0, 255]``;
- a floating tensor ``(N, 3, H, W)`` or a list of ``(3, H, W)`` tensors, values in ``[0, 1]``
  (``output_type="pt"``). Raw VAE output in ``[-1, 1]`` is rejected: map it with ``(x + 1) / 2`` first.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

from dq.errors import DQError

Images = Union[torch.Tensor, Sequence[Image.Image], Sequence[torch.Tensor]]

# bf16/fp16 decoders overshoot [0, 1] by a rounding step; anything beyond this is a range mistake.
_FLOAT_TOLERANCE = 1e-2


def to_uint8(images: Images) -> torch.Tensor:
    """Return the batch as a ``uint8`` tensor ``(N, 3, H, W)`` in ``[0, 255]``.

    Args:
        images: PIL images, or uint8 / float tensors as described in the module docstring.
    """
    batch = _stack(images)
    if batch.dtype == torch.uint8:
        return batch
    return (batch * 255).round().to(torch.uint8)


def to_float(images: Images) -> torch.Tensor:
    """Return the batch as a ``float32`` tensor ``(N, 3, H, W)`` in ``[0, 1]``.

    Args:
        images: PIL images, or uint8 / float tensors as described in the module docstring.
    """
    batch = _stack(images)
    if batch.dtype == torch.uint8:
        return batch.float() / 255
    return batch.float()


def _stack(images: Images) -> torch.Tensor:
    """Stack any accepted input into one ``(N, 3, H, W)`` tensor, uint8 or float in [0, 1]."""
    if isinstance(images, torch.Tensor):
        batch = images.unsqueeze(0) if images.ndim == 3 else images
    elif len(images) == 0:
        raise DQError("got an empty image list; expected at least one image.")
    elif all(isinstance(image, Image.Image) for image in images):
        arrays = [np.asarray(image.convert("RGB")) for image in images]
        _check_same_size([a.shape[:2] for a in arrays])
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    elif all(isinstance(image, torch.Tensor) for image in images):
        _check_same_size([tuple(image.shape) for image in images])
        batch = torch.stack(list(images))
    else:
        kinds = sorted({type(image).__name__ for image in images})
        raise DQError(f"got images of type {', '.join(kinds)}; expected PIL images or torch tensors, not a mix.")
    if batch.ndim != 4 or batch.shape[1] != 3:
        raise DQError(f"got an image batch of shape {tuple(batch.shape)}; expected (N, 3, H, W) RGB images.")
    if batch.dtype == torch.uint8:
        return batch
    if not batch.is_floating_point():
        raise DQError(f"got image dtype {batch.dtype}; expected torch.uint8 in [0, 255] or a float dtype in [0, 1].")
    low, high = batch.min().item(), batch.max().item()
    if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
        raise DQError(
            f"got float images with values in [{low:.3g}, {high:.3g}]; expected [0, 1]. "
            "Map VAE output in [-1, 1] with (x + 1) / 2, or pass output_type='pt' to the pipeline."
        )
    return batch.clamp(0, 1)


def _check_same_size(shapes: list[tuple[int, ...]]) -> None:
    """Raise when a list of images mixes sizes, which no batched metric accepts."""
    if len(set(shapes)) > 1:
        raise DQError(f"got images of different sizes {sorted(set(shapes))}; expected one size per batch.")
