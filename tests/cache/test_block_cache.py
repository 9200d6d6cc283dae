import pytest
import torch

import dq
from dq.cache import BlockCacheConfig, FirstBlockCacheConfig, cache_stats
from dq.errors import DQError
from tiny_pipelines import build, run


def test_block_cache_pixart(pixart):
    pipe, kw = pixart
    ref = run(pipe, kw)
    dq.enable_cache(pipe, "block-cache", interval=1, blocks=(1, 2))
    assert torch.equal(run(pipe, kw), ref)
    dq.disable_cache(pipe)
    dq.enable_cache(pipe, BlockCacheConfig(interval=2, blocks=(1, 2)))
    out = run(pipe, kw)
    stats = cache_stats(pipe)
    assert stats.evaluated["block"] == 6 and stats.skipped["block"] == 2
    assert not torch.equal(out, ref) and (out - ref).abs().max() < 1.0
    assert torch.equal(run(pipe, kw), out)  # no state between calls
    dq.disable_cache(pipe)
    assert torch.equal(run(pipe, kw), ref)


def test_first_block_cache_pixart(pixart):
    pipe, kw = pixart
    ref = run(pipe, kw)
    dq.enable_cache(pipe, FirstBlockCacheConfig(threshold=0.0))
    assert torch.equal(run(pipe, kw), ref)
    dq.disable_cache(pipe)
    dq.enable_cache(pipe, "first-block-cache", threshold=10.0)
    out = run(pipe, kw)
    assert cache_stats(pipe).skipped["block"] == 3  # steps 1..3 reuse the tail
    assert torch.equal(run(pipe, kw), out)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_block_lists_of_flux_and_wan(family):
    pipe, kw = build(family)
    pipe.set_progress_bar_config(disable=True)
    kw["num_inference_steps"] = 3
    ref = run(pipe, kw)
    dq.enable_cache(pipe, "block-cache", interval=1, blocks=(0, 2))
    assert torch.equal(run(pipe, kw), ref)
    dq.disable_cache(pipe)
    handle = dq.enable_cache(pipe, "block-cache", interval=3, blocks=(0, 2))
    out = run(pipe, kw)
    assert handle.stats.skipped["block"] > 0 and torch.isfinite(out).all()


def test_bad_block_range(pixart):
    pipe, _ = pixart
    with pytest.raises(DQError, match=r"block range \(1, 5\) does not fit PixArtTransformer2DModel, which has 2"):
        dq.enable_cache(pipe, "block-cache", blocks=(1, 5))
    with pytest.raises(DQError, match="needs a DiT"):
        dq.enable_cache(build("sd")[0], "block-cache")
