"""`dq quantize MODEL --recipe NAME --out DIR`: quantize a pipeline's denoiser and save the pipeline."""

from __future__ import annotations

import argparse
from pathlib import Path

import dq
from dq.io import atomic_directory, check_writable
from dq.pipelines.loading import load_pipeline
from dq.recipes import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local diffusers pipeline directory, a hub id, or a dq reference name (ref-sd, ...)")
    parser.add_argument("--recipe", required=True, help="a recipe name (see `dq recipes`) or a recipe .yaml path")
    parser.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, args.overwrite)
    recipe = load_recipe(args.recipe)
    pipe = load_pipeline(args.model)
    report = dq.quantize(pipe, recipe)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        pipe.save_pretrained(tmp)
    print(report)
    print(f"saved to {args.out}")
    return 0
