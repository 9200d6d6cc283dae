"""GPTQ: lower layer-output error than round-to-nearest with the same scales, results on the grid."""

import torch

from dq.calib.gptq import HessianAccumulator, gptq_quantize
from dq.quant import PerGroup, QuantSpec, weight_scales
from dq.quant.storage import expand_groups


def setup(seed=0, n=1024, d=128, out=64):
    g = torch.Generator().manual_seed(seed)
    # Correlated inputs: GPTQ's error feedback helps only when the Hessian is not diagonal.
    mix = torch.randn(d, d, generator=g) / d**0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix
    w = torch.randn(out, d, generator=g)
    spec = QuantSpec("int4", PerGroup(32))
    scale, _ = weight_scales(w, spec)
    s = expand_groups(scale.reshape(out, -1), out, d)
    return x, w, s


def rtn(w, s):
    return torch.clamp(torch.round(w / s), -8, 7) * s


def test_gptq_beats_rtn_on_calibration_inputs():
    x, w, s = setup()
    acc = HessianAccumulator(w.shape[1])
    acc.add(x[:512])
    acc.add(x[512:])
    q = gptq_quantize(w, acc.hessian(), lambda col, j: torch.clamp(torch.round(col / s[:, j]), -8, 7) * s[:, j], blocksize=32)
    err = lambda wq: float((x @ (wq - w).t()).pow(2).mean())
    assert err(q) < 0.8 * err(rtn(w, s))
    # Every value lies on the quantization grid of its fixed scale.
    codes = q / s
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert codes.min() >= -8 - 1e-4 and codes.max() <= 7 + 1e-4


def test_gptq_identity_hessian_is_rtn():
    _, w, s = setup(seed=1)
    q = gptq_quantize(w, torch.eye(w.shape[1]), lambda col, j: torch.clamp(torch.round(col / s[:, j]), -8, 7) * s[:, j])
    torch.testing.assert_close(q, rtn(w, s))
