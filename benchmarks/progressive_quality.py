"""Progressive groups (QServe, dq.quant.progressive) against today's group-64 INT4 weights at W4A8.

For each reference pipeline, the W4A8 recipes in both weight layouts -- plain round-to-nearest (`w4a8` vs
`w4a8-progressive`) and SVDQuant (`svdquant-w4a8` vs `svdquant-w4a8-progressive`) -- are quantized and
scored against the FP pipeline of the same run, same prompts and seeds: FID (domain-CLIP features) and PSNR
against the FP images, FID against real images, and the weight bytes as a fraction of the FP32 denoiser's.

    python benchmarks/progressive_quality.py                       # ref-sd and ref-pixart, 32 prompts
    python benchmarks/progressive_quality.py --models ref-sd --prompts 8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

import dq
from dq import reference
from dq.metrics import to_float
from dq.metrics.perf import cpu_name
from dq.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from calibrators import generate, quality  # noqa: E402  the calibrator benchmark's generation and metrics

RESULTS = Path(__file__).parent / "results"
PAIRS = [("w4a8", "w4a8-progressive"), ("svdquant-w4a8", "svdquant-w4a8-progressive")]


def run_model(name: str, args, clip) -> list[dict]:
    prompts = reference.prompts("heldout", args.prompts)
    real = to_float(reference.real_samples(prompts))
    fp = generate(reference.load(name), name, prompts, args.steps, args.batch)
    rows = []
    for recipe in [r for pair in PAIRS for r in pair]:
        pipe = reference.load(name)
        calib = dq.CalibConfig(prompts="reference", steps=args.steps, samples=args.calib_samples,
                               batch_size=args.batch, pipeline_kwargs=reference.generation_kwargs(name))
        start = time.perf_counter()
        report = dq.quantize(pipe, recipe, calib=calib if load_recipe(recipe).needs_data else None)
        seconds = time.perf_counter() - start
        pipe.set_progress_bar_config(disable=True)
        q = quality(generate(pipe, name, prompts, args.steps, args.batch), fp, real, prompts, clip)
        rows.append({"recipe": recipe, "seconds": seconds, "weight_ratio": report.compression, **q})
        print(f"{name} {recipe:<28} FID vs FP {q['fid_vs_fp']:.3f}  PSNR {q['psnr']:.2f}  bytes {report.compression:.3f}x", flush=True)
    return rows


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Progressive groups vs group-64 INT4 at W4A8 ({s['machine']}, {s['date']}; {s['prompts']} held-out prompts, "
             f"{s['steps']} steps, {s['calib_samples']} calibration prompts)", "",
             "Each pair: today's symmetric INT4 group-64 weights, then the same recipe with QServe's progressive groups "
             "(UINT4 g64, integer group scales and zeros under a per-channel scale: the layout whose W4A8 GEMM runs in "
             "one INT8 K loop). FID (domain-CLIP features) and PSNR against the FP pipeline's images of the same run; "
             "bytes: the denoiser's bytes as a fraction of FP32.", ""]
    for name, rows in results["models"].items():
        lines += [f"## {name}", "", "| recipe | FID vs FP | PSNR vs FP (dB) | FID vs real | bytes x FP32 | quantize s |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['recipe']} | {r['fid_vs_fp']:.3f} | {r['psnr']:.2f} | {r['fid_real']:.3f} | {r['weight_ratio']:.3f} | {r['seconds']:.0f} |"
                  for r in rows]
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["ref-sd", "ref-pixart"])
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts (images) evaluated per row")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "progressive_quality_cpu"))
    args = p.parse_args()
    clip = reference.domain_clip()
    results = {"settings": {**vars(args), "machine": cpu_name(), "date": str(date.today()), "threads": torch.get_num_threads()},
               "models": {}}
    stem = Path(args.out)
    for name in args.models:
        results["models"][name] = run_model(name, args, clip)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
