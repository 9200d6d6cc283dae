"""`dq app` (and `python app.py`): the Gradio side-by-side demo of FP and quantized pipelines on localhost."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

import torch

from dq import CalibConfig
from dq.app import AppConfig, build_demo, launch
from dq.errors import DQError

DTYPES = ("auto", "float32", "float16", "bfloat16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model shown at start (default: the first reference pipeline)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: $GRADIO_SERVER_PORT or 7860)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto", help="load dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=20, help="default denoising steps (default 20)")
    parser.add_argument("--recipes", default="w8a8,w4a8,svdquant-w4a4", help="recipes ticked at start, comma-separated")
    parser.add_argument("--max-models", type=int, default=1, help="models kept loaded with their variants (default 1)")
    parser.add_argument("--calib-prompts", default=None, help="calibration prompts: a file, 'reference' or 'default' (default: each recipe's bundled set)")
    parser.add_argument("--calib-samples", type=int, default=None, help="calibration prompts run (default: the CalibConfig default)")
    parser.add_argument("--calib-steps", type=int, default=None, help="steps of the calibration runs (default: the CalibConfig default)")
    parser.add_argument("--lpips-weights", default=None, help="local torchvision AlexNet weights for LPIPS (default: the torch hub cache)")
    parser.add_argument("--no-warmup", action="store_true", help="time the first call of a new pipeline without a warm-up call")


def _calib(args: argparse.Namespace) -> Optional[CalibConfig]:
    """A CalibConfig when any --calib-* flag is given, else None (each recipe's default set)."""
    if args.calib_prompts is None and args.calib_samples is None and args.calib_steps is None:
        return None
    fields = {"prompts": args.calib_prompts, "samples": args.calib_samples, "steps": args.calib_steps}
    return CalibConfig(**{k: v for k, v in fields.items() if v is not None})


def config_from_args(args: argparse.Namespace) -> AppConfig:
    """The AppConfig the flags describe."""
    return AppConfig(
        model=args.model, device=args.device, dtype=None if args.dtype == "auto" else getattr(torch, args.dtype),
        steps=args.steps, calib=_calib(args), max_models=args.max_models, lpips_weights=args.lpips_weights,
        warmup=not args.no_warmup, recipes=tuple(r.strip() for r in args.recipes.split(",") if r.strip()),
    )


def run(args: argparse.Namespace) -> int:
    demo = build_demo(config_from_args(args))
    launch(demo, server_name=args.host, server_port=args.port)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``python app.py``: the same flags as ``dq app``."""
    parser = argparse.ArgumentParser(prog="app.py", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except DQError as error:
        print(f"app.py: error: {error}", file=sys.stderr)
        return 2
