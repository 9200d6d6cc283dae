"""`dq recipes`: list the bundled recipes with a one-line description each."""

from __future__ import annotations

import argparse

from dq.recipes import bundled_recipe_names, load_recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose-source", action="store_true", help="also print each recipe's source")


def run(args: argparse.Namespace) -> int:
    names = bundled_recipe_names()
    width = max(map(len, names))
    for name in names:
        recipe = load_recipe(name)
        print(f"{name:<{width}}  {recipe.description}")
        if args.verbose_source and recipe.source:
            print(f"{'':<{width}}  source: {recipe.source}")
    return 0
