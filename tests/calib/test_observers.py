"""Observers: min-max, percentile and Lp search of the clipping range."""

import pytest
import torch

from dq.calib.observers import OBSERVERS, fake_quant_grouped, weight_scales
from dq.errors import DQError
from dq.quant import PerChannel, PerTensor, QuantSpec


def _err(x, spec, scale, zero, p=2.0):
    g = x.reshape(1, -1)
    return float((g - fake_quant_grouped(g, scale, zero, spec)).abs().pow(p).sum())


def test_minmax_is_exact_range_streamed():
    spec = QuantSpec("int8", PerTensor(), symmetric=False)
    obs = OBSERVERS.get("minmax")(spec)
    obs.update(torch.tensor([[-1.0, 2.0]]))
    obs.update(torch.tensor([[0.5, 3.0]]))
    scale, zero = obs.compute()
    assert torch.allclose(scale, torch.tensor([[4.0 / 255]]))


@pytest.mark.parametrize("name", ["lp", "mse", "percentile"])
def test_searched_ranges_beat_minmax_on_outliers(name):
    torch.manual_seed(0)
    x = torch.randn(64, 256)
    x[0, 0] = 60.0  # one outlier stretches the min-max range
    spec = QuantSpec("int4", PerTensor(), symmetric=False)
    mm = OBSERVERS.get("minmax")(spec)
    ob = OBSERVERS.get(name)(spec)
    for chunk in x.split(16):
        mm.update(chunk)
        ob.update(chunk)
    s_mm, z_mm = mm.compute()
    s, z = ob.compute()
    assert float(s) < float(s_mm)
    assert _err(x, spec, s, z) < 0.7 * _err(x, spec, s_mm, z_mm)


def test_lp_weight_scales_per_channel_never_worse_than_minmax():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.linspace(0.1, 3, 16)[:, None]
    spec = QuantSpec("int4", PerChannel(), symmetric=False)
    s_mm, z_mm = weight_scales(w, spec, "minmax")
    s_lp, z_lp = weight_scales(w, spec, "lp")
    assert s_lp.shape == (16, 1)
    g = w.reshape(16, 1, 64)
    e_mm = (g - fake_quant_grouped(g, s_mm.reshape(16, 1, 1), z_mm.reshape(16, 1, 1), spec)).abs().pow(2.4).sum(-1)
    e_lp = (g - fake_quant_grouped(g, s_lp.reshape(16, 1, 1), z_lp.reshape(16, 1, 1), spec)).abs().pow(2.4).sum(-1)
    assert bool((e_lp <= e_mm + 1e-6).all()) and float(e_lp.sum()) < float(e_mm.sum())


def test_unknown_observer_lists_names():
    with pytest.raises(DQError, match="minmax"):
        OBSERVERS.get("kl")
