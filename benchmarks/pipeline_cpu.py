"""CPU pipeline benchmark: one denoiser step, FP32 vs each deployed dq recipe, runs interleaved.

Full-size denoisers from their published configs with random weights (speed does not depend on the
values), FP32, at a small resolution. Each recipe is deployed on a copy of the FP model that shares its
float tensors (only the quantized layers get packed buffers), so FP and variant live side by side and
are timed alternately: FP, variant, FP, variant, ... A noisy machine then slows both alike, and the
median ratio of the back-to-back pairs is the figure that counts.

Calibrated recipes (svdquant-*) are deployed in the structure their calibration produces (smoothing
vector, rank-r 16-bit branch from the weight's SVD, packed residual) without running the calibration:
the deployed layer's cost does not depend on the searched values.

    python benchmarks/pipeline.py sd15 --device cpu [--recipes w8a8,w4a16,svdquant-w4a4] [--rounds 3]
    dq bench pipeline pixart --device cpu --resolution 256 --batch 2
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from datetime import date
from pathlib import Path

import torch
from torch import nn

from dq.calib import plan_quantization
from dq.kernels.reference import release_scratch, scratch_bytes
from dq.metrics.perf import cpu_name, peak_memory
from dq.nn import deploy_all, swap_layers
from dq.recipes import load_recipe
from dq.sizes import module_bytes

SD15_UNET = dict(sample_size=64, cross_attention_dim=768)  # the rest is UNet2DConditionModel's default (SD1.x)
SDXL_UNET = dict(sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                 use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816)
DEFAULT_RECIPES = "w8a8,w4a16,svdquant-w4a8,svdquant-w4a4"


def build(model: str, resolution: int, batch: int) -> tuple[nn.Module, dict]:
    """(FP32 denoiser with random weights, its inputs for `batch` images of resolution x resolution)."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel
    from pipeline import PIXART_SIGMA_XL  # the GPU benchmark's published config

    torch.manual_seed(0)
    side = resolution // 8
    latents = torch.randn(batch, 4, side, side)
    if model in ("sd15", "sdxl"):
        cfg = SD15_UNET if model == "sd15" else SDXL_UNET
        net = UNet2DConditionModel(**cfg)
        inputs = dict(sample=latents, timestep=torch.tensor([500] * batch),
                      encoder_hidden_states=torch.randn(batch, 77, net.config.cross_attention_dim), return_dict=False)
        if model == "sdxl":
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 1280), "time_ids": torch.randn(batch, 6)}
    elif model == "pixart":
        net = PixArtTransformer2DModel(**PIXART_SIGMA_XL)
        inputs = dict(hidden_states=latents, encoder_hidden_states=torch.randn(batch, 300, PIXART_SIGMA_XL["caption_channels"]),
                      timestep=torch.tensor([500] * batch), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                      return_dict=False)
    else:
        raise SystemExit(f"unknown CPU model {model!r}; known: sd15, sdxl, pixart")
    return net.eval().requires_grad_(False), inputs


def deployed_copy(fp: nn.Module, recipe_name: str) -> tuple[nn.Module, int]:
    """A copy of `fp` sharing its tensors, with the recipe's layers swapped and deployed; (copy, layers)."""
    recipe = load_recipe(recipe_name)
    shared = {id(t): t for t in (*fp.parameters(), *fp.buffers())}
    model = copy.deepcopy(fp, memo=shared)
    plans = plan_quantization(model, recipe).selection.plans
    swap_layers(model, plans)
    deploy_all(model)
    return model, len(plans)


def timed_step(model: nn.Module, inputs: dict) -> tuple[float, int]:
    """(seconds, peak RSS above the RSS before the call) of one denoiser call."""
    import psutil

    before = psutil.Process().memory_info().rss
    with torch.inference_mode(), peak_memory("cpu") as peak:
        start = time.perf_counter()
        model(**inputs)
        seconds = time.perf_counter() - start
    return seconds, max(0, (peak.bytes or before) - before)


