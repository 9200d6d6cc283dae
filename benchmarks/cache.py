"""Cache benchmark: speedup, block evaluations and quality vs the uncached FP pipeline, measured in one run.

For each reference pipeline (ref-sd: DeepCache branch 0; ref-pixart: block caching of all but the first
and last block) and each interval N: denoising wall clock (time inside the denoiser, and whole calls) vs
uncached, fraction of block evaluations, PSNR vs FP images, CLIP score and FID (domain-CLIP features)
vs the FP images. Then the DP schedule vs uniform at equal refresh count (feature error on held-out
prompts, image quality), and quantized + cache, all vs FP:

- naive: the recipe calibrated without the cache, then the uniform cache;
- CacheQuant: DP schedule (quantized model's cost against FP features), the recipe calibrated with that
  cache enabled (cache-aware calibration), then DEC (cached-feature correction, per-channel "affine" as
  the paper or mean "shift", and the consumer layers' quantization correction);
- cache-aware calibration alone: W8A8 with per-step activation scales fitted uncached vs on the cached run.

    python benchmarks/cache.py --models ref-sd,ref-pixart --intervals 2,3,5 --prompts 32 --steps 20
Writes benchmarks/results/cache_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

import dq
from dq import reference
from dq.cache import (
    BlockCacheConfig,
    DeepCacheConfig,
    calibrate_cachequant,
    dp_schedule,
    l1_cost_matrix,
    record_trajectory,
    schedule_error,
    uniform_schedule,
)
from dq.nn.denoiser import find_denoiser
from dq.recipes import load_recipe

RESULTS = Path(__file__).parent / "results"


class DenoiserTimer:
    """Seconds spent inside the denoiser's forward (the denoising cost, without text encoder and VAE)."""

    def __init__(self, denoiser: torch.nn.Module) -> None:
        self.total = 0.0
        self._t0 = 0.0
        self._h = [denoiser.register_forward_pre_hook(self._pre), denoiser.register_forward_hook(self._post)]

    def _pre(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _post(self, *_: Any) -> None:
        self.total += time.perf_counter() - self._t0

    def remove(self) -> None:
        for h in self._h:
            h.remove()


def generate(pipe: Any, name: str, prompts: list[str], steps: int) -> tuple[torch.Tensor, float, float]:
    """Images [n, 3, H, W] in [0, 1], denoiser seconds and call seconds; one seeded call per prompt."""
    timer = DenoiserTimer(find_denoiser(pipe))
    images, t0 = [], time.perf_counter()
    with torch.no_grad():
        for i, prompt in enumerate(prompts):
            out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(i),
                       output_type="pt", **reference.generation_kwargs(name))
            images.append(out.images.float().cpu())
    total = time.perf_counter() - t0
    timer.remove()
    return torch.cat(images), timer.total, total


def calls_for(name: str, prompts: list[str], steps: int, seed0: int) -> list[dict[str, Any]]:
    return [dict(prompt=p, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed0 + i),
                 output_type="latent", **reference.generation_kwargs(name)) for i, p in enumerate(prompts)]


class Quality:
    """PSNR vs FP images, CLIP score and FID on the domain CLIP's image features."""

    def __init__(self, prompts: list[str], fp_images: torch.Tensor) -> None:
        self.model, self.preprocess, tokenizer = reference.domain_clip()
        self.prompts, self.fp = prompts, fp_images
        with torch.no_grad():
            text = self.model.encode_text(tokenizer(prompts))
        self.text = torch.nn.functional.normalize(text.float(), dim=-1)
        self.fp_feats = self._features(fp_images)

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import to_pil_image

        batch = torch.stack([self.preprocess(to_pil_image(im.clamp(0, 1))) for im in images])
        with torch.no_grad():
            return self.model.encode_image(batch).float()

    def __call__(self, images: torch.Tensor) -> dict[str, float]:
        mse = ((images - self.fp) ** 2).flatten(1).mean(1).clamp_min(1e-10)
        feats = self._features(images)
        clip = (torch.nn.functional.normalize(feats, dim=-1) * self.text).sum(-1).mean() * 100
        return {"psnr_vs_fp": float((10 * torch.log10(1 / mse)).mean()), "clip": float(clip),
                "fid_vs_fp": frechet(feats, self.fp_feats)}


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (FID's formula)."""
    import scipy.linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.from_numpy(a).T.cov().numpy(), torch.from_numpy(b).T.cov().numpy()
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * covmean).trace())


def cache_config(name: str, interval: int, **kw: Any):
    return DeepCacheConfig(interval=interval, branch=0, **kw) if name == "ref-sd" else BlockCacheConfig(interval=interval, **kw)


