"""Recipes: dataclasses loaded from YAML (one file per named recipe in this folder)."""

from dq.recipes.recipe import Recipe, bundled_recipe_names, load_recipe

__all__ = ["Recipe", "bundled_recipe_names", "load_recipe"]
