"""The `dq` command line: a thin shell over the public API. Each subcommand lives in its own module
that exposes `add_arguments(parser)` and `run(args) -> int`; COMMANDS maps names to those modules.

Only the module of the command being run is imported (here, the one place dq imports lazily), so `dq --help`
does not load the evaluation stack or Gradio."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dq.errors import DQError

COMMANDS = {
    "quantize": ("dq.commands.quantize", "calibrate + quantize a pipeline and save it"),
    "recipes": ("dq.commands.recipes", "list the bundled recipes"),
    "eval": ("dq.commands.eval", "generate seeded FP-vs-quantized image pairs and score them (resumable, shardable)"),
    "demo": ("dq.commands.demo", "quantize the reference model with the strongest recipes and print the eval table"),
    "bench": ("dq.commands.bench", "run the kernel or pipeline benchmarks (benchmarks/*.py)"),
    "app": ("dq.commands.app", "start the Gradio side-by-side demo (FP vs quantized) on localhost"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every subcommand; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(prog="dq", description="Quantize diffusers pipelines.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (the first argument that is one), or None."""
    return next((arg for arg in argv if arg in COMMANDS), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_command(argv)).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return importlib.import_module(args._module).run(args) or 0
    except DQError as e:
        print(f"dq: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
