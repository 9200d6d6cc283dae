"""Cache-aware calibration: samples collected with a step cache replay cached steps as the cache ran them."""

import pytest
import torch

import dq
from dq.cache import BlockCacheConfig, DeepCacheConfig
from dq.calib.data import CalibBatch
from dq.pipelines.calibration import CalibConfig, collect
from dq.errors import DQError
from tiny_pipelines import run


def _calib_config(kw, steps=4, samples=2, **overrides):
    kw = {k: v for k, v in kw.items() if k not in ("num_inference_steps", "output_type")}
    return CalibConfig(prompts=["p"] * samples, steps=steps, samples=samples, batch_size=samples, sampling="all",
                       pipeline_kwargs=kw, **overrides)


def _static_w8a8(timestep_groups: int) -> dq.Recipe:
    """W8A8 with static min-max activation scales, one per timestep group (data-calibrated)."""
    return dq.Recipe.from_dict({
        "name": f"w8a8-static-{timestep_groups}", "weight": {"format": "int8", "granularity": "channel"},
        "act": {"format": "int8", "granularity": "tensor", "symmetric": False},
        "method": "timestep", "options": {"timestep_groups": timestep_groups},
    })


def _first(out):
    return out[0] if isinstance(out, tuple) else getattr(out, "sample", out)


@pytest.mark.parametrize("family,config", [("sd", DeepCacheConfig(interval=2, branch=0)), ("pixart", BlockCacheConfig(interval=2, blocks=(0, 2)))])
def test_replayed_samples_reproduce_the_cached_run(family, config, request):
    pipe, kw = request.getfixturevalue(family)
    denoiser = pipe.unet if family == "sd" else pipe.transformer
    dq.enable_cache(pipe, config)
    outputs = []
    hook = denoiser.register_forward_hook(lambda m, a, o: outputs.append(_first(o).detach().clone()))
    cfg = _calib_config(kw)
    data = collect(pipe, cfg)
    hook.remove()
    assert [s.cached for s in data.samples if s.prompt == 0] == [False, True, False, True]
    with torch.no_grad():
        for s in data.samples:
            recorded = outputs[s.step][torch.arange(s.prompt, 2 * cfg.samples, cfg.samples)]
            replayed = _first(data.replay(denoiser, CalibBatch([s], s.args, s.kwargs, s.cache_state)))
            dq.disable_cache(pipe)
            uncached = _first(data.replay(denoiser, CalibBatch([s], s.args, s.kwargs, None)))
            dq.enable_cache(pipe, config)
            err = float((replayed - recorded).abs().max())
            assert err < 5e-3 * float(recorded.abs().max()) + 1e-4  # inputs were stored in float16
            if s.cached:
                # what an uncached replay would have calibrated on is a different computation
                assert float((uncached - recorded).abs().max()) > 5 * err
    # replays leave no state behind: the next pipeline call is a normal cached call
    first = run(pipe, kw)
    assert torch.equal(run(pipe, kw), first)
    dq.disable_cache(pipe)


def test_cached_calibration_data_is_keyed_by_the_cache(sd, tmp_path):
    pipe, kw = sd
    cfg = _calib_config(kw, steps=2, samples=1, cache_dir=str(tmp_path))
    plain = collect(pipe, cfg)
    dq.enable_cache(pipe, DeepCacheConfig(interval=2, branch=0))
    cached = collect(pipe, cfg)
    dq.disable_cache(pipe)
    assert len(list(tmp_path.iterdir())) == 2  # the uncached data was not reused for the cached run
    assert not any(s.cached for s in plain.samples) and any(s.cached for s in cached.samples)


def test_quantize_with_a_cache_calibrates_on_cached_steps(sd):
    pipe, kw = sd
    recipe = _static_w8a8(timestep_groups=1)
    consumer = "up_blocks.1.resnets.0.conv1"  # DeepCache branch 0: the first up layer reading the cached feature

    def calibrated_scale(with_cache: bool) -> torch.Tensor:
        from tiny_pipelines import build

        p, k = build("sd")
        p.set_progress_bar_config(disable=True)
        if with_cache:
            dq.enable_cache(p, DeepCacheConfig(interval=2, branch=0))
        dq.quantize(p, recipe, calib=_calib_config(k, steps=4, samples=2))
        return p.unet.get_submodule(consumer).act_quantizer.scale.clone()

    assert not torch.equal(calibrated_scale(True), calibrated_scale(False))


def test_adaptive_cache_cannot_be_replayed(pixart):
    pipe, kw = pixart
    dq.enable_cache(pipe, "first-block-cache", threshold=0.1)
    with pytest.raises(DQError, match="disable_cache"):
        dq.quantize(pipe, "w4a8-timestep", calib=_calib_config(kw))
    dq.disable_cache(pipe)


def test_per_step_scales_of_layers_a_cache_skips_come_from_the_nearest_step(pixart):
    pipe, kw = pixart
    recipe = _static_w8a8(timestep_groups=4)
    dq.enable_cache(pipe, BlockCacheConfig(interval=2, blocks=(1, 2)))  # block 1 runs on steps 0 and 2 only
    dq.quantize(pipe, recipe, calib=_calib_config(kw, steps=4, samples=2))
    dq.disable_cache(pipe)
    skipped = pipe.transformer.get_submodule("transformer_blocks.1.attn1.to_q").act_quantizer.scale.flatten()
    ran = pipe.transformer.get_submodule("transformer_blocks.0.attn1.to_q").act_quantizer.scale.flatten()
    assert len(set(ran.tolist())) == 4  # a layer that always runs has its own scale at every step
    # a layer inside the cached range has statistics of the 2 steps it ran; the other 2 reuse a neighbour's
    assert len(set(skipped.tolist())) == 2
