"""`dq bench kernels [ARGS]` and `dq bench pipeline MODEL [ARGS]`: run the repository's benchmark scripts
(benchmarks/kernels.py, benchmarks/pipeline.py), which print a table and write JSON + markdown to
benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from dq.errors import DQError

SCRIPTS = {"kernels": "kernels.py", "pipeline": "pipeline.py"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", choices=sorted(SCRIPTS), help="kernels: GEMM kernels vs FP; pipeline: a whole pipeline per recipe")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark script (e.g. MODEL and its flags; see `dq bench TARGET --help`)")


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ directory (next to the dq package in a source checkout)."""
    return Path(__file__).resolve().parents[2] / "benchmarks"


def load_script(target: str):
    """Import benchmarks/<target>.py as a module, or raise a DQError when this is not a source checkout."""
    path = benchmarks_dir() / SCRIPTS[target]
    if not path.is_file():
        raise DQError(
            f"dq bench {target} runs {path}, which is not there: benchmarks ship with the source repository, "
            "not the installed package. Run it from a checkout (pip install -e .)."
        )
    spec = importlib.util.spec_from_file_location(f"dq_bench_{target}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "main", None)):
        raise DQError(f"{path} has no main(argv) function; expected the benchmark's entry point.")
    return module


def run(args: argparse.Namespace) -> int:
    result = load_script(args.target).main(list(args.args))
    return result if isinstance(result, int) else 0
