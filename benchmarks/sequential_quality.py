"""Block-sequential calibration vs in-memory dq.quantize, every calibrated recipe, on the reference pipelines.

For each calibrated bundled recipe and each reference pipeline, `--draws` independent draws of both paths:
draw d calibrates with calibration seed d and, for methods with random draws (reconstruction's batch orders),
recipe seed d, once in memory (`dq.quantize`) and once block-sequentially from the pipeline directory
(`dq.pipelines.sequential`), same settings. Quality against the FP pipeline of the same run, same prompts and
seeds: FID (domain-CLIP features) and PSNR, plus quantization time and peak memory. The run-to-run noise is
the draw-to-draw spread: the block-sequential mean is within noise when it differs from the in-memory mean
by at most two standard errors of the difference (Welch, sample variances of the draws).

    python benchmarks/sequential_quality.py                      # ref-sd and ref-pixart, 32 prompts, 3 draws
    python benchmarks/sequential_quality.py --models ref-pixart --recipes svdquant-w4a4 --prompts 8 --draws 2
    python benchmarks/sequential_quality.py --models ref-pixart --recipes w4a8-tfmq --update   # add or rerun rows
    python benchmarks/sequential_quality.py --resume             # an interrupted run continues at its first missing draw
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

import dq
from dq import reference
from dq.calib import METHODS
from dq.metrics import peak_memory, to_float
from dq.metrics.perf import cpu_name
from dq.nn.denoiser import find_denoiser
from dq.pipelines.sequential import sequential_quantize
from dq.recipes import load_recipe

sys.path.insert(0, str(Path(__file__).parent))
from calibrators import generate, quality  # noqa: E402  the calibrator benchmark's generation and metrics

RESULTS = Path(__file__).parent / "results"
RECIPES = ["w4a8-timestep", "w8a8-ptq4dm", "w4a8-qdiffusion", "w4a8-tfmq", "smoothquant-w4a4", "svdquant-w4a4",
           "svdquant-w4a8", "svdquant-w4a4-gptq", "svdquant-nvfp4"]
HIGHER_IS_BETTER = {"fid_vs_fp": False, "psnr": True}


def _recipe(name: str, iters: int | None, act_iters: int | None) -> dq.Recipe:
    recipe = load_recipe(name)
    overrides = {k: v for k, v in (("iters", iters), ("act_iters", act_iters)) if v is not None and k in recipe.options}
    return dataclasses.replace(recipe, options={**recipe.options, **overrides})


def _drawn(recipe: dq.Recipe, draw: int) -> dq.Recipe:
    """`recipe` with its method's own seed set to `draw`, where the method has one."""
    if "seed" not in {f.name for f in dataclasses.fields(METHODS.get(recipe.method))}:
        return recipe
    return dataclasses.replace(recipe, options={**recipe.options, "seed": draw})


def _calib(name: str, args, seed: int) -> dq.CalibConfig:
    return dq.CalibConfig(prompts="reference", steps=args.steps, samples=args.calib_samples, seed=seed,
                          batch_size=args.batch, pipeline_kwargs=reference.generation_kwargs(name))


def tensors_digest(pipe) -> str:
    """SHA-256 of the quantized denoiser's state dict (names, dtypes, shapes, bytes): equal digests, equal models."""
    digest = hashlib.sha256()
    for name, t in sorted(find_denoiser(pipe).state_dict().items()):
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        digest.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _measure(quantize, name: str, prompts, args, fp, real, clip) -> dict:
    """Quantize (returns the pipeline), time it and its peak memory, then generate and score."""
    with peak_memory("cpu") as peak:
        start = time.perf_counter()
        pipe = quantize()
        seconds = time.perf_counter() - start
    pipe.set_progress_bar_config(disable=True)
    images = generate(pipe, name, prompts, args.steps, args.batch)
    q = quality(images, fp, real, prompts, clip)
    return {"fid_vs_fp": q["fid_vs_fp"], "psnr": q["psnr"], "seconds": seconds, "peak_bytes": peak.bytes, "digest": tensors_digest(pipe),
            "date": str(date.today()), "machine": cpu_name()}


