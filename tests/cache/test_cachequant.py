import pytest
import torch

import dq
from dq.cache import CacheQuantConfig, calibrate_cachequant
from dq.cache.dec import channel_affine_fit, channel_shift_fit
from dq.cache.schedule import segment_bounds
from dq.errors import DQError
from tiny_pipelines import run


def test_channel_affine_fit_is_least_squares():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g)
    a_true, b_true = torch.tensor([2.0, -0.5, 1.0]), torch.tensor([1.0, 0.0, -3.0])
    y = x * a_true.view(1, 3, 1, 1) + b_true.view(1, 3, 1, 1)
    a, b = channel_affine_fit(x, y, channel_dim=1)
    assert torch.allclose(a, a_true, atol=1e-5) and torch.allclose(b, b_true, atol=1e-5)
    noisy = y + 0.1 * torch.randn(y.shape, generator=g)
    a, b = channel_affine_fit(x, noisy, channel_dim=1)
    fit = x * a.view(1, 3, 1, 1) + b.view(1, 3, 1, 1)
    assert ((fit - noisy) ** 2).mean() <= ((y - noisy) ** 2).mean()


def test_channel_shift_fit_corrects_the_mean_drift_only():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 3, 5, 5, generator=g)
    drift = torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1)
    noisy = 0.5 * x + drift + 0.1 * torch.randn(x.shape, generator=g)
    a, b = channel_shift_fit(x, noisy, channel_dim=1)
    assert torch.equal(a, torch.ones(3))  # never shrinks the feature, unlike the affine fit (a ~ 0.5 here)
    assert torch.allclose(b, (noisy - x).mean((0, 2, 3)), atol=1e-6)
    assert ((x + b.view(1, 3, 1, 1) - noisy) ** 2).mean() < ((x - noisy) ** 2).mean()


def test_given_refresh_steps_skip_the_dp(sd):
    pipe, kw = sd
    kw = dict(kw, num_inference_steps=6)
    config = calibrate_cachequant(pipe, [kw], interval=3, branch=0, dec="shift", refresh_steps=(0, 2, 5))
    assert config.refresh_steps == (0, 2, 5) and set(config.feature_scale) == {1, 3, 4}


def test_unknown_dec_fit_is_an_error(sd):
    pipe, kw = sd
    with pytest.raises(DQError, match="affine"):
        calibrate_cachequant(pipe, [kw], interval=2, dec="ridge")


def test_calibrate_save_reload_and_correction(sd, tmp_path):
    pipe, kw = sd
    kw = dict(kw, num_inference_steps=6)
    calls = [kw, dict(kw, prompt_embeds=torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(1)))]
    config = calibrate_cachequant(pipe, calls, interval=3, branch=0)
    k, lo, hi = segment_bounds(6, 3)
    assert len(config.refresh_steps) == k and config.refresh_steps[0] == 0
    assert set(config.feature_scale) == set(range(6)) - set(config.refresh_steps)
    config.save_pretrained(tmp_path)
    loaded = CacheQuantConfig.from_pretrained(tmp_path)
    assert loaded.refresh_steps == config.refresh_steps
    assert all(torch.equal(loaded.feature_scale[s], config.feature_scale[s]) for s in config.feature_scale)
    # DEC is the least-squares fit on the calibration trajectories: it never increases the feature error there.
    dq.enable_cache(pipe, CacheQuantConfig(interval=1, branch=0))
    traj = dq.cache.record_trajectory(pipe, calls)
    dq.disable_cache(pipe)
    corr, raw = 0.0, 0.0
    for f in traj:
        for step, a in loaded.feature_scale.items():
            c = max(s for s in loaded.refresh_steps if s <= step)
            fixed = f[c] * a.view(1, -1, 1, 1) + loaded.feature_shift[step].view(1, -1, 1, 1)
            corr += float(((fixed - f[step]) ** 2).sum())
            raw += float(((f[c] - f[step]) ** 2).sum())
    assert corr < raw
    plain = CacheQuantConfig(interval=3, refresh_steps=config.refresh_steps, num_inference_steps=6)
    dq.enable_cache(pipe, plain)
    naive = run(pipe, kw)
    dq.disable_cache(pipe)
    dq.enable_cache(pipe, loaded)
    assert not torch.equal(run(pipe, kw), naive)  # the correction is applied on cached steps
