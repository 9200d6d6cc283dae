"""Kernel schemes: the GPU kernel a deployed layer runs is decided once, from its stored format, at deploy()
and again identically when a checkpoint is loaded; the per-call checks cover only what the call decides."""

import pytest
import torch
from torch import nn

from dq.kernels.dispatch import _runtime_reason
from dq.kernels.scheme import KernelScheme
from dq.nn import QuantLinear, SVDQLinear
from dq.quant import PerChannel, PerGroup, PerTensor, PerToken, Progressive, QuantSpec

W4 = QuantSpec("int4", PerGroup(64))
A8 = QuantSpec("int8", PerToken())
CASES = [
    ("svdquant-w4a4", SVDQLinear, W4, QuantSpec("int4", PerToken(64)), KernelScheme("w4a4", 64)),
    ("w4a8", QuantLinear, W4, A8, KernelScheme("w4a8", 64)),
    ("w4a16", QuantLinear, W4, None, KernelScheme("w4a16", 64)),
    ("w4a8-progressive", QuantLinear, QuantSpec("uint4", Progressive(64), symmetric=False), A8, KernelScheme("w4a8_progressive", 64)),
    ("svdquant-w4a8-progressive", SVDQLinear, QuantSpec("uint4", Progressive(32), symmetric=False), A8, KernelScheme("w4a8_progressive", 32)),
    ("w8a8", QuantLinear, QuantSpec("int8", PerChannel()), A8, KernelScheme("w8a8")),
    ("w8a8-fp8", QuantLinear, QuantSpec("fp8_e4m3", PerChannel()), QuantSpec("fp8_e4m3", PerToken()), KernelScheme("fp8")),
    # A per-channel symmetric INT4 weight is one group of K: the W4 kernels take it.
    ("int4 per channel", QuantLinear, QuantSpec("int4", PerChannel()), A8, KernelScheme("w4a8", 256)),
    # Static activations are quantized by the layer before the kernel, which then sees 16-bit inputs.
    ("w4a8-timestep", QuantLinear, W4, QuantSpec("int8", PerTensor(), symmetric=False), KernelScheme("w4a16", 64)),
]


def deployed(cls, weight_spec, act_spec, in_features=256):
    layer = cls.from_float(nn.Linear(in_features, 48), weight_spec, act_spec)
    if act_spec is not None and act_spec.format and not act_spec.dynamic:
        layer.act_quantizer.scale = torch.ones_like(layer.act_quantizer.scale)
    layer.deploy()
    return layer


@pytest.mark.parametrize("name,cls,weight_spec,act_spec,expected", CASES, ids=[c[0] for c in CASES])
def test_the_scheme_is_decided_at_deploy_and_again_on_load(name, cls, weight_spec, act_spec, expected):
    layer = deployed(cls, weight_spec, act_spec)
    assert layer.kernel_scheme == expected
    fresh = cls.wrap(nn.Linear(256, 48), weight_spec, act_spec)
    fresh.allocate_deployed()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.kernel_scheme == expected


@pytest.mark.parametrize("weight_spec,act_spec,reason", [
    (QuantSpec("int4", PerChannel(), symmetric=False), A8, "asymmetric INT4"),
    (QuantSpec("int4", PerGroup(32)), A8, "group size 32"),
    (W4, QuantSpec("int4", PerToken(32)), "INT4 weights with activations"),
    (QuantSpec("int8", PerGroup(64)), A8, "not symmetric per-channel"),
    (QuantSpec("fp4_e2m1", PerGroup(16), scale_format="fp8_e4m3"), None, "no Triton kernel"),
])
def test_layers_no_kernel_takes_say_why(weight_spec, act_spec, reason):
    scheme = deployed(QuantLinear, weight_spec, act_spec).kernel_scheme
    assert scheme.kernel is None and reason in scheme.reason


def test_the_call_checks_only_what_it_decides():
    assert "dtype torch.float32" in _runtime_reason(torch.zeros(2, 64), KernelScheme("w4a4", 64))
    assert _runtime_reason(torch.zeros(2, 64, dtype=torch.bfloat16), KernelScheme("w4a4", 64)) is None
    assert _runtime_reason(torch.zeros(2, 64, dtype=torch.bfloat16), KernelScheme(None, reason="r")) == "r"
