"""What the app compares: the FP baseline, bundled recipes, and (when dq.cache is present) step caches.

A variant is named as in ``dq eval --variants``: ``fp``, a recipe name or YAML path, optionally followed by
``+<cache method>[:key=value,...]`` (``w4a8+deepcache:interval=5``). Names are parsed and checked before any
model is loaded, so a typo fails in milliseconds with a DQError that lists the valid names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Optional

from dq.errors import DQError
from dq.recipes import bundled_recipe_names, load_recipe

FP = "fp"


@dataclass(frozen=True)
class VariantSpec:
    """One column of the comparison.

    Args:
        name: The label shown in the UI (``"w8a8+deepcache"``).
        recipe: Recipe name or YAML path; None for the FP pipeline as loaded.
        cache: A dq.cache config enabled for the call, or None.
    """

    name: str
    recipe: Optional[str] = None
    cache: Any = None

    @property
    def is_fp(self) -> bool:
        """Whether this is the uncached baseline every other variant is scored against."""
        return self.recipe is None and self.cache is None


def recipe_choices() -> list[str]:
    """The bundled recipe names, as ``dq recipes`` lists them."""
    return bundled_recipe_names()


def cache_choices() -> list[str]:
    """Cache methods registered in dq.cache."""
    from dq.cache import CACHE_METHODS

    return CACHE_METHODS.names()


def compose_variants(recipes: Iterable[str], caches: Iterable[str] = (), extra: str = "") -> list[str]:
    """Variant names for the UI's selections: FP and each recipe, each also with every selected cache.

    Args:
        recipes: Selected recipe names (``fp`` may be included; it is always first).
        caches: Selected cache method names; each is applied to FP and to every selected recipe.
        extra: Comma-separated further variant names typed by the user (``w4a8+deepcache:interval=5``).

    Example:
        >>> compose_variants(["w8a8"], ["deepcache"])
        ['fp', 'w8a8', 'fp+deepcache', 'w8a8+deepcache']
    """
    bases = [FP] + [r for r in recipes if r and r != FP]
    names = list(bases) + [f"{base}+{cache}" for cache in caches for base in bases]
    names += [name.strip() for name in extra.split(",") if name.strip()]
    return list(dict.fromkeys(names))


def parse_variant(name: str) -> VariantSpec:
    """Parse one variant name; an unknown recipe or cache method raises a DQError listing the valid ones.

    Example:
        >>> parse_variant("w8a8+deepcache").recipe
        'w8a8'
    """
    name = name.strip()
    head, plus, _ = name.partition("+")
    if not plus:
        recipe = None if head == FP else head
        cache = None
    else:
        from dq.cache import parse_variant as parse_cache_variant

        recipe, cache = parse_cache_variant(name)
    if recipe is not None:
        load_recipe(recipe)  # raises a DQError naming the bundled recipes
    return VariantSpec(name=name, recipe=recipe, cache=cache)


def parse_variants(names: Iterable[str]) -> list[VariantSpec]:
    """Parse variant names into specs, FP first (added when missing), duplicates dropped.

    Example:
        >>> [v.name for v in parse_variants(["w8a8"])]
        ['fp', 'w8a8']
    """
    specs = [parse_variant(n) for n in dict.fromkeys(n.strip() for n in names if n and n.strip())]
    if not any(s.is_fp for s in specs):
        specs.insert(0, VariantSpec(FP))
    specs.sort(key=lambda s: not s.is_fp)
    return specs
