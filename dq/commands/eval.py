"""`dq eval --model MODEL --variants fp,w8a8,... --prompts FILE|reference --n N --out RUN`: paired FP-vs-quantized
evaluation (resumable; shard it with `accelerate launch -m dq eval ...`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dq.evaluation import EvalConfig, ScoringConfig, evaluate, results_table
from dq.evaluation.runner import process_state


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to generate (fixed for the life of a RUN directory)")
    g.add_argument("--model", required=True, help="a dq reference name (ref-sd, ref-pixart, ref-video), a local diffusers directory, or a hub id")
    g.add_argument("--variants", default="fp,w8a8", help="comma-separated: fp, recipe names (see `dq recipes`), each optionally +CACHE (default: fp,w8a8)")
    g.add_argument("--prompts", default="reference", help="a text file (one prompt per line) or .json list, or 'reference' for the reference domain's held-out prompts")
    g.add_argument("--n", type=int, default=None, help="number of prompts (default: the whole file; 16 for 'reference')")
    g.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i (default 0)")
    g.add_argument("--steps", type=int, default=20, help="denoising steps (default 20)")
    g.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the pipeline's)")
    g.add_argument("--height", type=int, default=None, help="image height (default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="image width (default: the pipeline's)")
    g.add_argument("--num-frames", type=int, default=None, help="frames per clip for video pipelines (default: the pipeline's)")
    g.add_argument("--batch-size", type=int, default=4, help="prompts per pipeline call (default 4)")
    g.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None, help="default: float16 on CUDA, float32 on CPU")
    add_scoring_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="the RUN directory (re-running with the same arguments resumes)")
    parser.add_argument("--overwrite", action="store_true", help="delete a RUN made with a different configuration and start again")


def add_scoring_arguments(parser: argparse.ArgumentParser) -> None:
    """Metric flags, shared with `dq demo` (changing them re-scores a run without regenerating)."""
    g = parser.add_argument_group("how images are scored (may change between runs of one RUN)")
    g.add_argument("--metrics", default=None, help="comma-separated from fid,clip,psnr,ssim,lpips (default: all whose weights are available)")
    g.add_argument("--fid-backbone", default=None, help="inception, clip (the --clip-model), or an open_clip model name (default: domain CLIP for reference pipelines, inception otherwise)")
    g.add_argument("--fid-weights", default=None, help="local weights of the FID backbone (e.g. weights-inception-2015-12-05-6726825d.pth)")
    g.add_argument("--clip-model", default=None, help="'domain' (reference CLIP), an open_clip name, local-dir:PATH, or a local transformers CLIP directory")
    g.add_argument("--clip-weights", default=None, help="local checkpoint for an open_clip --clip-model name")
    g.add_argument("--lpips-weights", default=None, help="local torchvision backbone weights for LPIPS (e.g. alexnet-owt-7be5be79.pth)")
    g.add_argument("--lpips-net", choices=["alex", "vgg"], default="alex", help="LPIPS backbone (default alex)")
    g.add_argument("--no-antialias", dest="antialias", action="store_false", help="resize without antialiasing for FID/CLIP (legacy-FID compatible)")


def scoring_config(args: argparse.Namespace) -> ScoringConfig:
    """ScoringConfig from parsed flags."""
    metrics = None if args.metrics is None else [m.strip() for m in args.metrics.split(",") if m.strip()]
    return ScoringConfig(
        metrics=metrics, fid_backbone=args.fid_backbone, fid_weights=args.fid_weights, clip_model=args.clip_model,
        clip_weights=args.clip_weights, lpips_weights=args.lpips_weights, lpips_net=args.lpips_net, antialias=args.antialias,
    )


def print_summary(results: dict[str, Any], out: Path, seconds: float) -> None:
    """Print the report table and where the artifacts are (main process only)."""
    if not process_state().is_main_process:
        return
    print(results_table(results))
    for name, reason in results["skipped_metrics"].items():
        print(f"skipped {name}: {reason}")
    print(f"\nwrote {out / 'results.json'}, {out / 'report.md'}, {out / 'grid.png'}, {out / 'quality_vs_speed.png'} ({seconds:.1f} s)")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = EvalConfig(
        model=args.model, out=args.out, variants=args.variants, prompts=args.prompts, n=args.n, seed=args.seed,
        steps=args.steps, guidance=args.guidance, height=args.height, width=args.width, num_frames=args.num_frames,
        batch_size=args.batch_size, dtype=args.dtype, scoring=scoring_config(args), overwrite=args.overwrite,
    )
    results = evaluate(cfg)
    print_summary(results, args.out, time.perf_counter() - start)
    return 0
