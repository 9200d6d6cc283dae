"""`accelerate launch --multi_gpu --num_processes 2 -m dq eval` gives the same results.json as one process.

On a CPU-only host accelerate starts the processes with torchrun and dq joins them over gloo
(`accelerate launch --cpu` would start a single process).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MEASURED = ("perf",)  # speed, memory, device and process count: they differ run to run


def _without_measurements(value):
    if isinstance(value, dict):
        return {k: _without_measurements(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [_without_measurements(v) for v in value]
    return value


def test_two_processes_match_one(tiny_sd, tiny_clip_dir, prompt_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(tmp_path / "torch_home")}
    args = ["eval", "--model", str(tiny_sd), "--variants", "fp,w8a8", "--prompts", str(prompt_file), "--n", "4",
            "--steps", "2", "--batch-size", "1", "--metrics", "fid,clip,psnr,ssim", "--fid-backbone", "clip",
            "--clip-model", f"local-dir:{tiny_clip_dir}"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--multi_gpu", "-m", "dq"]
    one = subprocess.run([sys.executable, "-m", "dq", *args, "--out", str(tmp_path / "one")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([*launch, *args, "--out", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]

    single = json.loads((tmp_path / "one" / "results.json").read_text())
    sharded = json.loads((tmp_path / "two" / "results.json").read_text())
    assert sharded["perf"]["num_processes"] == 2
    assert _without_measurements(sharded) == _without_measurements(single)
    # Each process generated only its share, and every image is identical.
    for image in sorted((tmp_path / "one" / "images").rglob("*.png")):
        twin = tmp_path / "two" / image.relative_to(tmp_path / "one")
        assert twin.read_bytes() == image.read_bytes(), image.name
    assert len(list((tmp_path / "two" / "perf" / "w8a8").glob("*.json"))) == 4
