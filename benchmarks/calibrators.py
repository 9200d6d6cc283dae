"""Timestep-aware calibrators vs round-to-nearest on the reference pipelines.

For ref-sd (UNet) and ref-pixart (DiT), at W8A8 and W4A8, every calibrator (PTQ4DM, Q-Diffusion,
TFMQ-DM, timestep-grouped min-max) is compared with RTN min-max (round-to-nearest weights, one
static min-max activation scale). Quality is measured against the FP pipeline of the same run, same
prompts and seeds: FID (domain-CLIP features, 32x32 images) of the quantized images against the FP
images, FID of FP and quantized images against real dataset images (and its delta), domain-CLIP score,
PSNR and LPIPS per image pair, plus calibration wall time and peak memory. The Q-Diffusion row without
split shortcut quantizers is the ablation (UNet only). "removed" is the fraction of RTN's degradation
(FID vs FP) a calibrator removes: 1 - FID_method / FID_rtn.

    python benchmarks/calibrators.py                       # 64 prompts, 20 steps (CPU: ~15 min on 16 cores)
    python benchmarks/calibrators.py --prompts 16 --models ref-sd --precisions W4A8   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import platform
import time
from pathlib import Path

import torch

import dq
from dq import reference
from dq.metrics import FID, LPIPS, PSNR, OpenCLIPScore, peak_memory, to_float
from dq.recipes import load_recipe

RESULTS = Path(__file__).parent / "results"

# method -> (bundled recipe, option overrides, CalibConfig.sampling the method's paper uses)
METHODS = {
    "rtn-minmax": ("w4a8-timestep", {"timestep_groups": 1}, "uniform"),
    "timestep-minmax": ("w4a8-timestep", {}, "uniform"),
    "ptq4dm": ("w8a8-ptq4dm", {}, "ndtc"),
    "qdiffusion": ("w4a8-qdiffusion", {}, "uniform"),
    "qdiffusion-nosplit": ("w4a8-qdiffusion", {"split_shortcut": False}, "uniform"),
    "tfmq": ("w4a8-tfmq", {}, "all"),
}
PRECISIONS = {"W8A8": "int8", "W4A8": "int4"}


def recipe_for(method: str, precision: str, overrides: dict) -> dq.Recipe:
    """The method's bundled recipe at `precision` (weight format swapped; activations stay INT8)."""
    name, options, _ = METHODS[method]
    recipe = load_recipe(name)
    weight = dataclasses.replace(recipe.weight, format=PRECISIONS[precision])
    return dataclasses.replace(recipe, name=f"{method}-{precision.lower()}", weight=weight, options={**recipe.options, **options, **overrides})


