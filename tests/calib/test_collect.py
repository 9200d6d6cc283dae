"""Calibration data collection: timestep samplings, per-prompt slicing, cache, and bad input."""

import math

import pytest
import torch

from dq.pipelines.calibration import CalibConfig, collect, ndtc_draw, nearest_step, uniform_steps
from dq.errors import DQError

from calib_fixtures import tiny_sd_calib


def test_ndtc_draws_clipped_normal():
    t = ndtc_draw(40000, 1000, 0.4, 0.4, torch.Generator().manual_seed(0))
    assert t.min() >= 0 and t.max() <= 999 and bool((t == t.floor()).all())
    # N(400, 400) clipped: P(t <= 0) = Phi(-1), P(t >= 999) ~ 1 - Phi(1.4975), median 400
    phi = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))
    assert abs(float((t == 0).float().mean()) - phi(-1.0)) < 0.01
    assert abs(float((t == 999).float().mean()) - (1 - phi(1.4975))) < 0.01
    assert abs(float(t.median()) - 400) < 12


def test_uniform_steps_follow_qdiffusion():
    assert uniform_steps(20, 10) == list(range(0, 20, 2))
    assert uniform_steps(50, 25) == list(range(0, 50, 2))
    assert uniform_steps(100, 20) == list(range(0, 100, 5))


def test_all_sampling_keeps_every_step_and_both_cfg_rows(sd_all_data):
    pipe, cfg, data = sd_all_data
    assert data.steps == [0, 1, 2, 3]
    assert len(data) == cfg.samples * cfg.steps
    s = data.samples[0]
    assert s.rows == 2  # uncond + cond rows of one prompt
    assert s.args[0].dtype == torch.float16 and s.args[0].shape[0] == 2
    # the stored timestep argument is the timestep of the step the sample is labelled with
    for s in data.samples:
        assert torch.allclose(s.args[1].float(), torch.full((2,), s.timestep))
        assert s.timestep == data.schedule[s.step]
    # the two prompts started from different noise
    a, b = [x for x in data.samples if x.step == 0]
    assert not torch.equal(a.args[0], b.args[0])


def test_ndtc_labels_are_the_steps_actually_run(sd_all_data):
    pipe, cfg, full = sd_all_data
    pipe2, cfg2 = tiny_sd_calib(sampling="ndtc", samples=2, ndtc_mu=0.5, ndtc_sigma=0.3)
    data = collect(pipe, cfg2)
    assert len(data) == 2 and len(data.drawn) == 2
    for s in data.samples:
        step = nearest_step(data.schedule, data.drawn[s.prompt])
        assert s.step == step and s.timestep == data.schedule[step]
        # identical to the 'all' collection of the same prompt at that step (same seeds)
        ref = next(x for x in full.samples if x.prompt == s.prompt and x.step == s.step)
        assert torch.equal(ref.args[0], s.args[0])


def test_cache_reuses_same_settings(tmp_path, monkeypatch):
    pipe, cfg = tiny_sd_calib(steps=2, samples=1, sampling="all", cache_dir=str(tmp_path))
    first = collect(pipe, cfg)
    assert len(list(tmp_path.glob("calib-*.pt"))) == 1
    import dq.pipelines.calibration as c

    monkeypatch.setattr(c, "_run", lambda *a, **k: pytest.fail("re-ran the pipeline despite the cache"))
    again = collect(pipe, cfg)
    assert torch.equal(first.samples[0].args[0], again.samples[0].args[0])


def test_bad_inputs():
    with pytest.raises(DQError, match="zero prompts"):
        pipe, cfg = tiny_sd_calib(steps=2, samples=1)
        cfg.prompts = []
        collect(pipe, cfg)
    with pytest.raises(DQError, match="sampling"):
        CalibConfig(sampling="random")
    with pytest.raises(DQError, match="neither a bundled prompt set"):
        pipe, cfg = tiny_sd_calib(steps=2, samples=1)
        cfg.prompts = "no-such-set"
        collect(pipe, cfg)


def test_size_cap_names_the_setting():
    pipe, cfg = tiny_sd_calib(steps=2, samples=1, sampling="all", max_bytes=1000)
    with pytest.raises(DQError, match="max_bytes.*lower CalibConfig.samples"):
        collect(pipe, cfg)


def test_nan_inputs_name_input_and_step():
    pipe, cfg = tiny_sd_calib(steps=2, samples=1, sampling="all")
    emb = cfg.pipeline_kwargs["prompt_embeds"].clone()
    emb[0, 0, 0] = float("nan")
    cfg.pipeline_kwargs["prompt_embeds"] = emb
    with pytest.raises(DQError, match=r"encoder_hidden_states.*step 0"):
        collect(pipe, cfg)


def test_default_calibration_set_is_logged(caplog):
    from dq import reference
    from dq.pipelines.calibration import default_calib, resolve_prompts

    with caplog.at_level("WARNING"):
        cfg = default_calib("w4a8-qdiffusion", object())
    assert cfg.sampling is None and "calib=None" in caplog.text
    assert cfg.prompts == "default", "a pipeline outside the reference domain calibrates on the general prompt set"
    assert default_calib("w4a8-qdiffusion", reference.load("ref-pixart")).prompts == "reference"
    assert len(resolve_prompts(cfg)) == cfg.samples
    assert len(resolve_prompts(CalibConfig(prompts="default", samples=5))) == 5
