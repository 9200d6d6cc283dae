"""The RUN directory: where each artifact lives, its writers (atomic, via dq.io), and the guard against mixing
configurations.

Layout::

    RUN/config.json                  generation settings (compared on every re-run) + scoring settings
    RUN/images/<variant>/<i>_<seed>.png        one image per prompt index i (video: a directory of frames)
    RUN/perf/<variant>/<batch>.json  time, steps and peak memory of the batch that made those images
    RUN/variants/<variant>.json      weight bytes and quantization summary of the variant
    RUN/results.json  RUN/report.md  RUN/grid.png  RUN/quality_vs_speed.png
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dq.errors import DQError
from dq.io import atomic_directory, atomic_file

CONFIG_FILE = "config.json"
CONFIG_VERSION = 1


class RunDir:
    """Paths and atomic writers of one RUN directory.

    Args:
        root: The RUN directory.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def image_path(self, variant: str, index: int, seed: int, video: bool) -> Path:
        """Where the image (or, for video, the frame directory) of prompt ``index`` lives."""
        stem = f"{index:05d}_{seed}"
        return self.root / "images" / variant / (stem if video else f"{stem}.png")

    def perf_path(self, variant: str, batch: int) -> Path:
        """Timing record of one generated batch."""
        return self.root / "perf" / variant / f"{batch:05d}.json"

    def variant_path(self, variant: str) -> Path:
        """Weight bytes and quantization summary of a variant."""
        return self.root / "variants" / f"{variant}.json"

    def check(self, generation: dict) -> bool:
        """Refuse a RUN made with different generation settings, or a non-empty directory that is not a dq run.

        Returns True when the RUN exists with the same settings (a resume).
        """
        config_file = self.root / CONFIG_FILE
        if self.root.exists() and not self.root.is_dir():
            raise DQError(f"--out {self.root} is a file; expected a directory for the run.")
        if config_file.is_file():
            try:
                old = json.loads(config_file.read_text())["generation"]
            except (ValueError, KeyError) as error:
                raise DQError(f"{config_file}: unreadable ({error}); pass --overwrite to start the run afresh.") from None
            diff = config_differences(old, generation)
            if diff:
                raise DQError(
                    f"{self.root} holds a run with a different configuration:\n  " + "\n  ".join(diff)
                    + "\nPass --overwrite to delete it and start again, or choose another --out."
                )
            return True
        if self.root.exists() and any(self.root.iterdir()):
            raise DQError(
                f"{self.root} exists and is not a dq eval run (no {CONFIG_FILE}); "
                "pass --overwrite to replace it, or choose another --out."
            )
        return False

    def prepare(self, generation: dict, scoring: dict, overwrite: bool) -> bool:
        """Create the RUN (deleting an existing one first with ``overwrite``) and write its config; True on resume."""
        if overwrite and self.root.exists():
            if self.root.is_dir():
                shutil.rmtree(self.root)
            else:
                self.root.unlink()
        resumed = self.check(generation)
        self.root.mkdir(parents=True, exist_ok=True)
        write_json(self.root / CONFIG_FILE, {"version": CONFIG_VERSION, "generation": generation, "scoring": scoring})
        return resumed


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (indented, keys in insertion order)."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, allow_nan=True) + "\n")


def read_json(path: Path) -> Any:
    """Read a JSON file written by ``write_json``."""
    return json.loads(Path(path).read_text())


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Write one ``(H, W, 3)`` uint8 image as PNG (lossless, so metrics see exactly what was generated)."""
    with atomic_file(path) as tmp:
        Image.fromarray(pixels).save(tmp, format="PNG")


def write_frames(path: Path, frames: np.ndarray) -> None:
    """Write a clip ``(F, H, W, 3)`` uint8 as a directory of PNG frames, renamed into place in one step."""
    with atomic_directory(path) as tmp:
        for f, frame in enumerate(frames):
            Image.fromarray(frame).save(tmp / f"{f:04d}.png", format="PNG")


def read_pixels(path: Path) -> np.ndarray:
    """Read an image as ``(1, H, W, 3)`` uint8, or a frame directory as ``(F, H, W, 3)``."""
    files = sorted(path.glob("*.png")) if path.is_dir() else [path]
    return np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable ``key: old -> new`` lines for every generation setting that differs."""
    lines = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            before, after = json.dumps(old.get(key))[:120], json.dumps(new.get(key))[:120]
            lines.append(f"{key}: {before} -> {after}")
    return lines
