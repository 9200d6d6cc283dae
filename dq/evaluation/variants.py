"""What is compared: the FP pipeline, a recipe applied to a fresh copy, and either with a step cache.

A variant is named ``fp`` or a recipe (name or YAML path), optionally followed by ``+CACHE[:key=value,...]``
(``w4a8+deepcache:interval=5,branch=0``); ``dq eval --variants``, the app and ``dq demo`` all parse names here.
Names are checked before any model is loaded, so a typo fails in milliseconds with a DQError listing the
valid names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

from dq.cache import CacheConfig, parse_variant as parse_cache_variant
from dq.errors import DQError
from dq.recipes import load_recipe

FP = "fp"


@dataclass(frozen=True)
class Variant:
    """One column of the comparison.

    Args:
        name: The label used in file names, the report and the UI (e.g. ``"svdquant-w4a4+deepcache"``).
        recipe: A recipe name or YAML path; None for the FP pipeline.
        cache: The step cache enabled for its calls (from the text after ``+``); None for no caching.
    """

    name: str
    recipe: Optional[str] = None
    cache: Optional[CacheConfig] = None

    @property
    def is_fp(self) -> bool:
        """Whether this is the unquantized, uncached baseline every other variant is scored against."""
        return self.recipe is None and self.cache is None

    @property
    def cache_spec(self) -> Optional[str]:
        """The cache part of the name as typed (``"deepcache:interval=5"``), or None."""
        _, plus, tail = self.name.partition("+")
        return tail if plus else None


def split_variant_list(spec: str) -> list[str]:
    """Split a comma-separated list, keeping cache options together (``"fp,w8a8+deepcache:interval=5,branch=0"``)."""
    names: list[str] = []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if names and "=" in token and "+" not in token and "+" in names[-1]:
            names[-1] += "," + token  # another key=value of the previous variant's cache options
        else:
            names.append(token)
    return names


def parse_variant(name: str) -> Variant:
    """Parse one variant name; an unknown recipe, cache method or cache option raises a DQError naming the valid ones.

    Example:
        >>> parse_variant("w8a8+deepcache:interval=3").recipe
        'w8a8'
    """
    name = name.strip()
    recipe, cache = parse_cache_variant(name)  # dq.cache's rule: "fp" (or fp16/bf16/fp32) means no recipe
    if recipe is not None:
        load_recipe(recipe)  # raises a DQError listing the bundled recipes
    return Variant(name=name, recipe=recipe, cache=cache)


def parse_variants(spec: str | Iterable[str]) -> list[Variant]:
    """Parse ``"fp,w8a8,svdquant-w4a4+deepcache"`` (or a list of names) into variants, FP first (added when missing).

    Args:
        spec: Comma-separated variant names, or an iterable of them. A name listed twice is an error.

    Example:
        >>> [v.name for v in parse_variants("w8a8,w8a8+deepcache:interval=3")]
        ['fp', 'w8a8', 'w8a8+deepcache:interval=3']
    """
    names = split_variant_list(spec) if isinstance(spec, str) else [s.strip() for s in spec if s and s.strip()]
    if not names:
        raise DQError("the variant list is empty; expected e.g. 'fp,w8a8,svdquant-w4a4'.")
    variants: list[Variant] = []
    for name in names:
        if any(v.name == name for v in variants):
            raise DQError(f"variant {name!r} is listed twice.")
        variants.append(parse_variant(name))
    if not any(v.is_fp for v in variants):
        variants.insert(0, Variant(FP))
    variants.sort(key=lambda v: not v.is_fp)  # FP first: every other variant is scored against it
    return variants
