"""Turn generated pixels into what the UI shows: enlarged images, animated GIFs, side-by-side clips.

Small outputs (the 32x32 reference models) are enlarged by an integer factor with nearest-neighbour
resampling, so every generated pixel stays visible as a sharp block instead of being blurred by the browser.
Metrics are always computed on the original pixels, never on these display copies.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image

DISPLAY_SIZE = 256  # images whose longer side is shorter are enlarged to at least this
GIF_FRAME_MS = 120  # GIF stores centiseconds
GAP = 4  # pixels between clips placed side by side


def display_image(pixels: np.ndarray, min_size: int = DISPLAY_SIZE) -> Image.Image:
    """A PIL image of uint8 ``(H, W, 3)`` pixels, enlarged by an integer factor when smaller than ``min_size``.

    Example:
        >>> display_image(np.zeros((32, 32, 3), np.uint8)).size
        (256, 256)
    """
    image = Image.fromarray(pixels)
    factor = max(1, -(-min_size // max(image.size)))
    if factor > 1:
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    return image


def middle_frame(pixels: np.ndarray) -> np.ndarray:
    """The image itself, or the middle frame of an ``(F, H, W, 3)`` clip."""
    return pixels[len(pixels) // 2] if pixels.ndim == 4 else pixels


def side_by_side(clips: list[np.ndarray], gap: int = GAP) -> np.ndarray:
    """Clips ``(F, H, W, 3)`` of equal shape placed left to right with a white gap, as one clip."""
    frames, height = clips[0].shape[0], clips[0].shape[1]
    spacer = np.full((frames, height, gap, 3), 255, np.uint8)
    parts: list[np.ndarray] = []
    for i, clip in enumerate(clips):
        if i:
            parts.append(spacer)
        parts.append(clip)
    return np.concatenate(parts, axis=2)


class MediaDir:
    """A folder for the files the UI serves (GIFs), under ``$GRADIO_TEMP_DIR`` when set.

    Args:
        root: The parent folder; default ``$GRADIO_TEMP_DIR`` or the system temp dir.
    """

    def __init__(self, root: Optional[str] = None) -> None:
        parent = root or os.environ.get("GRADIO_TEMP_DIR") or None
        if parent:
            Path(parent).mkdir(parents=True, exist_ok=True)
        self.path = Path(tempfile.mkdtemp(prefix="dq-app-", dir=parent))

    def gif(self, clip: np.ndarray, name: str) -> str:
        """Write an animated, looping GIF of a uint8 ``(F, H, W, 3)`` clip (enlarged for display); return its path."""
        frames = [display_image(frame) for frame in clip]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        path = self.path / f"{safe}-{uuid.uuid4().hex[:8]}.gif"
        frames[0].save(path, save_all=True, append_images=frames[1:], duration=GIF_FRAME_MS, loop=0)
        return str(path)
