"""Measured kernel choices per GPU, and the stated heuristic for GPUs without a table.

`python benchmarks/kernels.py --tune` times the candidate kernels of each choice at every shape class on the
GPU it runs on and writes `<gpu>.json` into this package (e.g. `nvidia-h200.json`), which the repo commits:

    {"gpu": "NVIDIA H200", "date": "...", "torch": "...", "choices": {"w8a8_fp8": {"large": "scaled_mm", ...}}}

Shape classes go by the token count M, the dimension that decides between a GEMM library and dq's fused
kernel: "skinny" (M <= 16), "small" (M <= 512), "medium" (M <= 4096), "large". N and K are the layer's own and
change less between the models' layers than M does between calls.

Heuristic without a table (FP8 W8A8): `torch._scaled_mm` (cuBLAS FP8 with rowwise scales: 1.6-1.8x BF16 with a
separate quantization kernel at large M, see the anchors) from M > 16; dq's Triton W8A8 kernel below that,
where the fused epilogue (low-rank branch, bias) saves launches that cost more than the GEMM.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

TUNED_DIR = Path(__file__).parent
SHAPE_CLASSES = (("skinny", 16), ("small", 512), ("medium", 4096), ("large", None))
CHOICES = {"w8a8_fp8": ("scaled_mm", "triton")}
HEURISTIC = {"w8a8_fp8": {"skinny": "triton", "small": "scaled_mm", "medium": "scaled_mm", "large": "scaled_mm"}}


def shape_class(m: int) -> str:
    """The shape class of a call with m tokens."""
    return next(name for name, top in SHAPE_CLASSES if top is None or m <= top)


def gpu_slug(name: str) -> str:
    """The table's file stem for a GPU name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@functools.cache
def table(gpu_name: str) -> dict | None:
    """The committed table of `gpu_name`, or None."""
    path = TUNED_DIR / f"{gpu_slug(gpu_name)}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def choose(kind: str, gpu_name: str, m: int) -> str:
    """The kernel for `kind` (a key of CHOICES) on the GPU `gpu_name` at m tokens: its table, else HEURISTIC."""
    cls = shape_class(m)
    measured = (table(gpu_name) or {}).get("choices", {}).get(kind, {})
    return measured.get(cls, HEURISTIC[kind][cls])


__all__ = ["CHOICES", "HEURISTIC", "SHAPE_CLASSES", "TUNED_DIR", "choose", "gpu_slug", "shape_class", "table"]
