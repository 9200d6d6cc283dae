"""Refresh schedules: which denoising steps recompute the cached feature.

A schedule is a sorted tuple of step indices (0-based, in denoising order) at which the full model runs
and the cache is refreshed; every other step reuses the cached feature. Three families:

- uniform (DeepCache, FORA): every N-th step, `(step - start) % N == 0`.
- quadratic (DeepCache non-uniform): denser refreshes around a center step, as DeepCache's
  `sample_from_quad_center` computes them (N=5, center=15, pow=1.4 in the reference).
- dp (CacheQuant DPS): from the cached feature's trajectory, K = ceil(T/N) segments chosen by dynamic
  programming to minimise the summed L1 error of reusing each segment's first feature.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from dq.errors import DQError


def uniform_schedule(num_steps: int, interval: int, start: int = 0) -> tuple[int, ...]:
    """Refresh every `interval` steps from `start`; the steps before `start` all refresh.

    Example:
        >>> uniform_schedule(10, 3)
        (0, 3, 6, 9)
    """
    _check_steps(num_steps, interval)
    return tuple(s for s in range(num_steps) if s < start or (s - start) % interval == 0)


def quadratic_schedule(num_steps: int, interval: int, center: int = 15, power: float = 1.4) -> tuple[int, ...]:
    """DeepCache's non-uniform schedule: ceil(T/N) refresh steps packed quadratically around `center`.

    Follows DeepCache's `sample_from_quad_center`, including its arithmetic: `(-center) ** (1/pow)` is taken
    in the complex plane and truncated to its real part, and `pow` is lowered by 0.02 until the steps are distinct.

    Example:
        >>> quadratic_schedule(50, 5, center=15, power=1.4)
        (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    """
    _check_steps(num_steps, interval)
    n_samples = math.ceil(num_steps / interval)
    if n_samples <= 1:
        return (0,)
    pw = power
    while pw > 1:
        lo = complex(-center) ** (1 / pw)
        hi = complex(num_steps - center) ** (1 / pw)
        x = np.linspace(lo, hi, n_samples + 1) ** pw
        # np.int32 of a complex keeps the real part (truncated toward zero), as the reference does.
        values = np.unique(np.trunc(x.real).astype(np.int64))
        steps = [0] + [int(v) + center for v in values[1:-1]]
        if len(steps) == n_samples and all(0 <= s < num_steps for s in steps):
            return tuple(sorted(set(steps)))
        pw -= 0.02
    raise DQError(
        f"quadratic schedule: found no power <= {power} giving {n_samples} distinct refresh steps in {num_steps} "
        f"steps around center {center}; lower the interval or move the center inside [0, {num_steps})."
    )


def segment_bounds(num_steps: int, interval: int) -> tuple[int, int, int]:
    """(K, min_len, max_len) of CacheQuant's DP: K = ceil(T/N) segments of length in [ceil(N/2), 2N].

    The bounds are widened only where no K-segment split of T could satisfy them (tiny T).
    """
    _check_steps(num_steps, interval)
    k = math.ceil(num_steps / interval)
    lo = min(math.ceil(interval / 2), num_steps // k)
    hi = max(2 * interval, math.ceil(num_steps / k))
    return k, lo, hi


def segment_costs(cost: torch.Tensor) -> torch.Tensor:
    """S[j, n] = sum_{i=j}^{n-1} cost[j, i]: error of one segment [j, n) refreshed at j (n in 0..T)."""
    t = cost.shape[0]
    cum = torch.zeros(t, t + 1, dtype=torch.float64)
    cum[:, 1:] = torch.cumsum(cost.double(), dim=1)
    return cum - cum[:, :].gather(1, torch.arange(t).view(t, 1)).expand(t, t + 1)


def dp_schedule(cost: torch.Tensor, interval: int, num_segments: int | None = None) -> tuple[int, ...]:
    """CacheQuant's dynamic-programming schedule (DPS): refresh steps minimising the total reuse error.

    Args:
        cost: [T, T] matrix, cost[j, i] = error of using the feature refreshed at step j at step i
            (e.g. ||F_i - F_j||_1; under quantization ||F_i^fp - F_j^q||_1). Only j <= i is read.
        interval: the nominal cache interval N; segments have length in [ceil(N/2), 2N].
        num_segments: K, the number of refresh steps (default ceil(T/N)).

    Returns the K segment starts (step 0 always). Solves L[n, k] = min_j L[j, k-1] + S[j, n] exactly.

    Example:
        >>> F = torch.randn(20, 8).cumsum(0)
        >>> dp_schedule(torch.cdist(F, F, p=1), interval=4)   # 5 refresh steps
    """
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise DQError(f"dp_schedule: cost must be a square [T, T] matrix, got shape {tuple(cost.shape)}.")
    t = cost.shape[0]
    k_default, lo, hi = segment_bounds(t, interval)
    k = num_segments or k_default
    if not (k * lo <= t <= k * hi):
        raise DQError(
            f"dp_schedule: {k} segments of length {lo}..{hi} cannot cover {t} steps; choose num_segments "
            f"between {math.ceil(t / hi)} and {t // lo}."
        )
    seg = segment_costs(cost)
    inf = float("inf")
    best = torch.full((t + 1, k + 1), inf, dtype=torch.float64)
    arg = torch.full((t + 1, k + 1), -1, dtype=torch.long)
    best[0, 0] = 0.0
    for kk in range(1, k + 1):
        for n in range(kk * lo, min(t, kk * hi) + 1):
            j_lo, j_hi = max((kk - 1) * lo, n - hi), n - lo
            if j_hi < j_lo:
                continue
            js = torch.arange(j_lo, j_hi + 1)
            vals = best[js, kk - 1] + seg[js.clamp(max=t - 1), n]
            i = int(torch.argmin(vals))
            if vals[i] < best[n, kk]:
                best[n, kk], arg[n, kk] = vals[i], js[i]
    if not math.isfinite(best[t, k]):
        raise DQError(f"dp_schedule: no feasible split of {t} steps into {k} segments of length {lo}..{hi}.")
    starts, n = [], t
    for kk in range(k, 0, -1):
        n = int(arg[n, kk])
        starts.append(n)
    return tuple(sorted(starts))


def schedule_error(cost: torch.Tensor, refresh_steps: Sequence[int]) -> float:
    """Total reuse error of a schedule: sum over steps i of cost[last refresh <= i, i]."""
    steps = sorted(refresh_steps)
    if not steps or steps[0] != 0:
        raise DQError(f"a schedule must refresh at step 0, got {list(steps)}.")
    bounds = steps + [cost.shape[0]]
    seg = segment_costs(cost)
    return float(sum(seg[a, b] for a, b in zip(bounds[:-1], bounds[1:])))


def l1_cost_matrix(features: Sequence[torch.Tensor], reference: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """cost[j, i] = ||F_i^ref - F_j||_1 (mean absolute error) from per-step features.

    `features` are the features the cache would store (the quantized model's, if quantized); `reference`
    the ones the model should see (FP); None uses `features` for both, CacheQuant's FP-only cost.
    """
    reference = features if reference is None else reference
    if len(reference) != len(features):
        raise DQError(f"l1_cost_matrix: {len(features)} features vs {len(reference)} reference steps.")
    f = torch.stack([x.reshape(-1).double() for x in features])
    r = torch.stack([x.reshape(-1).double() for x in reference])
    return torch.cdist(f, r, p=1) / f.shape[1]


def validate_refresh_steps(refresh_steps: Sequence[int], num_steps: int) -> tuple[int, ...]:
    """Sorted refresh steps, checked against the step count; raises DQError on a step >= T or no step 0."""
    steps = tuple(sorted(set(int(s) for s in refresh_steps)))
    if not steps or steps[0] != 0:
        raise DQError(f"a cache schedule must refresh at step 0 (nothing is cached before it), got {list(steps)}.")
    if steps[-1] >= num_steps:
        raise DQError(
            f"the cache schedule refreshes at step {steps[-1]} but the pipeline runs {num_steps} steps "
            f"(steps 0..{num_steps - 1}); recompute the schedule for num_inference_steps={num_steps}."
        )
    return steps


def _check_steps(num_steps: int, interval: int) -> None:
    if num_steps < 1:
        raise DQError(f"a cache schedule needs at least one denoising step, got {num_steps}.")
    if interval < 1:
        raise DQError(f"the cache interval must be >= 1 (1 = no caching), got {interval}.")
