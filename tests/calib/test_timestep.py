"""Timestep-aware activation scales: group selection (seen, unseen, CFG, per-row), FSC, save/reload."""

import pytest
import torch
from torch import nn

from dq.calib.data import CalibData, CalibSample
from dq.calib.timestep import calibrate_activations, group_ranges, nearest_group
from dq.errors import DQError
from dq.nn import QuantLinear
from dq.quant import PerChannel, PerTensor, QuantSpec, fake_quantize

A_SPEC = QuantSpec("int8", PerTensor(), symmetric=False)


class Toy(nn.Module):
    """A denoiser-shaped module whose activation range grows with the timestep."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(8, 8)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        t = torch.as_tensor(timestep).float().reshape(-1, *[1] * (sample.dim() - 1))
        return self.lin(sample * (1 + t / 100))


TIMESTEPS = [900.0, 600.0, 300.0, 0.0]


def _data():
    torch.manual_seed(1)
    samples = [
        CalibSample(step, t, prompt, (torch.randn(2, 4, 8), torch.full((2,), t)), {}, 2)
        for prompt in range(2) for step, t in enumerate(TIMESTEPS)
    ]
    return CalibData(samples, TIMESTEPS)


def _quantized_toy(groups):
    toy = Toy()
    toy.lin = QuantLinear.from_float(toy.lin, QuantSpec("int8", PerChannel()), A_SPEC)
    data = _data()
    calibrate_activations(toy, {"lin": toy.lin}, data, "minmax", groups=groups, batch_size=4)
    return toy, data


def test_fsc_one_parameter_set_per_step():
    toy, data = _quantized_toy(groups=len(TIMESTEPS))
    q = toy.lin.act_quantizer
    assert q.groups == 4
    assert q.timestep_ranges[:, 0].tolist() == sorted(TIMESTEPS)  # group g <-> g-th smallest timestep
    for g, t in enumerate(sorted(TIMESTEPS)):
        xs = torch.cat([s.args[0] for s in data.samples if s.timestep == t]).float() * (1 + t / 100)
        expected = (xs.max().clamp(min=0) - xs.min().clamp(max=0)) / 255
        assert torch.allclose(q.scale[g].flatten(), expected.flatten(), rtol=1e-5)
    x = torch.randn(2, 5, 8)
    for g, t in enumerate(sorted(TIMESTEPS)):
        toy(x, torch.tensor([t, t]))  # a CFG batch: both rows share the step
        assert q.group == g
        toy(x, timestep=t)  # keyword and python-number timesteps work too
        assert q.group == g


def test_unseen_timesteps_use_nearest_group():
    ranges = group_ranges(TIMESTEPS, 2)
    assert ranges.tolist() == [[0.0, 300.0], [600.0, 900.0]]
    t = torch.tensor([0.0, 299.0, 440.0, 460.0, 620.0, 999.0, -5.0])
    assert nearest_group(ranges, t).tolist() == [0, 0, 0, 1, 1, 1, 0]
    toy, _ = _quantized_toy(groups=2)
    x = torch.randn(2, 5, 8)
    y = toy(x, torch.tensor([999.0, 999.0]))
    q = toy.lin.act_quantizer
    assert q.group == 1
    xin = x * (1 + 999 / 100)
    ref = nn.functional.linear(fake_quantize(xin, A_SPEC, q.scale[1], q.zero[1]), toy.lin.fake_quantized_weight(), toy.lin.bias)
    assert torch.allclose(y, ref, atol=1e-5)


def test_rows_of_different_groups_are_quantized_per_row():
    toy, _ = _quantized_toy(groups=2)
    x = torch.randn(2, 5, 8)
    y = toy(x, torch.tensor([0.0, 900.0]))
    y0 = toy(x[:1], torch.tensor([0.0]))
    y1 = toy(x[1:], torch.tensor([900.0]))
    assert torch.allclose(y, torch.cat([y0, y1]), atol=1e-6)


def test_grouped_quantizer_without_hook_is_an_error():
    toy, _ = _quantized_toy(groups=2)
    toy.lin.act_quantizer.group = None
    with pytest.raises(DQError, match="no timestep group"):
        toy.lin(torch.randn(2, 8))


def test_timestep_groups_survive_save_and_reload(tmp_path):
    from diffusers import UNet2DConditionModel

    from dq.nn import swap_layers
    from dq.pipelines.backend import attach_quantizer
    from dq.nn.select import select_layers
    from dq.recipes import load_recipe
    from tiny_pipelines import build

    recipe = load_recipe("w4a8-timestep")
    unet = build("sd")[0].unet
    torch.manual_seed(0)
    emb = torch.randn(2, 7, 64)
    samples = [
        CalibSample(i, t, 0, (torch.randn(2, 4, 8, 8).half(), torch.full((2,), t)), {"encoder_hidden_states": emb.half()}, 2)
        for i, t in enumerate([801.0, 601.0, 401.0, 201.0, 1.0])
    ]
    data = CalibData(samples, [s.timestep for s in samples])
    sel = select_layers(unet, recipe.weight, recipe.act, recipe.layers, recipe.skip, recipe.only)
    layers = swap_layers(unet, sel.plans)
    assert calibrate_activations(unet, layers, data, "minmax", groups=3) == 3
    for layer in layers.values():
        layer.deploy()
    attach_quantizer(unet, recipe)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        outs = [unet(x, t, encoder_hidden_states=emb[:1]).sample for t in (801.0, 500.0, 1.0)]  # 500: unseen
    unet.save_pretrained(tmp_path)
    import dq  # noqa: F401  (registers the backend)

    again = UNet2DConditionModel.from_pretrained(tmp_path)
    name = next(iter(layers))
    q = again.get_submodule(name).act_quantizer
    assert q.groups == 3 and torch.equal(q.timestep_ranges, layers[name].act_quantizer.timestep_ranges)
    with torch.no_grad():
        again_outs = [again(x, t, encoder_hidden_states=emb[:1]).sample for t in (801.0, 500.0, 1.0)]
    for a, b in zip(outs, again_outs):
        assert torch.equal(a, b)
    assert not torch.equal(outs[0], outs[2])


def test_non_finite_activation_names_layer_and_step():
    toy = Toy()
    toy.lin = QuantLinear.from_float(toy.lin, QuantSpec("int8", PerChannel()), A_SPEC)
    data = _data()
    bad = data.samples[2]  # step 2
    bad.args[0][0, 0, 0] = float("inf")
    with pytest.raises(DQError, match=r"layer 'lin' at step 2"):
        calibrate_activations(toy, {"lin": toy.lin}, data, "minmax", groups=1, batch_size=4)

