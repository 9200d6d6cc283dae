"""Low-rank outlier absorption (SVDQuant): W ~= L1 L2 + R, with L1 L2 kept in 16 bits and only R quantized.

The best rank-r approximation of W in the Frobenius norm is its truncated SVD (Eckart-Young):
L1 = U_r S_r ([out, r], the branch's up-projection) and L2 = V_r^T ([r, in], the down-projection).
Randomized SVD (Halko et al., torch.svd_lowrank) is the fast default; exact SVD (torch.linalg.svd in
float64, as deepcompressor does) is the option. `refine_low_rank` re-fits L to what quantization
leaves behind: L <- SVD_r(W - Q(W - L)), deepcompressor's iterative low-rank calibration.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable

import torch

from dq.errors import DQError


class SVDMethod(str, Enum):
    """How the truncated SVD is computed."""

    RANDOMIZED = "randomized"
    """torch.svd_lowrank with a fixed-seed sketch (Halko et al.), in float32."""
    EXACT = "exact"
    """torch.linalg.svd in float64."""


@dataclass
class LowRank:
    """A rank-r factorization: `up` [out, r] (U_r S_r) and `down` [r, in] (V_r^T)."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def product(self) -> torch.Tensor:
        """up @ down, [out, in] in float32."""
        return self.up.float() @ self.down.float()

    def residual(self, w: torch.Tensor) -> torch.Tensor:
        """w - up @ down in float32, in one pass over w."""
        if self.rank == 0:
            return w.float().clone()
        return torch.addmm(w.float(), self.up.float(), self.down.float(), alpha=-1)


def check_rank(rank: int, out_features: int, in_features: int, name: str = "layer") -> None:
    """DQError unless 0 <= rank <= min(out, in)."""
    if not isinstance(rank, int) or rank < 0:
        raise DQError(f"{name}: low-rank rank must be a non-negative integer, got {rank!r}.")
    if rank > min(out_features, in_features):
        raise DQError(
            f"{name}: rank {rank} exceeds the layer size [{out_features}, {in_features}] "
            f"(at most {min(out_features, in_features)}); lower `rank` in the recipe options."
        )


def low_rank(w: torch.Tensor, rank: int, method: SVDMethod = SVDMethod.RANDOMIZED, niter: int = 4, seed: int = 0) -> LowRank:
    """The truncated SVD of a 2-D weight, rank `rank`, split as up = U_r S_r and down = V_r^T.

    Args:
        w: [out, in] weight (any float dtype; computed in float32, float64 for `exact`).
        rank: r; 0 gives empty factors.
        method: randomized (torch.svd_lowrank with `niter` power iterations) or exact.
        niter: subspace (power) iterations of the randomized SVD; 4 makes its error within a few
            percent of the optimum for the spectra of diffusion weights.
        seed: the randomized SVD's Gaussian test matrix is drawn from this seed (reproducible).

    Example:
        >>> lr = low_rank(torch.randn(256, 128), rank=32)
        >>> residual = lr.residual(w)
    """
    out_f, in_f = w.shape
    check_rank(rank, out_f, in_f)
    if method not in [m.value for m in SVDMethod]:
        raise DQError(f"unknown SVD method {method!r}; allowed: {', '.join(m.value for m in SVDMethod)}.")
    if rank == 0:
        return LowRank(w.new_zeros(out_f, 0, dtype=torch.float32), w.new_zeros(0, in_f, dtype=torch.float32))
    if method == SVDMethod.EXACT or rank * 2 >= min(out_f, in_f):
        # Exact SVD in float64; also used when the randomized sketch would cover most of the spectrum.
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        return LowRank((u[:, :rank] * s[:rank]).float(), vh[:rank].float())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Oversampling q = r + 10 as Halko et al. recommend; svd_lowrank returns V, not V^T.
        u, s, v = torch.svd_lowrank(w.float(), q=min(rank + 10, min(out_f, in_f)), niter=niter)
    return LowRank((u[:, :rank] * s[:rank]).contiguous(), v[:, :rank].t().contiguous())


def refine_low_rank(
    w: torch.Tensor,
    lowrank: LowRank,
    quantize: Callable[[torch.Tensor], torch.Tensor],
    iterations: int,
    method: SVDMethod = SVDMethod.RANDOMIZED,
    niter: int = 4,
) -> LowRank:
    """Re-fit the low-rank part so that L + Q(W - L) approximates W: L <- SVD_r(W - Q(W - L)).

    Keeps the iterate with the smallest ||W - L - Q(W - L)||_F (the first one included), so the result
    is never worse than the plain SVD.

    Args:
        w: [out, in] weight the branch and quantized residual must add up to.
        lowrank: starting factors (usually `low_rank(w, r)`).
        quantize: fake-quantizes a residual (same shape) as the layer will.
        iterations: number of re-fits (deepcompressor allows up to 100; 2-5 capture most of the gain).
    """
    w = w.float()

    def error(lr: LowRank) -> float:
        r = lr.residual(w)
        return float((r - quantize(r)).pow(2).sum())

    best, best_err = lowrank, error(lowrank)
    current = lowrank
    for _ in range(iterations):
        r = current.residual(w)
        current = low_rank(w - quantize(r), lowrank.rank, method=method, niter=niter)
        err = error(current)
        if err < best_err:
            best, best_err = current, err
    return best


def shared_low_rank(weights: list[torch.Tensor], rank: int, method: SVDMethod = SVDMethod.RANDOMIZED, niter: int = 4) -> list[LowRank]:
    """One SVD of layers that read the same input (q, k, v): a shared `down` (V_r^T), per-layer `up` rows.

    The rows of the stacked weight [sum(out), in] split back into each layer's `up`, so the layers can
    run one down-projection of their common input.
    """
    stacked = torch.cat([w.float() for w in weights], dim=0)
    lr = low_rank(stacked, rank, method=method, niter=niter)
    ups = torch.split(lr.up, [w.shape[0] for w in weights], dim=0)
    return [LowRank(up.contiguous(), lr.down) for up in ups]
