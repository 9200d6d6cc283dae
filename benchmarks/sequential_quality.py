"""Block-sequential calibration vs in-memory dq.quantize, every calibrated recipe, on the reference pipelines.

For each calibrated bundled recipe and each reference pipeline: quantize in memory (calibration seed 0 and
seed 1: the seed-to-seed spread is the run-to-run noise), and block-sequentially from the pipeline directory
(`dq.pipelines.sequential`, seed 0, same calibration settings). Quality against the FP pipeline of the same
run, same prompts and seeds: FID (domain-CLIP features) and PSNR, plus quantization time and peak memory.

    python benchmarks/sequential_quality.py                      # ref-sd and ref-pixart, 32 prompts
    python benchmarks/sequential_quality.py --models ref-pixart --recipes svdquant-w4a4 --prompts 8
    python benchmarks/sequential_quality.py --recipes w4a8-qdiffusion --method-seed 1   # another draw of batch orders
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import dq
from dq import reference
from dq.metrics import peak_memory, to_float
from dq.metrics.perf import cpu_name
from dq.pipelines.sequential import sequential_quantize
from dq.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from calibrators import generate, quality  # noqa: E402  the calibrator benchmark's generation and metrics

RESULTS = Path(__file__).parent / "results"
RECIPES = ["w4a8-timestep", "w8a8-ptq4dm", "w4a8-qdiffusion", "w4a8-tfmq", "smoothquant-w4a4", "svdquant-w4a4",
           "svdquant-w4a8", "svdquant-w4a4-gptq", "svdquant-nvfp4"]


def _recipe(name: str, iters: int | None, act_iters: int | None, method_seed: int | None) -> dq.Recipe:
    recipe = load_recipe(name)
    overrides = {k: v for k, v in (("iters", iters), ("act_iters", act_iters)) if v is not None and k in recipe.options}
    if method_seed is not None:
        overrides["seed"] = method_seed  # refused by methods without random draws (dq.DQError: unknown option)
    return dataclasses.replace(recipe, options={**recipe.options, **overrides})


def _calib(name: str, args, seed: int) -> dq.CalibConfig:
    return dq.CalibConfig(prompts="reference", steps=args.steps, samples=args.calib_samples, seed=seed,
                          batch_size=args.batch, pipeline_kwargs=reference.generation_kwargs(name))


def _measure(quantize, name: str, prompts, args, fp, real, clip) -> dict:
    """Quantize (returns the pipeline), time it and its peak memory, then generate and score."""
    with peak_memory("cpu") as peak:
        start = time.perf_counter()
        pipe = quantize()
        seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, name, prompts, args.steps, args.batch)
    q = quality(images, fp, real, prompts, clip)
    return {"fid_vs_fp": q["fid_vs_fp"], "psnr": q["psnr"], "seconds": seconds, "peak_bytes": peak.bytes}


def run_model(name: str, args, clip, save) -> dict:
    prompts = reference.prompts("heldout", args.prompts)
    real = to_float(reference.real_samples(prompts))
    fp = generate(reference.load(name), name, prompts, args.steps, args.batch)
    result = {"rows": []}
    pipeline_cls = type(reference.load(name))
    for recipe_name in args.recipes:
        recipe = _recipe(recipe_name, args.iters, args.act_iters, args.method_seed)
        row = {"recipe": recipe_name}

        def in_memory(seed: int):
            pipe = reference.load(name)
            dq.quantize(pipe, recipe, calib=_calib(name, args, seed))
            return pipe

        row["memory"] = _measure(lambda: in_memory(0), name, prompts, args, fp, real, clip)
        row["memory_seed1"] = _measure(lambda: in_memory(1), name, prompts, args, fp, real, clip)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "q"

            def block_sequential():
                sequential_quantize(reference.path(name), recipe, out, calib=_calib(name, args, 0))
                return pipeline_cls.from_pretrained(out, dtype=torch.float32)

            try:
                row["sequential"] = _measure(block_sequential, name, prompts, args, fp, real, clip)
            except dq.DQError as e:
                row["sequential"] = {"refused": str(e)}
        result["rows"].append(row)
        save(result)
        seq = row["sequential"]
        print(f"{name} {recipe_name:<20} FIDvsFP mem {row['memory']['fid_vs_fp']:.3f} / seed1 {row['memory_seed1']['fid_vs_fp']:.3f} / "
              f"seq {seq.get('fid_vs_fp', float('nan')):.3f}   PSNR mem {row['memory']['psnr']:.2f} / seed1 "
              f"{row['memory_seed1']['psnr']:.2f} / seq {seq.get('psnr', float('nan')):.2f}", flush=True)
    return result


def _method_seed(settings: dict) -> str:
    seed = settings.get("method_seed")
    return "" if seed is None else f"; recipe seed {seed} (reconstruction's batch orders)"


def markdown(results: dict) -> str:
    s = results["settings"]
    lines = [f"# Block-sequential vs in-memory calibration ({s['machine']}, {s['date']}; {s['prompts']} held-out prompts, "
             f"{s['steps']} steps, {s['calib_samples']} calibration prompts{_method_seed(s)})", "",
             "FID (domain-CLIP features) and PSNR of each quantized pipeline's images against the FP pipeline's, same run. "
             "Noise: in-memory calibration seed 0 vs seed 1. Sequential: `dq.pipelines.sequential` from the pipeline "
             "directory, seed 0. Peak: RSS high-water mark of the quantization step.", ""]
    for name, res in results["models"].items():
        lines += [f"## {name}", "", "| recipe | FID vs FP: in memory | seed 1 | block-sequential | PSNR: in memory | seed 1 | "
                  "block-sequential | time s: in memory / sequential | peak MiB: in memory / sequential |", "|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            m, m1, q = r["memory"], r["memory_seed1"], r["sequential"]
            if "refused" in q:
                seq_fid = seq_psnr = "refused"
                seq_time = seq_peak = "-"
            else:
                seq_fid, seq_psnr, seq_time, seq_peak = f"{q['fid_vs_fp']:.3f}", f"{q['psnr']:.2f}", f"{q['seconds']:.0f}", f"{q['peak_bytes'] / 2**20:.0f}"
            lines.append(f"| {r['recipe']} | {m['fid_vs_fp']:.3f} | {m1['fid_vs_fp']:.3f} | {seq_fid} | {m['psnr']:.2f} | {m1['psnr']:.2f} | "
                         f"{seq_psnr} | {m['seconds']:.0f} / {seq_time} | {m['peak_bytes'] / 2**20:.0f} / {seq_peak} |")
        refused = [r for r in res["rows"] if "refused" in r["sequential"]]
        lines += [""] + [f"{r['recipe']}: {r['sequential']['refused']}" for r in refused] + [""]
    return "\n".join(lines) + "\n"


SAME = ("prompts", "steps", "calib_samples", "iters", "act_iters", "method_seed", "batch")  # settings rows share


def _kept_rows(stem: Path, settings: dict) -> dict[str, list[dict]]:
    """model -> its rows in the results at `stem`, which must have been measured with the same settings."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"--update: no results at {path} to update; run without --update first.")
    old = json.loads(path.read_text())
    differ = [k for k in SAME if old["settings"].get(k) != settings[k]]
    if differ:
        raise SystemExit(f"--update: {path} was measured with other {', '.join(differ)}; rerun every recipe instead.")
    settings["recipes"] = list(dict.fromkeys([*old["settings"]["recipes"], *settings["recipes"]]))
    settings["models"] = list(dict.fromkeys([*old["settings"]["models"], *settings["models"]]))
    return {name: res["rows"] for name, res in old["models"].items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=["ref-sd", "ref-pixart"])
    p.add_argument("--recipes", nargs="*", default=RECIPES)
    p.add_argument("--prompts", type=int, default=32, help="held-out prompts (images) evaluated per row")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--iters", type=int, default=200, help="AdaRound iterations of the reconstruction recipes (both paths)")
    p.add_argument("--act-iters", type=int, default=50, help="LSQ iterations of the reconstruction recipes (both paths)")
    p.add_argument("--method-seed", type=int, default=None,
                   help="the recipe's own seed option (reconstruction's batch orders) in every run; default: the recipe's")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "sequential_quality_cpu"))
    p.add_argument("--update", action="store_true",
                   help="rerun only --recipes and keep the other rows of the results at --out (same settings)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    stem = Path(args.out)
    settings = {**vars(args), "machine": cpu_name(), "date": str(date.today()), "threads": torch.get_num_threads()}
    kept = _kept_rows(stem, settings) if args.update else {}
    clip = reference.domain_clip()
    results = {"settings": settings, "models": {name: {"rows": rows} for name, rows in kept.items()}}

    def save(model_result: dict, name: str) -> None:
        fresh = {r["recipe"]: r for r in model_result["rows"]}
        old = kept.get(name, [])
        rows = [fresh.pop(r["recipe"], r) for r in old] + list(fresh.values())
        results["models"][name] = {**model_result, "rows": rows}
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))

    for name in args.models:
        run_model(name, args, clip, lambda r, n=name: save(r, n))
    print(markdown(results))


if __name__ == "__main__":
    main()
