import pytest
import torch

import dq
from dq.cache import DeepCacheConfig, cache_stats, parse_variant, plan_deepcache
from dq.errors import DQError
from tiny_pipelines import run


def test_interval_one_equals_uncached(sd):
    pipe, kw = sd
    ref = run(pipe, kw)
    dq.enable_cache(pipe, "deepcache", interval=1)
    assert torch.equal(run(pipe, kw), ref)


def test_disable_restores_bit_identical_output(sd):
    pipe, kw = sd
    ref = run(pipe, kw)
    dq.enable_cache(pipe, DeepCacheConfig(interval=2, branch=0))
    cached = run(pipe, kw)
    assert not torch.equal(cached, ref)
    dq.disable_cache(pipe)
    assert torch.equal(run(pipe, kw), ref)
    dq.disable_cache(pipe)  # idempotent


def test_skips_most_units_and_counts(sd):
    pipe, kw = sd
    handle = dq.enable_cache(pipe, "deepcache", interval=2, branch=0)
    run(pipe, kw)
    stats = cache_stats(pipe)
    assert (stats.refresh_steps, stats.cached_steps) == (2, 2)
    # branch 0 runs only the last up resnet + attention on cached steps: 2 of 32 units.
    per_step = stats.evaluated["unit"] + stats.skipped["unit"]
    assert per_step % 4 == 0
    assert stats.evaluated["unit"] == 2 * (per_step // 4) + 2 * 2
    assert handle.info["feature"] == "up_blocks.2.attentions.1"


def test_cached_step_reuses_exactly_the_feature(sd):
    """Step 1 of N=2 equals the plain UNet at step 1 with only the feature unit's output taken from step 0."""
    pipe, kw = sd
    unet = pipe.unet
    plan = plan_deepcache(unet, 1)
    feature = dict(unet.named_modules())[plan.feature]
    inputs, outputs = [], []

    def grab(module, args, kwargs, out):
        inputs.append((args, kwargs))
        outputs.append(out[0])

    hook = unet.register_forward_hook(grab, with_kwargs=True)
    dq.enable_cache(pipe, "deepcache", interval=2, branch=1)
    run(pipe, kw)
    dq.disable_cache(pipe)
    hook.remove()
    stored = []
    h = feature.register_forward_hook(lambda m, a, o: stored.append(o) and None)
    (a0, k0), (a1, k1) = inputs[0], inputs[1]
    with torch.no_grad():
        unet(*a0, **k0)
        h.remove()
        h = feature.register_forward_hook(lambda m, a, o: stored[0])
        expected = unet(*a1, **k1)[0]
    h.remove()
    assert torch.allclose(outputs[1], expected, atol=1e-6)
    with torch.no_grad():
        full = unet(*a1, **k1)[0]
    assert not torch.allclose(outputs[1], full, atol=1e-4)


def test_no_state_between_calls(sd):
    from tiny_pipelines import build

    pipe, kw = sd
    other = dict(kw, prompt_embeds=torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(5)))
    fresh = []
    for call in (kw, other):
        p, _ = build("sd")
        p.set_progress_bar_config(disable=True)
        dq.enable_cache(p, "deepcache", interval=3)
        fresh.append(run(p, call))
    dq.enable_cache(pipe, "deepcache", interval=3)
    assert torch.equal(run(pipe, kw), fresh[0])
    assert torch.equal(run(pipe, other), fresh[1])
    # batch size and resolution change inside one session
    two = run(pipe, dict(kw, num_images_per_prompt=2))
    assert two.shape[0] == 2
    assert run(pipe, dict(kw, height=64, width=64)).shape[-1] == 64 // pipe.vae_scale_factor
    assert torch.equal(run(pipe, kw), fresh[0])


def test_cache_with_lora(sd):
    from peft import LoraConfig

    pipe, kw = sd
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "conv1"], init_lora_weights=False))
    ref = run(pipe, kw)
    dq.enable_cache(pipe, "deepcache", interval=1)
    assert torch.equal(run(pipe, kw), ref)
    dq.disable_cache(pipe)
    dq.enable_cache(pipe, "deepcache", interval=2)
    assert torch.isfinite(run(pipe, kw)).all()


def test_cache_aware_calibration_inputs(sd):
    """With a cache on, a collector that runs the pipeline sees what the model really sees on cached steps:
    the mid block runs only on refresh steps, and the running up layer reads the reused feature."""
    pipe, kw = sd
    unet = pipe.unet
    mid_conv = unet.mid_block.resnets[0].conv1
    last_conv = unet.up_blocks[2].resnets[2].conv1
    seen = {"mid": 0, "last": []}
    h1 = mid_conv.register_forward_hook(lambda m, a, o: seen.__setitem__("mid", seen["mid"] + 1))
    h2 = last_conv.register_forward_hook(lambda m, a, o: seen["last"].append(a[0].clone()))
    run(pipe, kw)
    uncached = list(seen["last"])
    seen["mid"], seen["last"] = 0, []
    dq.enable_cache(pipe, "deepcache", interval=2, branch=0)
    run(pipe, kw)
    h1.remove(), h2.remove()
    assert seen["mid"] == 2  # refresh steps 0 and 2 only
    assert len(seen["last"]) == 4
    assert torch.equal(seen["last"][0], uncached[0])
    assert not torch.allclose(seen["last"][1], uncached[1])


def test_quadratic_and_explicit_schedules(sd):
    pipe, kw = sd
    handle = dq.enable_cache(pipe, "deepcache", schedule="quadratic", interval=2, center=1)
    run(pipe, kw)
    assert handle.stats.refresh_steps == 2
    dq.disable_cache(pipe)
    handle = dq.enable_cache(pipe, "deepcache", refresh_steps=(0, 3))
    run(pipe, kw)
    assert (handle.stats.refresh_steps, handle.stats.cached_steps) == (2, 2)


def test_bad_inputs(sd, pixart):
    pipe, kw = sd
    with pytest.raises(DQError, match="branch 40 does not exist.*branches 0..8"):
        dq.enable_cache(pipe, "deepcache", branch=40)
    assert not hasattr(pipe.unet, "_dq_cache")  # a failed enable leaves no hooks
    dq.enable_cache(pipe, "deepcache", refresh_steps=(0, 2, 6))
    with pytest.raises(DQError, match="refreshes at step 6 but the pipeline runs 4 steps"):
        run(pipe, kw)
    with pytest.raises(DQError, match="already enabled"):
        dq.enable_cache(pipe, "deepcache")
    dq.disable_cache(pipe)
    with pytest.raises(DQError, match="unknown cache method 'deep'"):
        dq.enable_cache(pipe, "deep")
    with pytest.raises(DQError, match="unknown option"):
        dq.enable_cache(pipe, "deepcache", threshold=0.1)
    with pytest.raises(DQError, match="needs a UNet"):
        dq.enable_cache(pixart[0], "deepcache")


def test_parse_variant():
    recipe, config = parse_variant("svdquant-w4a4+deepcache")
    assert recipe == "svdquant-w4a4" and config == DeepCacheConfig()
    recipe, config = parse_variant("fp+block-cache:interval=2,blocks=1/5")
    assert recipe is None and config.interval == 2 and config.blocks == (1, 5)
    assert parse_variant("w8a8") == ("w8a8", None)
    with pytest.raises(DQError, match="unknown cache method"):
        parse_variant("w8a8+nocache")