def generate(pipe, name: str, prompts: list[str], steps: int, batch: int) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1], seed = prompt index."""
    out = []
    for i in range(0, len(prompts), batch):
        gens = [torch.Generator().manual_seed(j) for j in range(i, min(i + batch, len(prompts)))]
        res = pipe(prompts[i : i + batch], num_inference_steps=steps, generator=gens, output_type="pt", **reference.generation_kwargs(name))
        out.append(res.images.float().cpu())
    return torch.cat(out)


def quality(images: torch.Tensor, fp: torch.Tensor, real: torch.Tensor, prompts: list[str], clip) -> dict:
    model, _, tokenizer = clip
    fid_fp = FID(backbone=model)
    fid_fp.update(images, reference=fp)
    fid_real = FID(backbone=model)
    fid_real.update(images, reference=real)
    score = OpenCLIPScore(model, tokenizer=tokenizer)
    score.update(images, prompts=prompts)
    psnr = PSNR()
    psnr.update(images, reference=fp)
    lpips = LPIPS()
    if lpips.unavailable is None:
        lpips.update(images, reference=fp)
    return {
        "fid_vs_fp": fid_fp.compute()["value"],
        "fid_real": fid_real.compute()["value"],
        "clip": score.compute()["value"],
        "psnr": psnr.compute()["value"],
        "lpips": lpips.compute()["value"] if lpips.unavailable is None else None,
    }


def run_model(name: str, args, clip, save=lambda result: None) -> dict:
    device = torch.device(args.device)
    prompts = reference.prompts("heldout", args.prompts)
    real = to_float(reference.real_samples(prompts))
    pipe = reference.load(name, device=device)
    start = time.perf_counter()
    fp = generate(pipe, name, prompts, args.steps, args.batch)
    fp_seconds = time.perf_counter() - start
    fp_quality = quality(fp, fp, real, prompts, clip)
    del pipe
    result = {"fp": {**fp_quality, "generate_s": fp_seconds}, "rows": []}
    unet = name == "ref-sd"
    for precision in args.precisions:
        for method in args.methods:
            if method == "qdiffusion-nosplit" and not unet:
                continue
            overrides = {"iters": args.iters, "act_iters": args.act_iters} if args.iters is not None and "iters" in load_recipe(METHODS[method][0]).options else {}
            recipe = recipe_for(method, precision, overrides)
            calib = dq.CalibConfig(
                prompts="reference", steps=args.steps, samples=args.calib_samples, sampling=METHODS[method][2],
                batch_size=args.batch, cache_dir=args.cache_dir, pipeline_kwargs=reference.generation_kwargs(name),
            )
            pipe = reference.load(name, device=device)
            gc.collect()
            with peak_memory(device) as peak:
                start = time.perf_counter()
                dq.quantize(pipe, recipe, calib=calib)
                calib_s = time.perf_counter() - start
            images = generate(pipe, name, prompts, args.steps, args.batch)
            row = {"precision": precision, "method": method, "recipe": recipe.to_dict(), "calib_s": calib_s,
                   "peak_mem_bytes": peak.bytes, "peak_mem_source": peak.source, **quality(images, fp, real, prompts, clip)}
            result["rows"].append(row)
            _summarise(result, fp_quality, args.precisions)
            save(result)  # partial results survive an interrupted run
            print(f"{name} {precision} {method:<20} FIDvsFP {row['fid_vs_fp']:.3f} PSNR {row['psnr']:.2f} calib {calib_s:.0f}s", flush=True)
            del pipe
    return result


def _summarise(result: dict, fp_quality: dict, precisions: list[str]) -> None:
    """Deltas to FP, and the fraction of RTN's FID-vs-FP degradation each method removes."""
    for precision in precisions:
        rows = [r for r in result["rows"] if r["precision"] == precision]
        rtn = next((r for r in rows if r["method"] == "rtn-minmax"), None)
        for r in rows:
            r["fid_real_delta"] = None if r["fid_real"] is None else r["fid_real"] - fp_quality["fid_real"]
            r["clip_delta"] = None if r["clip"] is None else r["clip"] - fp_quality["clip"]
            if rtn is not None and rtn["fid_vs_fp"]:
                r["degradation_removed"] = 1 - r["fid_vs_fp"] / rtn["fid_vs_fp"]


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(results: dict) -> str:
    lines = [f"# Calibrators vs RTN ({results['settings']['device']}, {results['settings']['prompts']} prompts, "
             f"{results['settings']['steps']} steps, {results['settings']['calib_samples']} calibration prompts)", ""]
    for name, res in results["models"].items():
        fp = res["fp"]
        lines += [f"## {name}", "", f"FP: FID vs real {_fmt(fp['fid_real'], '.3f')}, CLIP {_fmt(fp['clip'], '.2f')}", "",
                  "| precision | method | FID vs FP | removed | FID vs real (delta) | CLIP (delta) | PSNR | LPIPS | calib s | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            mem = None if r["peak_mem_bytes"] is None else r["peak_mem_bytes"] / 2**20
            lines.append(
                f"| {r['precision']} | {r['method']} | {_fmt(r['fid_vs_fp'], '.3f')} | {_fmt(r.get('degradation_removed'), '.0%')} | "
                f"{_fmt(r['fid_real'], '.3f')} ({_fmt(r.get('fid_real_delta'), '+.3f')}) | {_fmt(r['clip'], '.2f')} ({_fmt(r.get('clip_delta'), '+.2f')}) | "
                f"{_fmt(r['psnr'], '.2f')} | {_fmt(r['lpips'], '.4f')} | {r['calib_s']:.0f} | {_fmt(mem, '.0f')} |"
            )
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["ref-sd", "ref-pixart"])
    p.add_argument("--precisions", nargs="*", default=list(PRECISIONS), choices=list(PRECISIONS))
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts (images) evaluated per row")
    p.add_argument("--steps", type=int, default=20, help="denoising steps (FP, calibration and quantized runs)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration prompts (reference train split)")
    p.add_argument("--iters", type=int, default=None, help="override AdaRound iterations of the reconstruction recipes")
    p.add_argument("--act-iters", type=int, default=None, help="override LSQ iterations (with --iters)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cache-dir", default=None, help="reuse calibration data between runs")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/calibrators_<device>)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    clip = reference.domain_clip()
    results = {
        "settings": {**vars(args), "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()},
        "models": {},
    }
    stem = Path(args.out) if args.out else RESULTS / f"calibrators_{torch.device(args.device).type}"
    stem.parent.mkdir(parents=True, exist_ok=True)

    def save(model_result: dict | None = None, name: str | None = None) -> None:
        if model_result is not None:
            results["models"][name] = model_result
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))

    for name in args.models:
        save(run_model(name, args, clip, save=lambda r, n=name: save(r, n)), name)
    print(markdown(results))


if __name__ == "__main__":
    main()
