"""Procedural captioned shapes: images and short clips whose caption fully describes them.

Every sample is a pure function of ``(seed, index)``, so the datasets are unlimited and
reproducible. A fixed subset of caption combinations is held out from training.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (40, 70, 230),
    "yellow": (245, 220, 20),
    "purple": (150, 40, 200),
    "orange": (250, 130, 10),
}
SIZES = {"small": 4.0, "large": 7.5}  # half-extent in pixels at 32x32
POSITIONS = {
    "at the top left": (8.5, 8.5),
    "at the top right": (23.5, 8.5),
    "at the bottom left": (8.5, 23.5),
    "at the bottom right": (23.5, 23.5),
    "in the center": (16.0, 16.0),
}
BACKGROUNDS = {
    "black": (15, 15, 15),
    "white": (240, 240, 240),
    "gray": (128, 128, 128),
    "brown": (110, 65, 30),
}
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

IMAGE_SIZE = 32
NUM_FRAMES = 9
HELDOUT_FRACTION = 0.15
_SPLIT_SEED = 20240601
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class Scene:
    """One shape on a background; ``motion`` is a direction name for clips, None for images."""

    shape: str
    color: str
    size: str
    background: str
    position: str | None = None
    motion: str | None = None

    @property
    def caption(self) -> str:
        where = f"moving {self.motion}" if self.motion else self.position
        return f"a {self.size} {self.color} {self.shape} {where} on a {self.background} background"


def all_scenes(video: bool = False) -> list[Scene]:
    """Every caption combination of the image (or video) vocabulary, in a fixed order."""
    places = DIRECTIONS if video else POSITIONS
    scenes = []
    for shape, color, size, place, bg in itertools.product(SHAPES, COLORS, SIZES, places, BACKGROUNDS):
        if video:
            scenes.append(Scene(shape, color, size, bg, motion=place))
        else:
            scenes.append(Scene(shape, color, size, bg, position=place))
    return scenes


def split_scenes(split: str, video: bool = False) -> list[Scene]:
    """The ``"train"`` or ``"heldout"`` scenes; the held-out captions never appear in training."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    scenes = all_scenes(video)
    order = np.random.default_rng(_SPLIT_SEED + int(video)).permutation(len(scenes))
    n_heldout = int(round(HELDOUT_FRACTION * len(scenes)))
    chosen = order[:n_heldout] if split == "heldout" else order[n_heldout:]
    return [scenes[i] for i in sorted(chosen)]


def scene_from_caption(caption: str) -> Scene:
    """Inverse of ``Scene.caption`` for any caption of either vocabulary."""
    table = _caption_table()
    if caption not in table:
        raise ValueError(f"not a caption of the reference vocabulary: {caption!r}")
    return table[caption]


_CAPTIONS: dict[str, Scene] = {}


def _caption_table() -> dict[str, Scene]:
    if not _CAPTIONS:
        _CAPTIONS.update({s.caption: s for s in all_scenes(False) + all_scenes(True)})
    return _CAPTIONS


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    k = _SUPERSAMPLE
    cx, cy, r = cx * k, cy * k, r * k
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)


def _jitter_color(rgb, rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in rgb)


def render_frame(scene: Scene, cx: float, cy: float, rng: np.random.Generator) -> Image.Image:
    """Draw ``scene``'s shape centred at ``(cx, cy)`` (32x32 pixel units) with mild colour jitter."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (IMAGE_SIZE * k, IMAGE_SIZE * k), _jitter_color(BACKGROUNDS[scene.background], rng))
    radius = SIZES[scene.size] * float(rng.uniform(0.92, 1.08))
    _draw_shape(ImageDraw.Draw(canvas), scene.shape, cx, cy, radius, _jitter_color(COLORS[scene.color], rng))
    return canvas.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BOX)


def render_image(scene: Scene, rng: np.random.Generator) -> Image.Image:
    """A 32x32 RGB image of ``scene`` with a small random offset."""
    cx, cy = POSITIONS[scene.position]
    return render_frame(scene, cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5), rng)


def render_clip(scene: Scene, rng: np.random.Generator, num_frames: int = NUM_FRAMES) -> list[Image.Image]:
    """``num_frames`` 32x32 frames of ``scene``'s shape crossing the frame in its direction."""
    dx, dy = DIRECTIONS[scene.motion]
    margin = SIZES[scene.size] + 1.0
    start, end = margin, IMAGE_SIZE - margin
    offset = rng.uniform(-2.0, 2.0)
    state = rng.bit_generator.state
    frames = []
    for t in np.linspace(0.0, 1.0, num_frames):
        along = start + (end - start) * (t if (dx + dy) > 0 else 1.0 - t)
        cx, cy = (along, 16.0 + offset) if dx else (16.0 + offset, along)
        rng.bit_generator.state = state  # same colours and size in every frame
        frames.append(render_frame(scene, cx, cy, rng))
    return frames


def to_tensor(images: list[Image.Image]) -> np.ndarray:
    """Stack PIL images to a float32 array in [-1, 1], shape (N, 3, H, W)."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 127.5 - 1.0
    return arr.transpose(0, 3, 1, 2)


class ShapesDataset:
    """Index -> (caption, PIL image) over the ``split`` scenes; unlimited and deterministic."""

    video = False

    def __init__(self, split: str = "train", seed: int = 0) -> None:
        self.split = split
        self.seed = seed
        self.scenes = split_scenes(split, self.video)

    def _sample_rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, int(self.video), index])

    def scene(self, index: int) -> Scene:
        return self.scenes[int(self._sample_rng(index).integers(len(self.scenes)))]

    def __getitem__(self, index: int):
        rng = self._sample_rng(index)
        scene = self.scenes[int(rng.integers(len(self.scenes)))]
        return scene.caption, self._render(scene, rng)

    def _render(self, scene: Scene, rng: np.random.Generator):
        return render_image(scene, rng)


class ShapesVideoDataset(ShapesDataset):
    """Index -> (caption, list of ``NUM_FRAMES`` PIL frames) of moving shapes."""

    video = True

    def _render(self, scene: Scene, rng: np.random.Generator):
        return render_clip(scene, rng)


def prompts(split: str = "heldout", n: int | None = None, video: bool = False) -> list[str]:
    """Deterministic caption list: all distinct captions of ``split`` shuffled, cycled to ``n``."""
    captions = [s.caption for s in split_scenes(split, video)]
    order = np.random.default_rng(_SPLIT_SEED + 7 + int(video)).permutation(len(captions))
    captions = [captions[i] for i in order]
    if n is None:
        return captions
    return [captions[i % len(captions)] for i in range(n)]


def real_samples(captions: list[str], seed: int = 0):
    """One real image (or clip, for video captions) per caption, deterministic in ``seed``."""
    out = []
    for i, caption in enumerate(captions):
        scene = scene_from_caption(caption)
        rng = np.random.default_rng([seed, 99, i])
        out.append(render_clip(scene, rng) if scene.motion else render_image(scene, rng))
    return out
