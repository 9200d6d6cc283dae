"""`dq quantize MODEL --recipe NAME --out DIR`: quantize a pipeline's (or a model's) denoiser and save it.

A local directory is never loaded whole: a data-free recipe is streamed (dq.pipelines.streaming: one layer in
memory at a time), a calibrated one is calibrated block by block (dq.pipelines.sequential: one float block in
memory at a time, resumable). Reference names and hub ids load the pipeline and run dq.quantize.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import dq
from dq import reference
from dq.io import atomic_directory, check_writable
from dq.metrics.perf import peak_memory
from dq.pipelines.calibration import CalibConfig
from dq.pipelines.loading import load_pipeline
from dq.pipelines.sequential import MAX_MEMORY, sequential_quantize
from dq.pipelines.streaming import stream_quantize
from dq.recipes import load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="a local diffusers pipeline or model directory, a hub id, or a dq reference name (ref-sd, ...)")
    parser.add_argument("--recipe", required=True, help="a recipe name (see `dq recipes`) or a recipe .yaml path")
    parser.add_argument("--out", required=True, type=Path, help="output directory (written atomically)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--max-memory", type=parse_bytes, default=MAX_MEMORY, metavar="SIZE",
                        help="block-sequential calibration: calibration activations held in memory per block, "
                             "the rest read from disk (e.g. 4GiB, 512MB; default 4GiB)")
    calib = parser.add_argument_group("calibration (calibrated recipes)")
    calib.add_argument("--calib-prompts", default=None, metavar="SET|FILE",
                       help="prompts: a bundled set ('default', 'reference') or a .txt/.json file (default: reference for a "
                            "reference pipeline, else the bundled default set)")
    calib.add_argument("--calib-samples", type=int, default=None, metavar="N", help="calibration prompts (default 64)")
    calib.add_argument("--calib-steps", type=int, default=None, metavar="N", help="denoising steps of the FP run (default 20)")


def parse_bytes(text: str) -> int:
    """'4GiB', '512MB', '1e9' -> bytes."""
    units = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
    number = text.strip().lower().rstrip("bikmg")
    unit = text.strip().lower()[len(number):]
    try:
        return int(float(number) * units[unit])
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; write e.g. 4GiB, 512MB or a byte count.") from None


def calib_config(args: argparse.Namespace, model: str) -> CalibConfig | None:
    """The CalibConfig the calibration options ask for; None (the recipe's default set) when none is given."""
    given = {k: v for k, v in (("prompts", args.calib_prompts), ("samples", args.calib_samples), ("steps", args.calib_steps)) if v is not None}
    if not given:
        return None
    given.setdefault("prompts", "reference" if reference.name_of_source(model) else "default")
    return CalibConfig(**given)


def run(args: argparse.Namespace) -> int:
    check_writable(args.out, args.overwrite)
    recipe = load_recipe(args.recipe)
    calib = calib_config(args, args.model) if recipe.needs_data else None
    if Path(args.model).expanduser().is_dir():
        if recipe.needs_data:
            print(sequential_quantize(args.model, recipe, args.out, calib=calib, max_memory=args.max_memory, overwrite=args.overwrite))
        else:
            print(stream_quantize(args.model, recipe, args.out, overwrite=args.overwrite))
        print(f"saved to {args.out}")
        return 0
    start = time.perf_counter()
    with peak_memory("cpu") as peak:
        pipe = load_pipeline(args.model)
        loaded = time.perf_counter()
        report = dq.quantize(pipe, recipe, calib=calib)
        quantized = time.perf_counter()
        with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
            pipe.save_pretrained(tmp)
    print(report)
    print(f"  load {loaded - start:.1f} s, quantize {quantized - loaded:.1f} s, save {time.perf_counter() - quantized:.1f} s; "
          f"peak RSS {peak.bytes / 2**20:.0f} MiB")
    print(f"saved to {args.out}")
    return 0