def run_model(name: str, args, clip, save, measured: list[dict]) -> None:
    """Measure every recipe's draws on `name`, saving after each; `measured`: rows whose draws are kept (--resume)."""
    prompts = reference.prompts("heldout", args.prompts)
    real = to_float(reference.real_samples(prompts))
    fp = generate(reference.load(name), name, prompts, args.steps, args.batch)
    pipeline_cls = type(reference.load(name))
    for recipe_name in args.recipes:
        base = _recipe(recipe_name, args.iters, args.act_iters)
        row = next((r for r in measured if r["recipe"] == recipe_name), {"recipe": recipe_name, "memory": [], "sequential": []})
        for draw in range(args.draws):
            recipe, calib = _drawn(base, draw), _calib(name, args, draw)

            def in_memory():
                pipe = reference.load(name)
                dq.quantize(pipe, recipe, calib=calib)
                return pipe

            if len(row["memory"]) == draw:
                row["memory"].append(_measure(in_memory, name, prompts, args, fp, real, clip))
                save(row)
            if len(row["sequential"]) == draw and "refused" not in row:
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "q"

                    def block_sequential():
                        sequential_quantize(reference.path(name), recipe, out, calib=calib)
                        return pipeline_cls.from_pretrained(out, dtype=torch.float32)

                    try:
                        row["sequential"].append(_measure(block_sequential, name, prompts, args, fp, real, clip))
                    except dq.DQError as e:
                        row["refused"] = str(e)
                save(row)
            m, q = row["memory"][draw], row["sequential"][draw] if len(row["sequential"]) > draw else {}
            print(f"{name} {recipe_name:<20} draw {draw}  FIDvsFP mem {m['fid_vs_fp']:.3f} / seq {q.get('fid_vs_fp', float('nan')):.3f}"
                  f"   PSNR mem {m['psnr']:.2f} / seq {q.get('psnr', float('nan')):.2f}", flush=True)


def compare(memory: list[float], sequential: list[float], higher_is_better: bool) -> dict:
    """Difference of the block-sequential mean from the in-memory mean, its noise bound (2 standard errors, Welch)
    and the verdict: "within" noise, or "better" / "worse" beyond it."""
    delta = statistics.fmean(sequential) - statistics.fmean(memory)
    if min(len(memory), len(sequential)) < 2:
        return {"delta": delta, "bound": None, "verdict": "one draw"}
    bound = 2 * (statistics.variance(memory) / len(memory) + statistics.variance(sequential) / len(sequential)) ** 0.5
    if abs(delta) <= bound:
        verdict = "within"
    else:
        verdict = "better" if (delta > 0) == higher_is_better else "worse"
    return {"delta": delta, "bound": bound, "verdict": verdict}


def _spread(values: list[float], digits: int) -> str:
    mean = f"{statistics.fmean(values):.{digits}f}"
    return mean if len(values) < 2 else f"{mean} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def _compared(row: dict, metric: str, digits: int) -> list[str]:
    memory = [m[metric] for m in row["memory"]]
    if not row["sequential"]:
        return [_spread(memory, digits), "refused" if "refused" in row else "-", "-"]
    sequential = [q[metric] for q in row["sequential"]]
    c = compare(memory, sequential, HIGHER_IS_BETTER[metric])
    noise = "" if c["bound"] is None else f" ± {c['bound']:.{digits}f}"
    return [_spread(memory, digits), _spread(sequential, digits), f"{c['delta']:+.{digits}f}{noise}: {c['verdict']}"]


def _identical(row: dict) -> str:
    """In how many draws both paths gave the same quantized tensors (digests), of the draws that recorded one."""
    pairs = [(m.get("digest"), q.get("digest")) for m, q in zip(row["memory"], row["sequential"])]
    pairs = [(a, b) for a, b in pairs if a and b]
    return f"{sum(a == b for a, b in pairs)}/{len(pairs)}" if pairs else "-"


def _cost(row: dict, key: str, scale: float) -> str:
    """Mean of `key` over the draws, in memory / block-sequential."""
    return " / ".join(f"{statistics.fmean(r[key] for r in row[path]) / scale:.0f}" if row[path] else "-" for path in ("memory", "sequential"))


def _draws(results: dict):
    """Every measured draw of every row, both paths."""
    return (m for res in results["models"].values() for r in res["rows"] for path in ("memory", "sequential") for m in r[path])


def _when(row: dict) -> str:
    """The days, and machines, a row's draws were measured on."""
    return ", ".join(sorted({f"{m['date']} on {m['machine']}" for path in ("memory", "sequential") for m in row[path]}))


