"""Low-rank absorption: SVD optimality of the residual, randomized vs exact, refinement, shared down-projection."""

import pytest
import torch

from dq.quant.lowrank import low_rank, refine_low_rank, shared_low_rank
from dq.errors import DQError
from dq.quant import PerGroup, QuantSpec, fake_quantize


def decaying(out=192, inp=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out, inp, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g))
    s = torch.logspace(1, -2, inp)
    return (u * s) @ v.t(), s


@pytest.mark.parametrize("method", ["exact", "randomized"])
def test_residual_matches_svd_optimum(method):
    w, s = decaying()
    r = 16
    lr = low_rank(w, r, method=method)
    err = float((w - lr.product()).pow(2).sum())
    optimum = float(s[r:].pow(2).sum())  # Eckart-Young: the tail of the spectrum
    assert err >= optimum * (1 - 1e-4)
    assert err <= optimum * (1.0001 if method == "exact" else 1.05)
    assert lr.up.shape == (192, r) and lr.down.shape == (r, 128)


def test_rank_checks():
    w = torch.randn(32, 48)
    with pytest.raises(DQError, match="exceeds the layer size"):
        low_rank(w, 33)
    with pytest.raises(DQError, match="unknown SVD method"):
        low_rank(w, 4, method="qr")
    assert low_rank(w, 0).product().abs().sum() == 0


def test_refinement_never_worse():
    w, _ = decaying(seed=1)
    w[:, 5] *= 30  # an outlier input channel: what the branch should absorb
    spec = QuantSpec("int4", PerGroup(64))
    q = lambda t: fake_quantize(t, spec)
    lr = low_rank(w, 8)
    before = float((w - lr.product() - q(w - lr.product())).pow(2).sum())
    refined = refine_low_rank(w, lr, q, iterations=4)
    after = float((w - refined.product() - q(w - refined.product())).pow(2).sum())
    assert after <= before


def test_shared_down_projection():
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(64, 96, generator=g) for _ in range(3)]
    parts = shared_low_rank(ws, 8, method="exact")
    assert all(p.down is parts[0].down for p in parts)
    stacked = torch.cat(ws)
    joint = low_rank(stacked, 8, method="exact")
    torch.testing.assert_close(torch.cat([p.product() for p in parts]), joint.product(), rtol=1e-4, atol=1e-4)