def interleaved(fp: nn.Module, variant: nn.Module, inputs: dict, rounds: int) -> dict:
    """Time FP and variant alternately `rounds` times after a warm-up; medians, the median ratio of the pairs, and the peak
    memory of one call of each above the resident set, with dq's reused weight buffers freed first (so
    the transient FP32 weight buffer of the deployed layers is counted)."""
    release_scratch()
    fp_peak, var_peak = timed_step(fp, inputs)[1], timed_step(variant, inputs)[1]
    fp_s, var_s = [], []
    for _ in range(rounds):
        fp_s.append(timed_step(fp, inputs)[0])
        var_s.append(timed_step(variant, inputs)[0])
    # Each pair ran back to back, so its ratio sees one state of a noisy machine; report their median.
    ratio = statistics.median(v / f for v, f in zip(var_s, fp_s))
    return {"fp_s": statistics.median(fp_s), "step_s": statistics.median(var_s), "ratio": ratio, "fp_times_s": fp_s, "times_s": var_s,
            "fp_step_peak_bytes": fp_peak, "step_peak_bytes": var_peak, "scratch_bytes": scratch_bytes()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="One denoiser step on the CPU: FP32 vs deployed dq recipes, interleaved.")
    p.add_argument("model", choices=["sd15", "sdxl", "pixart"])
    p.add_argument("--device", choices=["cpu"], default="cpu")
    p.add_argument("--recipes", default=DEFAULT_RECIPES, help=f"comma-separated bundled recipes (default {DEFAULT_RECIPES})")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="timed FP/variant pairs per recipe (after one warm-up each)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--out", default=None, help="output path without extension (default benchmarks/results/pipeline_cpu_MODEL)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    fp, inputs = build(args.model, args.resolution, args.batch)
    fp_bytes = module_bytes(fp)
    print(f"{args.model}: {fp_bytes / 2**30:.2f} GiB FP32, built in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for recipe in args.recipes.split(","):
        t0 = time.perf_counter()
        variant, layers = deployed_copy(fp, recipe)
        setup = time.perf_counter() - t0
        wb = module_bytes(variant)  # its packed buffers plus the FP tensors it shares with fp
        r = {"recipe": recipe, "layers": layers, "weight_bytes": wb, "fp_weight_bytes": fp_bytes,
             "weight_ratio": wb / fp_bytes, "setup_s": setup}
        r.update(interleaved(fp, variant, inputs, args.rounds))
        results.append(r)
        print(f"{args.model} {recipe}: {r['step_s']:.2f} s/step vs FP32 {r['fp_s']:.2f} s ({r['ratio']:.2f}x), "
              f"weights {r['weight_ratio']:.3f}x, step peak +{r['step_peak_bytes'] / 2**20:.0f} MiB "
              f"(FP +{r['fp_step_peak_bytes'] / 2**20:.0f} MiB)", flush=True)
        del variant
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "date": date.today().isoformat()}
    lines = [f"# dq CPU pipeline benchmark: {args.model} denoiser, {args.resolution}x{args.resolution}, batch {args.batch}, one step",
             "", f"{env['cpu']}, {env['threads']} threads, torch {env['torch']} ({env['cpu_capability']}), {env['date']}; "
             f"FP32 and each variant timed alternately, {args.rounds} pairs after a warm-up; median s/step, and the median "
             "of the pairs' ratios.", "",
             "| recipe | layers | s/step | FP32 s/step | latency x FP32 | weights x FP32 | step peak MiB above resident (FP32) | of which weight buffer MiB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| `{r['recipe']}` | {r['layers']} | {r['step_s']:.2f} | {r['fp_s']:.2f} | {r['ratio']:.2f}x | "
                     f"{r['weight_ratio']:.3f}x | {r['step_peak_bytes'] / 2**20:.0f} ({r['fp_step_peak_bytes'] / 2**20:.0f}) | "
                     f"{r['scratch_bytes'] / 2**20:.0f} |")
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out or Path(__file__).parent / "results" / f"pipeline_cpu_{args.model}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "model": args.model, "resolution": args.resolution,
                                                    "batch": args.batch, "results": results}, indent=1))
    out.with_suffix(".md").write_text(md)
    return 0
