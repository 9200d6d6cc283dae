"""Turn scored variants into RUN/results.json, RUN/report.md, RUN/grid.png and RUN/quality_vs_speed.png.

Every ratio is a variant's figure over the FP variant's figure from the same run. Measured speed and memory
sit under ``"perf"`` keys (per variant, and the run's device and process count at the top): they are the only
fields that differ between two runs of the same configuration (or between one process and N).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, ImageDraw

from dq.evaluation.generation import Item
from dq.evaluation.rundir import RunDir, read_pixels
from dq.io import atomic_file

GRID_PROMPTS = 8
GRID_MIN_CELL = 128


def add_ratios(results: dict[str, Any], fp_name: str) -> None:
    """Add ratios and deltas against FP to every variant (in place): weight bytes, latency, memory, FID, CLIP."""
    fp = results["variants"][fp_name]
    for entry in results["variants"].values():
        entry["weight_bytes_ratio"] = _ratio(entry.get("weight_bytes"), fp.get("weight_bytes"))
        metrics, fp_metrics = entry["metrics"], fp["metrics"]
        deltas = {}
        for key in ("clip", "fid_real"):
            value, base = _value(metrics, key), _value(fp_metrics, key)
            if value is not None and base is not None:
                deltas[key] = value - base
        entry["delta_vs_fp"] = deltas
        perf, fp_perf = entry.get("perf"), fp.get("perf")
        if perf and fp_perf:
            perf["latency_ratio"] = _ratio(perf.get("latency_per_image_s"), fp_perf.get("latency_per_image_s"))
            perf["memory_ratio"] = _ratio(perf.get("peak_memory_bytes"), fp_perf.get("peak_memory_bytes"))


def _ratio(value: Optional[float], base: Optional[float]) -> Optional[float]:
    return None if value is None or not base else value / base


def _value(metrics: dict[str, Any], key: str) -> Optional[float]:
    entry = metrics.get(key)
    return None if entry is None else entry.get("value")


def _fmt(value: Optional[float], spec: str = ".3f", suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:{spec}}{suffix}"


def _signed(value: Optional[float], spec: str = "+.2f") -> str:
    return "" if value is None else f" ({value:{spec}})"


def markdown_table(results: dict[str, Any]) -> str:
    """One row per variant: speed, memory and size ratios to FP, then quality against FP (and real images)."""
    header = [
        "variant", "s/img", "latency x FP", "peak mem x FP", "weights MiB", "weights x FP",
        "FID vs FP", "FID vs real (Δ)", "CLIP (Δ)", "PSNR dB", "SSIM", "LPIPS",
    ]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in results["variants"].items():
        perf = entry.get("perf") or {}
        metrics, delta = entry["metrics"], entry.get("delta_vs_fp", {})
        weight = entry.get("weight_bytes")
        cells = [
            f"`{name}`",
            _fmt(perf.get("latency_per_image_s"), ".3f"),
            _fmt(perf.get("latency_ratio"), ".2f", "x"),
            _fmt(perf.get("memory_ratio"), ".2f", "x"),
            _fmt(None if weight is None else weight / 2**20, ".2f"),
            _fmt(entry.get("weight_bytes_ratio"), ".3f", "x"),
            _fmt(_value(metrics, "fid"), ".3g"),
            _fmt(_value(metrics, "fid_real"), ".3g") + (_signed(delta.get("fid_real"), "+.3g") if name != results["fp"] else ""),
            _fmt(_value(metrics, "clip"), ".2f") + (_signed(delta.get("clip")) if name != results["fp"] else ""),
            _fmt(_value(metrics, "psnr"), ".2f"),
            _fmt(_value(metrics, "ssim"), ".4f"),
            _fmt(_value(metrics, "lpips"), ".4f"),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def markdown_report(results: dict[str, Any]) -> str:
    """The whole report.md: what was run, the table, metric settings, skipped metrics and the timing protocol."""
    gen = results["config"]
    lines = [
        f"# dq eval: {gen['model']}",
        "",
        f"{gen['prompts']['count']} prompts ({gen['prompts']['source']}), seeds {gen['seed']}..{gen['seed'] + gen['prompts']['count'] - 1}, "
        f"{gen['steps']} steps, guidance {gen['guidance'] if gen['guidance'] is not None else 'pipeline default'}, "
        f"batch size {gen['batch_size']}, dtype {gen['dtype']}, device {results['perf']['device']} x {results['perf']['num_processes']} process(es).",
        "",
        markdown_table(results),
        "",
        "Ratios and Δ are against `fp` in this run. FID vs FP and PSNR/SSIM/LPIPS compare each image with the FP image "
        "of the same prompt and seed; FID vs real uses real images of the reference domain.",
        "Latency: median seconds per image over the timed batches (one untimed 1-step warm-up call per variant and "
        "process first); peak memory: " + str(_first_memory_source(results)) + ".",
    ]
    if results["metric_settings"]:
        lines += ["", "## Metric settings", ""]
        for name, settings in results["metric_settings"].items():
            lines.append(f"- `{name}`: " + ", ".join(f"{k}={v}" for k, v in settings.items() if k != "metric"))
    if results["skipped_metrics"]:
        lines += ["", "## Skipped metrics", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in results["skipped_metrics"].items()]
    return "\n".join(lines) + "\n"


def _first_memory_source(results: dict[str, Any]) -> Optional[str]:
    for entry in results["variants"].values():
        if entry.get("perf"):
            return entry["perf"].get("memory_source")
    return None


def write_grid(path: Path, run: RunDir, results: dict[str, Any], items: list[Item], video: bool) -> None:
    """The first prompts side by side across variants (rows: prompts, columns: variants; clips as frame strips)."""
    variants = list(results["variants"])
    shown = items[:GRID_PROMPTS]
    cells = [[_strip(read_pixels(run.image_path(v, it.index, it.seed, video))) for v in variants] for it in shown]
    height, width = cells[0][0].shape[:2]
    scale = max(1, math.ceil(GRID_MIN_CELL / height))
    cell_w, cell_h, label_h, pad = width * scale, height * scale, 16, 4
    canvas = Image.new("RGB", (len(variants) * (cell_w + pad) + pad, label_h + len(shown) * (cell_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for col, name in enumerate(variants):
        draw.text((pad + col * (cell_w + pad), 2), name, fill="black")
    for row, line in enumerate(cells):
        for col, pixels in enumerate(line):
            tile = Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (pad + col * (cell_w + pad), label_h + pad + row * (cell_h + pad)))
    with atomic_file(path) as tmp:
        canvas.save(tmp, format="PNG")


def _strip(frames: np.ndarray) -> np.ndarray:
    """Frames ``(F, H, W, 3)`` side by side as one ``(H, F*W, 3)`` image."""
    return np.concatenate(list(frames), axis=1)


def write_plot(path: Path, results: dict[str, Any]) -> bool:
    """Quality vs speed: PSNR against FP (or CLIP score) over latency ratio, one labelled point per variant."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never open a window
    import matplotlib.pyplot as plt

    quality_key = next((k for k in ("psnr", "clip", "fid_real") if any(
        _value(e["metrics"], k) is not None for e in results["variants"].values())), None)
    points = []
    for name, entry in results["variants"].items():
        ratio = (entry.get("perf") or {}).get("latency_ratio")
        quality = None if quality_key is None else _value(entry["metrics"], quality_key)
        if ratio is not None and quality is not None and math.isfinite(quality):
            points.append((name, ratio, quality))
    if not points:
        return False
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for name, x, y in points:
        ax.scatter([x], [y], s=40)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axvline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xlabel("latency per image / FP latency (lower is faster)")
    label = {"psnr": "PSNR vs FP (dB, higher is better; FP = inf, not shown)",
             "clip": "CLIP score (higher is better)", "fid_real": "FID vs real (lower is better)"}[quality_key]
    ax.set_ylabel(label, fontsize=8)
    ax.set_title(f"dq eval: {results['config']['model']}", fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True
