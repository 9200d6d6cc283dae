"""QServe's progressive groups (dq.quant.progressive): the INT8 operand stays in INT8, the error bound of the
two roundings, the spec's rules, and a deployed layer that stores the format and computes as simulated."""

import pytest
import torch
from torch import nn

from dq.errors import DQError
from dq.nn import QuantLinear
from dq.quant import PerGroup, PerToken, Progressive, QuantSpec, fake_quantize, spec_from_dict, spec_to_dict
from dq.quant.progressive import int8_weight, progressive_codes, progressive_scales

SPEC = QuantSpec("uint4", Progressive(64), symmetric=False)


def weights(seed: int) -> torch.Tensor:
    """Rows of very different ranges, a few outliers, an all-positive and an all-zero group."""
    torch.manual_seed(seed)
    w = torch.randn(64, 256) * torch.logspace(-3, 1, 64).unsqueeze(1)
    w[0, :7] = 50.0
    w[1, :64] = w[1, :64].abs() + 1
    w[2, 64:128] = 0
    return w


@pytest.mark.parametrize("seed,group", [(0, 64), (1, 32), (2, 128)])
def test_int8_operand_is_exact_and_within_two_roundings(seed, group):
    w = weights(seed)
    s1, s2, z = progressive_scales(w, group)
    u = progressive_codes(w, s1, s2, z)
    w8 = int8_weight(u, s2, z)
    assert torch.equal(s1, s1.half().float()) and (s1 > 0).all()
    for t, lo, hi in ((s2, 1, 16), (z, 0, 15), (u, 0, 15)):
        assert torch.equal(t, t.round()) and t.min() >= lo and t.max() <= hi
    assert w8.abs().max() <= 127  # the protective range: INT8 MMA operands
    # Level 1 rounds w / s1 to within 1/2, level 2 the INT8 code to within s2 / 2 (the grid covers the range).
    step = s2.repeat_interleave(group, dim=1)
    assert ((w / s1 - w8).abs() <= 0.5 + step / 2 + 1e-4).all()
    assert torch.equal(w8[2, 64:128], torch.zeros(64))  # an all-zero group stays exactly zero


def test_progressive_is_no_worse_than_symmetric_groups_on_gaussian_weights():
    """Asymmetric groups under integer scales: on Gaussian weights at most 5% above INT4 g64's error."""
    torch.manual_seed(0)
    w = torch.randn(256, 512)
    progressive = ((fake_quantize(w, SPEC) - w).norm() / w.norm()).item()
    g64 = ((fake_quantize(w, QuantSpec("int4", PerGroup(64))) - w).norm() / w.norm()).item()
    assert progressive < 1.05 * g64, (progressive, g64)


def test_spec_rules_and_recipe_form():
    assert spec_from_dict(spec_to_dict(SPEC)) == SPEC
    assert spec_to_dict(SPEC)["granularity"] == "progressive"
    for bad in (dict(format="int4", symmetric=False), dict(format="uint4", symmetric=True)):
        with pytest.raises(DQError, match="progressive"):
            QuantSpec(granularity=Progressive(64), **bad)
    with pytest.raises(DQError, match="group_size"):
        spec_from_dict({"format": "uint4", "granularity": "progressive", "symmetric": False})


def test_deployed_layer_stores_the_format_and_computes_as_simulated():
    torch.manual_seed(0)
    linear = nn.Linear(256, 64)
    linear.weight.data = weights(3)
    layer = QuantLinear.from_float(linear, SPEC, QuantSpec("int8", PerToken()))
    x = torch.randn(9, 256)
    simulated = layer(x)
    layer.deploy()
    state = layer.state_dict()
    assert {k: v.dtype for k, v in state.items() if k != "bias"} == {
        "qweight": torch.uint8, "weight_scale": torch.uint8, "weight_zero": torch.uint8, "weight_channel_scale": torch.float16}
    assert layer.weight_nbytes() == 64 * 128 + 2 * 64 * 4 + 2 * 64
    torch.testing.assert_close(layer(x), simulated, rtol=1e-5, atol=1e-4)
    fresh = QuantLinear(256, 64, True, SPEC, QuantSpec("int8", PerToken()))
    fresh.allocate_deployed()
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), layer(x))
