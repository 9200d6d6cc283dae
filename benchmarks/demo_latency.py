"""The `dq demo` latency column, measured interleaved: FP and each demo variant on ref-sd, call after call.

`dq demo` times each variant on its own, so on a shared machine its latency column moves between runs. Here
every round calls the FP pipeline and then each quantized one on the same 8 held-out prompts (20 steps, the
demo's batch), so a busy moment slows all of them alike; the ratio is the median over rounds of variant / FP
time. Writes benchmarks/results/demo_latency_cpu.{md,json}.

    python benchmarks/demo_latency.py [--rounds 5] [--variants w8a8,svdquant-w4a8,svdquant-w4a4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dq  # noqa: E402
import dq.reference as reference  # noqa: E402
from dq.commands.demo import demo_variants  # noqa: E402
from dq.metrics.perf import cpu_name  # noqa: E402


def timed_call(pipe, prompts: list[str], steps: int, kwargs: dict) -> float:
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    pipe(prompts, generator=generator, num_inference_steps=steps, output_type="np", **kwargs)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="dq demo's latency ratios, FP and variants interleaved.")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8, help="prompts per call (the demo's batch size)")
    p.add_argument("--variants", default=None, help="comma-separated recipes (default: the demo's)")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "demo_latency_cpu"))
    args = p.parse_args(argv)
    recipes = args.variants.split(",") if args.variants else [v for v in demo_variants() if v != "fp"]
    kwargs = reference.generation_kwargs("ref-sd")
    prompts = reference.prompts("heldout", args.batch)
    pipes = {"fp": reference.load("ref-sd")}
    for recipe in recipes:
        pipes[recipe] = reference.load("ref-sd")
        dq.quantize(pipes[recipe], recipe)
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    seconds: dict[str, list[float]] = {name: [] for name in pipes}
    with torch.inference_mode():
        for pipe in pipes.values():
            timed_call(pipe, prompts, args.steps, kwargs)  # warm-up: buffers, the C kernels' build
        for _ in range(args.rounds):
            for name, pipe in pipes.items():
                seconds[name].append(timed_call(pipe, prompts, args.steps, kwargs))
    ratios = {name: statistics.median(t / f for t, f in zip(seconds[name], seconds["fp"])) for name in recipes}
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__, "date": date.today().isoformat()}
    lines = [f"# dq demo latency, interleaved ({env['cpu']}, {env['threads']} threads, torch {env['torch']}, {env['date']})", "",
             f"ref-sd, {args.batch} prompts x {args.steps} steps per call, {args.rounds} rounds of FP then each variant; "
             "ratio: median over rounds of variant time / FP time in the same round.", "",
             "| variant | s per call (median) | latency x FP |", "|---|---|---|",
             f"| `fp` | {statistics.median(seconds['fp']):.2f} | 1.00x |"]
    lines += [f"| `{name}` | {statistics.median(seconds[name]):.2f} | {ratios[name]:.2f}x |" for name in recipes]
    md = "\n".join(lines) + "\n"
    print(md)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "seconds": seconds, "ratios": ratios}, indent=1))
    out.with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
