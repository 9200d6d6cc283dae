"""GPTQ (Frantar et al., 2022): round a weight column by column, feeding each column's rounding error
back into the columns not yet rounded through the inverse Hessian of the layer-output error.

As in the reference implementation: H = 2/n X^T X from calibration inputs, dead inputs zeroed, damping
`percdamp * mean(diag H)`, the upper Cholesky factor of H^-1, blocks of `blocksize` columns with the
error of a block applied to the rest lazily (one matmul per block). Scales are fixed beforehand (the
min-max scales of the weight quantizer, GPTQ's "static groups"), so the result drops into any
dq weight quantizer and packs like a round-to-nearest weight.
"""

from __future__ import annotations

from typing import Callable

import torch

from dq.errors import DQError


class HessianAccumulator:
    """Running H = 2/n sum x^T x over calibration inputs [.., in] (float64 accumulation)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(self.h.device, torch.float64)
        self.h.addmm_(x.t(), x)
        self.n += x.shape[0]

    def hessian(self) -> torch.Tensor:
        if self.n == 0:
            raise DQError("GPTQ needs calibration inputs for every layer; this layer saw none.")
        return (2.0 / self.n * self.h).float()


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor,
    round_column: Callable[[torch.Tensor, int], torch.Tensor],
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> torch.Tensor:
    """GPTQ-round a weight; returns the fake-quantized (dequantized) weight [out, in] in float32.

    Args:
        w: [out, in] weight.
        hessian: [in, in] H = 2/n X^T X of the layer's inputs.
        round_column: (column [out], column index) -> that column fake-quantized with the fixed scales.
        blocksize: columns per lazy-update block.
        percdamp: damping as a fraction of the mean Hessian diagonal.

    Example:
        >>> acc = HessianAccumulator(w.shape[1]); acc.add(x)
        >>> wq = gptq_quantize(w, acc.hessian(), lambda col, j: torch.round(col / s[:, j]) * s[:, j])
    """
    w = w.detach().float().clone()
    h = hessian.detach().float().clone()
    cols = w.shape[1]
    if h.shape != (cols, cols):
        raise DQError(f"GPTQ Hessian has shape {list(h.shape)}; the weight has {cols} input columns.")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    damp = percdamp * torch.mean(torch.diag(h))
    h += damp * torch.eye(cols, device=h.device)
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except torch.linalg.LinAlgError:
        raise DQError("GPTQ: the damped Hessian is not positive definite; raise `gptq_damp` in the recipe options.") from None
    q = torch.zeros_like(w)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            d = hinv1[i, i]
            qcol = round_column(col, i1 + i)
            q[:, i1 + i] = qcol
            e = (col - qcol) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return q