def paired_speedup(fp_pipe, pipe, config, name: str, prompts: list[str], steps: int) -> dict[str, float]:
    """Denoise and call speedup of `pipe` (with cache `config`, or none) over the uncached FP pipeline,
    timed alternately prompt by prompt, so that load changes on a shared machine hit both alike."""
    fp_d = fp_t = d = t = 0.0
    for p in prompts:
        _, a, b = generate(fp_pipe, name, [p], steps)
        fp_d, fp_t = fp_d + a, fp_t + b
        handle = dq.enable_cache(pipe, config) if config is not None else None
        try:
            _, a, b = generate(pipe, name, [p], steps)
        finally:
            if handle is not None:
                dq.disable_cache(pipe)
        d, t = d + a, t + b
    return {"denoise_s": d, "call_s": t, "fp_denoise_s": fp_d, "fp_call_s": fp_t,
            "denoise_speedup": fp_d / d, "call_speedup": fp_t / t}


def run_cached(fp_pipe, pipe, name, config, prompts, steps, quality, timing_prompts) -> dict[str, Any]:
    handle = dq.enable_cache(pipe, config)
    try:
        images, _, _ = generate(pipe, name, prompts, steps)
    finally:
        stats = handle.stats
        dq.disable_cache(pipe)
    kind = "unit" if name == "ref-sd" else "block"
    return {**paired_speedup(fp_pipe, pipe, config, name, prompts[:timing_prompts], steps),
            "block_eval_fraction": stats.evaluation_ratio(kind),
            "refresh_steps": stats.refresh_steps, "cached_steps": stats.cached_steps, **quality(images)}


