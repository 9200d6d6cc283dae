"""dq.evaluation.variants: the one variant parser of `dq eval --variants`, the app and `dq demo`."""

from __future__ import annotations

import pytest

from dq.errors import DQError
from dq.evaluation.variants import FP, parse_variants, split_variant_list


def test_parse_variants_adds_fp_first_and_rejects_unknown_recipes():
    variants = parse_variants(["w8a8", "w4a16"])
    assert [v.name for v in variants] == [FP, "w8a8", "w4a16"]
    assert variants[0].is_fp and variants[1].recipe == "w8a8" and not variants[1].is_fp
    with pytest.raises(DQError, match="w8a8"):  # the message lists the bundled recipes
        parse_variants(["no-such-recipe"])


def test_cache_options_stay_with_their_variant():
    assert split_variant_list("fp, w8a8+deepcache:interval=5,branch=0,w4a16") == [
        "fp", "w8a8+deepcache:interval=5,branch=0", "w4a16",
    ]
    variant = parse_variants("w8a8+deepcache:interval=4,branch=0")[1]
    assert variant.recipe == "w8a8" and variant.cache.interval == 4 and variant.cache.branch == 0
    assert variant.cache_spec == "deepcache:interval=4,branch=0" and not variant.is_fp
    cached_fp = parse_variants("fp+deepcache")[1]
    assert cached_fp.recipe is None and not cached_fp.is_fp


@pytest.mark.parametrize(("spec", "message"), [
    ("w8a8+no-such-cache", "no-such-cache"),
    ("w8a8,w8a8", "listed twice"),
    (" , ", "empty"),
])
def test_bad_variant_lists_are_refused(spec, message):
    with pytest.raises(DQError, match=message):
        parse_variants(spec)
