"""The variant choices the app offers: the FP baseline, bundled recipes, and the registered step caches.

Names are those of ``dq eval --variants`` and are parsed by ``dq.evaluation.variants``.
"""

from __future__ import annotations

from typing import Iterable

from dq.cache import CACHE_METHODS
from dq.evaluation.variants import FP, split_variant_list
from dq.recipes import bundled_recipe_names


def recipe_choices() -> list[str]:
    """The bundled recipe names, as ``dq recipes`` lists them."""
    return bundled_recipe_names()


def cache_choices() -> list[str]:
    """Cache methods registered in dq.cache."""
    return CACHE_METHODS.names()


def compose_variants(recipes: Iterable[str], caches: Iterable[str] = (), extra: str = "") -> list[str]:
    """Variant names for the UI's selections: FP and each recipe, each also with every selected cache.

    Args:
        recipes: Selected recipe names (``fp`` may be included; it is always first).
        caches: Selected cache method names; each is applied to FP and to every selected recipe.
        extra: Comma-separated further variant names typed by the user (``w4a8+deepcache:interval=5,branch=0``).

    Example:
        >>> compose_variants(["w8a8"], ["deepcache"])
        ['fp', 'w8a8', 'fp+deepcache', 'w8a8+deepcache']
    """
    bases = [FP] + [r for r in recipes if r and r != FP]
    names = list(bases) + [f"{base}+{cache}" for cache in caches for base in bases]
    names += split_variant_list(extra)
    return list(dict.fromkeys(names))