def bench_model(name: str, intervals: list[int], n_prompts: int, steps: int, recipe: str | None, n_calib: int,
                timing_prompts: int) -> dict[str, Any]:
    pipe = reference.load(name)
    prompts = reference.prompts("heldout", n=n_prompts)
    generate(pipe, name, prompts[:1], 2)  # warm up
    fp_images, fp_denoise, fp_total = generate(pipe, name, prompts, steps)  # quality reference (timing is paired)
    quality = Quality(prompts, fp_images)
    result: dict[str, Any] = {"fp": {"denoise_s": fp_denoise, "call_s": fp_total, **quality(fp_images)}, "cache": {}}
    for n in intervals:
        result["cache"][f"N={n}"] = run_cached(pipe, pipe, name, cache_config(name, n), prompts, steps, quality, timing_prompts)
        print(name, n, result["cache"][f"N={n}"], flush=True)

    # DP vs uniform at equal refresh count: calibrate on train prompts, evaluate on held-out ones.
    n = intervals[len(intervals) // 2]
    calib = calls_for(name, reference.prompts("train", n=n_calib), steps, 1000)
    dq.enable_cache(pipe, cache_config(name, 1))
    train_traj = record_trajectory(pipe, calib)
    held_traj = record_trajectory(pipe, calls_for(name, prompts, steps, 0))
    dq.disable_cache(pipe)
    train_cost = sum(l1_cost_matrix(t) for t in train_traj) / len(train_traj)
    held_cost = sum(l1_cost_matrix(t) for t in held_traj) / len(held_traj)
    dp = dp_schedule(train_cost, n)
    uni = uniform_schedule(steps, n)
    entry = {"interval": n, "dp_steps": list(dp), "uniform_steps": list(uni),
             "heldout_feature_error_dp": schedule_error(held_cost, dp),
             "heldout_feature_error_uniform": schedule_error(held_cost, uni)}
    entry["dp"] = run_cached(pipe, pipe, name, cache_config(name, n, refresh_steps=dp), prompts, steps, quality, timing_prompts)
    entry["uniform"] = result["cache"][f"N={n}"]
    result["dp_vs_uniform"] = entry
    print(name, "dp", entry, flush=True)

    if recipe:
        result["quant_cache"] = bench_quant_cache(pipe, name, recipe, n, prompts, steps, quality, calib, timing_prompts)
    return result


def per_step_recipe(steps: int) -> dq.Recipe:
    """W8A8 with one static min-max activation scale per denoising step (CacheQuant's per-step scales)."""
    base = load_recipe("w4a8-timestep")
    return dataclasses.replace(base, name="w8a8-per-step", weight=dataclasses.replace(base.weight, format="int8"),
                               options={**base.options, "timestep_groups": steps})


def bench_quant_cache(pipe, name, recipe, n, prompts, steps, quality, calib, timing_prompts) -> dict[str, Any]:
    """quantized alone; + naive uniform cache; CacheQuant (DP, cache-aware calibration, DEC affine / shift)."""
    base = "deepcache" if name == "ref-sd" else "block-cache"
    calib_config = dq.CalibConfig(prompts="reference", steps=steps, samples=len(calib), pipeline_kwargs=reference.generation_kwargs(name))
    qpipe = copy.deepcopy(pipe)
    dq.quantize(qpipe, recipe, calib=calib_config)
    q_images, _, _ = generate(qpipe, name, prompts, steps)
    out = {"recipe": recipe, "interval": n,
           "quant_only": {**paired_speedup(pipe, qpipe, None, name, prompts[:timing_prompts], steps), **quality(q_images)}}
    out["naive"] = run_cached(pipe, qpipe, name, cache_config(name, n), prompts, steps, quality, timing_prompts)
    # CacheQuant: the DP schedule from the quantized model's features against the FP ones...
    schedule = calibrate_cachequant(qpipe, calib, interval=n, fp_pipe=pipe, dec=None, base=base)
    out["cachequant_steps"] = list(schedule.refresh_steps)
    # ...the recipe calibrated with that cache on (its activation statistics see the cached steps)...
    aware = copy.deepcopy(pipe)
    dq.enable_cache(aware, schedule)
    dq.quantize(aware, recipe, calib=calib_config)
    dq.disable_cache(aware)
    # ...and DEC fitted on the cache-aware quantized model.
    for fit in ("affine", "shift"):
        config = calibrate_cachequant(aware, calib, interval=n, fp_pipe=pipe, dec=fit, base=base, refresh_steps=schedule.refresh_steps)
        out[f"cachequant-{fit}"] = run_cached(pipe, aware, name, config, prompts, steps, quality, timing_prompts)
    # Cache-aware calibration on its own, with CacheQuant's per-step activation scales: fitted uncached vs on
    # the cached run (same uniform cache at inference).
    per_step = per_step_recipe(steps)
    every_step = dataclasses.replace(calib_config, sampling="all")
    for label, aware_calib in (("per-step naive", False), ("per-step cache-aware", True)):
        p = copy.deepcopy(pipe)
        if aware_calib:
            dq.enable_cache(p, cache_config(name, n))
        dq.quantize(p, per_step, calib=every_step)
        dq.disable_cache(p)
        out[label] = run_cached(pipe, p, name, cache_config(name, n), prompts, steps, quality, timing_prompts)
    print(name, "quant+cache", out, flush=True)
    return out


def markdown(results: dict[str, Any]) -> str:
    lines = ["# Cache benchmark (CPU)", "", f"steps={results['steps']}, prompts={results['prompts']}; speedups vs the "
             f"uncached FP pipeline, timed alternately with it prompt by prompt ({results.get('timing_prompts', '?')} prompts). "
             "FID/CLIP on domain-CLIP features; FID vs FP images.", ""]
    for name, r in results["models"].items():
        lines += [f"## {name}", "", "| variant | denoise speedup | call speedup | block evals | PSNR vs FP | CLIP | FID vs FP |",
                  "|---|---|---|---|---|---|---|",
                  f"| FP | 1.00x | 1.00x | 1.000 | inf | {r['fp']['clip']:.2f} | {r['fp']['fid_vs_fp']:.3f} |"]
        rows = dict(r["cache"])
        if "dp_vs_uniform" in r:
            rows[f"DP N={r['dp_vs_uniform']['interval']}"] = r["dp_vs_uniform"]["dp"]
        for q in ("naive", "cachequant-affine", "cachequant-shift"):
            if q in r.get("quant_cache", {}):
                rows[f"{r['quant_cache']['recipe']} + {q} N={r['quant_cache']['interval']}"] = r["quant_cache"][q]
        for q in ("per-step naive", "per-step cache-aware"):
            if q in r.get("quant_cache", {}):
                rows[f"w8a8 {q} + uniform N={r['quant_cache']['interval']}"] = r["quant_cache"][q]
        for label, c in rows.items():
            lines.append(f"| {label} | {c['denoise_speedup']:.2f}x | {c['call_speedup']:.2f}x | {c['block_eval_fraction']:.3f} "
                         f"| {c['psnr_vs_fp']:.2f} | {c['clip']:.2f} | {c['fid_vs_fp']:.3f} |")
        if "quant_cache" in r:
            q = r["quant_cache"]["quant_only"]
            lines.append(f"| {r['quant_cache']['recipe']} (no cache) | {q['denoise_speedup']:.2f}x | {q['call_speedup']:.2f}x | 1.000 | "
                         f"{q['psnr_vs_fp']:.2f} | {q['clip']:.2f} | {q['fid_vs_fp']:.3f} |")
        if "dp_vs_uniform" in r:
            d = r["dp_vs_uniform"]
            lines += ["", f"DP vs uniform (N={d['interval']}, {len(d['dp_steps'])} refreshes): held-out feature error "
                      f"DP {d['heldout_feature_error_dp']:.4g} vs uniform {d['heldout_feature_error_uniform']:.4g}; "
                      f"DP steps {d['dp_steps']}"]
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ref-sd,ref-pixart", help="comma-separated reference pipelines")
    parser.add_argument("--intervals", default="2,3,5", help="cache intervals N")
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts per variant")
    parser.add_argument("--timing-prompts", type=int, default=8, help="prompts timed FP / variant alternately")
    parser.add_argument("--calib-prompts", type=int, default=8, help="train prompts for the DP schedule, DEC and the recipe")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--recipe", default="w8a8-ptq4dm", help="recipe for quant+cache, static activations so that "
                        "calibration matters ('' to skip)")
    parser.add_argument("--out", default=str(RESULTS / "cache_cpu"), help="output path without extension")
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {"steps": args.steps, "prompts": args.prompts, "timing_prompts": args.timing_prompts, "torch_threads": torch.get_num_threads(), "models": {}}
    for name in args.models.split(","):
        results["models"][name] = bench_model(name, [int(n) for n in args.intervals.split(",")], args.prompts,
                                              args.steps, args.recipe or None, args.calib_prompts, args.timing_prompts)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out + ".json").write_text(json.dumps(results, indent=2))
        Path(args.out + ".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