def markdown(results: dict) -> str:
    s = results["settings"]
    days = sorted({m["date"] for m in _draws(results)})
    period = f"{days[0]} to {days[-1]}" if len(days) > 1 else (days[0] if days else s["date"])
    machines = " and ".join(sorted({m["machine"] for m in _draws(results)})) or s["machine"]
    lines = [f"# Block-sequential vs in-memory calibration ({machines}, {period}; {s['prompts']} held-out prompts, "
             f"{s['steps']} steps, {s['calib_samples']} calibration prompts, {s['draws']} draws)", "",
             "FID (domain-CLIP features) and PSNR of each quantized pipeline's images against the FP pipeline's, same run. "
             "Draw d: calibration seed d and, for methods with random draws, recipe seed d, on both paths. Cells: mean over "
             "the draws (min-max). Δ: block-sequential mean minus in-memory mean ± two standard errors of that difference "
             "(the run-to-run noise); 'within' when |Δ| is inside it. Sequential: `dq.pipelines.sequential` from the "
             "pipeline directory. Same tensors: draws in which both paths' quantized denoisers have bitwise equal state dicts "
             "(SHA-256; '-' for rows measured before it was recorded). Time and peak (RSS high-water mark) of the "
             "quantization step, mean over the draws.", ""]
    for name, res in results["models"].items():
        lines += [f"## {name}", "", "| recipe | FID vs FP: in memory | block-sequential | Δ | PSNR: in memory | block-sequential | Δ | "
                  "same tensors | time s: in memory / sequential | peak MiB: in memory / sequential |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in res["rows"]:
            cells = [r["recipe"], *_compared(r, "fid_vs_fp", 3), *_compared(r, "psnr", 2), _identical(r), _cost(r, "seconds", 1), _cost(r, "peak_bytes", 2**20)]
            lines.append("| " + " | ".join(cells) + " |")
        by_day: dict[str, list[str]] = {}
        for r in res["rows"]:
            by_day.setdefault(_when(r), []).append(r["recipe"])
        lines += ["", "Measured " + "; ".join(f"{day}: {', '.join(names)}" for day, names in by_day.items()) + "."]
        lines += [""] + [f"{r['recipe']}: {r['refused']}" for r in res["rows"] if "refused" in r] + [""]
    return "\n".join(lines) + "\n"


SAME = ("prompts", "steps", "calib_samples", "iters", "act_iters", "draws", "batch")  # settings rows share


def _kept_rows(stem: Path, settings: dict) -> dict[str, list[dict]]:
    """model -> its rows in the results at `stem`, which must have been measured with the same settings."""
    path = stem.with_suffix(".json")
    if not path.is_file():
        raise SystemExit(f"--update, --resume: no results at {path}; run without them first.")
    old = json.loads(path.read_text())
    differ = [k for k in SAME if old["settings"].get(k) != settings[k]]
    if differ:
        raise SystemExit(f"--update, --resume: {path} was measured with other {', '.join(differ)}; rerun every recipe instead.")
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
    p.add_argument("--draws", type=int, default=3, help="independent draws of each path (calibration and recipe seed 0..N-1)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default=str(RESULTS / "sequential_quality_cpu"))
    p.add_argument("--update", action="store_true",
                   help="rerun only --recipes and keep the other rows of the results at --out (same settings)")
    p.add_argument("--resume", action="store_true",
                   help="continue the results at --out (same settings): keep every measured draw, measure the missing ones")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    stem = Path(args.out)
    settings = {**vars(args), "machine": cpu_name(), "date": str(date.today()), "threads": torch.get_num_threads()}
    kept = _kept_rows(stem, settings) if args.update or args.resume else {}
    clip = reference.domain_clip()
    results = {"settings": settings, "models": {name: {"rows": rows} for name, rows in kept.items()}}

    def save(name: str, row: dict) -> None:
        """Put `row` in place of the row of the same recipe (or last), and write the results."""
        rows = results["models"].setdefault(name, {"rows": []})["rows"]
        same = [i for i, r in enumerate(rows) if r["recipe"] == row["recipe"]]
        if same:
            rows[same[0]] = row
        else:
            rows.append(row)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        stem.with_suffix(".md").write_text(markdown(results))

    for name in args.models:
        run_model(name, args, clip, lambda row, n=name: save(n, row), kept.get(name, []) if args.resume else [])
    print(markdown(results))


if __name__ == "__main__":
    main()
