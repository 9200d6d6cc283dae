"""Split shortcut: split points at the concat boundary, separate quantizers, save/reload by plan."""

import torch
from tiny_pipelines import build
from torch import nn

from dq.calib.data import CalibData, CalibSample
from dq.calib.qdiffusion import find_split_points, plan_split_shortcuts
from dq.calib.timestep import calibrate_activations
from dq.nn import LayerPlan, QuantConv2d, QuantSplitConv2d, plan_of, swap_layers
from dq.nn.select import LayerSelection
from dq.quant import PerChannel, PerTensor, QuantSpec

W_SPEC = QuantSpec("int4", PerChannel(), symmetric=False)
A_SPEC = QuantSpec("int8", PerTensor(), symmetric=False)


def test_split_points_are_the_concat_boundary():
    unet = build("sd")[0].unet
    points = find_split_points(unet)
    seen = {}

    def grab(block_idx):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            res = kwargs.get("res_hidden_states_tuple", args[1] if len(args) > 1 else None)
            seen[block_idx] = (h.shape[1], [r.shape[1] for r in res])
        return hook

    handles = [b.register_forward_pre_hook(grab(i), with_kwargs=True) for i, b in enumerate(unet.up_blocks)]
    with torch.no_grad():
        unet(torch.randn(1, 4, 8, 8), 10, encoder_hidden_states=torch.randn(1, 7, 64))
    for h in handles:
        h.remove()
    n_shortcuts = 0
    for b, block in enumerate(unet.up_blocks):
        h_ch, res = seen[b]
        for i, resnet in enumerate(block.resnets):
            skip = res[-(i + 1)]  # diffusers pops the skips from the end
            h_i = h_ch if i == 0 else block.resnets[i - 1].out_channels
            assert h_i + skip == resnet.in_channels
            name = f"up_blocks.{b}.resnets.{i}.conv_shortcut"
            if resnet.conv_shortcut is not None:
                assert points[name] == h_i
                n_shortcuts += 1
    assert n_shortcuts == len(points) > 0
    assert all(k.endswith("conv_shortcut") for k in points)
    assert any(k.endswith("conv1") for k in find_split_points(unet, conv1=True))


class CatConv(nn.Module):
    """cat([h, skip]) -> 1x1 conv, halves with ranges 100x apart (as in a UNet decoder shortcut)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv_shortcut = nn.Conv2d(48, 16, 1)
        with torch.no_grad():  # the trained net balances the halves: small weights on the large half
            self.conv_shortcut.weight[:, :32] *= 0.01

    def forward(self, sample, timestep):
        return self.conv_shortcut(sample)


def _data():
    torch.manual_seed(1)
    def x():
        return torch.cat([torch.randn(2, 32, 4, 4) * 100, torch.randn(2, 16, 4, 4)], dim=1)
    return CalibData([CalibSample(0, 10.0, i, (x(), torch.full((2,), 10.0)), {}, 2) for i in range(4)], [10.0])


def test_split_quantizers_cut_error_when_halves_differ():
    data = _data()
    x = data.samples[0].args[0]
    outs = {}
    for split in (False, True):
        model = CatConv()
        ref = model(x, 10.0).detach()
        w8 = QuantSpec("int8", PerChannel(), symmetric=False)  # isolate the activation split
        plan = LayerPlan("split_conv2d", w8, A_SPEC, {"split": 32}) if split else LayerPlan("conv2d", w8, A_SPEC)
        layers = swap_layers(model, {"conv_shortcut": plan})
        calibrate_activations(model, layers, data, "minmax")
        with torch.no_grad():
            outs[split] = float((model(x, 10.0) - ref).pow(2).mean() / ref.pow(2).mean())
        if split:
            layer = layers["conv_shortcut"]
            assert float(layer.act_quantizer.scale) > 30 * float(layer.act_quantizer_skip.scale)
            assert layer.weight_quantizer.in_features == 32 and layer.weight_quantizer_skip.in_features == 16
    assert outs[True] < 0.5 * outs[False]


def test_split_layer_saves_and_reloads_from_its_plan():
    model = CatConv()
    layers = swap_layers(model, {"conv_shortcut": LayerPlan("split_conv2d", W_SPEC, A_SPEC, {"split": 32})})
    layer = layers["conv_shortcut"]
    assert isinstance(layer, QuantSplitConv2d)
    calibrate_activations(model, layers, _data(), "minmax")
    layer.deploy()
    x = _data().samples[1].args[0]
    y = model(x, 10.0)
    plan = plan_of(layer)
    assert plan.kind == "split_conv2d" and plan.options == {"split": 32}
    again = CatConv()
    new = swap_layers(again, {"conv_shortcut": LayerPlan.from_dict(plan.to_dict())}, init_scales=False)["conv_shortcut"]
    new.allocate_deployed()
    again.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(again(x, 10.0), y)


def test_qdiffusion_plans_only_decoder_shortcuts_as_split_layers():
    unet = build("sd")[0].unet
    names = list(find_split_points(unet))
    selection = LayerSelection({n: LayerPlan("conv2d", W_SPEC, A_SPEC) for n in names + ["down_blocks.1.resnets.0.conv_shortcut"]})
    done = plan_split_shortcuts(unet, selection)
    assert sorted(done) == sorted(names)
    layers = swap_layers(unet, selection.plans)
    assert all(isinstance(layers[n], QuantSplitConv2d) and layers[n].split == find_split_points(unet)[n] for n in names)
    assert type(unet.get_submodule("down_blocks.1.resnets.0.conv_shortcut")) is QuantConv2d
