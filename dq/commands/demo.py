"""`dq demo`: the whole loop on the bundled reference model: quantize with the strongest recipes available,
evaluate FP against each (16 prompts x 20 steps by default), print the report table and write the grid."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dq.recipes
from dq.commands.eval import add_scoring_arguments, print_summary, scoring_config
from dq.evaluation import EvalConfig, evaluate

# One demo variant per precision: the first registered recipe of each list wins. Best-quality methods first
# (dynamic per-token INT8 beats static per-tensor at W8A8; SVDQuant's low-rank branch leads at 4 bits).
PREFERENCES = {
    "w8a8": ("w8a8", "w8a8-ptq4dm"),
    "w4a8": ("svdquant-w4a8", "w4a8-tfmq", "w4a8-qdiffusion", "w4a8-timestep", "w4a8"),
    "w4a4": ("svdquant-w4a4", "svdquant-w4a4-gptq", "smoothquant-w4a4", "w4a4"),
}


def demo_variants() -> list[str]:
    """FP plus, per precision (W8A8, W4A8, W4A4), the most accurate recipe registered in this build.

    Example:
        >>> demo_variants()
        ['fp', 'w8a8', 'svdquant-w4a8', 'svdquant-w4a4']
    """
    registered = set(dq.recipes.bundled_recipe_names())  # looked up at call time: tests patch the registry
    chosen = ["fp"]
    for candidates in PREFERENCES.values():
        found = next((name for name in candidates if name in registered), None)
        if found is not None:
            chosen.append(found)
    return chosen


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="ref-sd", help="a reference name, local diffusers directory or hub id (default ref-sd)")
    parser.add_argument("--variants", default=None, help="comma-separated variants (default: fp + the strongest bundled recipe per precision)")
    parser.add_argument("--prompts", default="reference", help="a prompt file or 'reference' (default)")
    parser.add_argument("--n", type=int, default=16, help="number of prompts (default 16)")
    parser.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call (default 8)")
    add_scoring_arguments(parser)
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="the RUN directory (default runs/demo; a re-run resumes)")
    parser.add_argument("--overwrite", action="store_true", help="delete a RUN made with a different configuration and start again")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    variants = args.variants or ",".join(demo_variants())
    print(f"dq demo: {args.model}, variants {variants}; {args.n} prompts x {args.steps} steps -> {args.out}")
    cfg = EvalConfig(
        model=args.model, out=args.out, variants=variants, prompts=args.prompts, n=args.n, seed=args.seed,
        steps=args.steps, batch_size=args.batch_size, scoring=scoring_config(args), overwrite=args.overwrite,
    )
    results = evaluate(cfg)
    print_summary(results, args.out, time.perf_counter() - start)
    return 0
