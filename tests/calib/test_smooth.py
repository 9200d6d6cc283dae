"""Smoothing: the scale moves outliers from activations to weights, keeps the FP product, and the
search picks the candidate with the lowest quantized-output error."""

import pytest
import torch
from torch import nn

from dq.calib.data import CalibData, CalibSample
from dq.calib.smooth import alpha_beta_grid, capture_layer_inputs, channel_absmax, first_guess_alpha, search_smoothing, smooth_scale
from dq.errors import DQError
from dq.nn import QuantLinear
from dq.quant import PerGroup, PerToken, QuantSpec

W4 = QuantSpec("int4", PerGroup(64))
A4 = QuantSpec("int4", PerToken(64))


def outlier_inputs(n=512, d=128, channels=(3, 77), scale=40.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, list(channels)] *= scale
    return x


def test_smoothing_moves_outliers_and_keeps_fp_output():
    x = outlier_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    s = smooth_scale(channel_absmax(x), w.abs().amax(0), 0.5, 0.5)
    xs, ws = x / s, w * s
    # The activation outlier channels shrink: the largest channel max drops by several times.
    assert channel_absmax(xs).max() < channel_absmax(x).max() / 4
    # Channel ranges become flatter (max/median ratio).
    def ratio(t):
        return float(t.max() / t.median())

    assert ratio(channel_absmax(xs)) < ratio(channel_absmax(x)) / 4
    # In floating point the layer is unchanged.
    torch.testing.assert_close(xs @ ws.t(), x @ w.t(), rtol=1e-4, atol=1e-4)


def test_smooth_scale_edge_cases():
    x_span = torch.tensor([4.0, 0.0, 9.0])
    w_span = torch.tensor([1.0, 2.0, 0.0])
    s = smooth_scale(x_span, w_span, 0.5, 0.5)
    assert s.tolist() == [2.0, 1.0, 1.0]  # dead channels keep s = 1
    assert torch.equal(smooth_scale(x_span, w_span, 0.0, 0.0), torch.ones(3))
    with pytest.raises(DQError, match="smoothing strengths"):
        smooth_scale(x_span, w_span, 1.5, 0.0)


def test_first_guess_and_grid():
    assert first_guess_alpha(W4, A4) == 0.5
    assert first_guess_alpha(W4, QuantSpec("int8", PerToken())) == pytest.approx(1 / 3)
    assert first_guess_alpha(W4, None) == 0.0
    grid = alpha_beta_grid(20, first=0.5)
    assert grid[0] == (0.5, 0.5) and (0.0, 0.0) in grid and len(grid) == 20  # the guess is not repeated
    assert len(alpha_beta_grid(20, search_beta=True)) == 39  # deepcompressor's population size


def test_search_picks_lowest_score():
    x_span, w_span = torch.rand(16) + 0.5, torch.rand(16) + 0.5
    target = smooth_scale(x_span, w_span, 0.3, 0.7)
    found = search_smoothing(x_span, w_span, alpha_beta_grid(10), lambda s: float((s - target).abs().sum()))
    assert (found.alpha, found.beta) == (0.3, 0.7)
    assert min(found.errors.values()) == found.errors[(0.3, 0.7)]


def test_capture_records_fp_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
    fp = nn.Sequential(*[m for m in model])
    x = torch.randn(4, 10, 64)
    expected_fc2_input = model[1](model[0](x)).detach()
    q = {"0": QuantLinear.from_float(model[0], W4, A4), "2": QuantLinear.from_float(model[2], W4, A4)}
    model[0], model[2] = q["0"], q["2"]
    data = CalibData([CalibSample(0, 1.0, i, (x,), {}, 4) for i in range(2)], [1.0])
    got = capture_layer_inputs(model, q, data, ["0", "2"], max_tokens=50, batch_size=1)
    assert got["2"].count == 80 and got["2"].tokens.shape == (50, 64)
    # Statistics are those of the float model (the quantizers are bypassed during capture).
    torch.testing.assert_close(got["2"].absmax, channel_absmax(expected_fc2_input))
    torch.testing.assert_close(got["2"].minimum, expected_fc2_input.min())
    assert not q["0"].act_quantizer.bypass  # bypass restored afterwards
    del fp
    # A layer's token subsample is keyed by its name: the same when it is captured alone (one block at a time).
    alone = capture_layer_inputs(model, q, data, ["2"], max_tokens=50, batch_size=1)
    assert torch.equal(alone["2"].tokens, got["2"].tokens)
