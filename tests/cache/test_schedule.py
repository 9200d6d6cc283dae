import itertools
import math

import pytest
import torch

from dq.cache.schedule import (
    dp_schedule,
    l1_cost_matrix,
    quadratic_schedule,
    schedule_error,
    segment_bounds,
    uniform_schedule,
    validate_refresh_steps,
)
from dq.errors import DQError


def brute_force(cost: torch.Tensor, interval: int) -> float:
    t = cost.shape[0]
    k, lo, hi = segment_bounds(t, interval)
    best = math.inf
    for starts in itertools.combinations(range(1, t), k - 1):
        bounds = (0, *starts, t)
        if all(lo <= b - a <= hi for a, b in zip(bounds[:-1], bounds[1:])):
            best = min(best, schedule_error(cost, bounds[:-1]))
    return best


def test_uniform():
    assert uniform_schedule(10, 3) == (0, 3, 6, 9)
    assert uniform_schedule(5, 1) == (0, 1, 2, 3, 4)
    assert uniform_schedule(6, 2, start=3) == (0, 1, 2, 3, 5)


def test_quadratic_matches_deepcache_reference():
    # DeepCache's sample_from_quad_center(50, 10, center=15, pow=1.4), evaluated with its complex arithmetic.
    assert quadratic_schedule(50, 5, center=15, power=1.4) == (0, 5, 9, 13, 17, 21, 26, 31, 37, 43)
    steps = quadratic_schedule(20, 5, center=15, power=1.4)
    assert len(steps) == 4 and steps[0] == 0 and steps[-1] < 20


@pytest.mark.parametrize("t,n", [(6, 2), (7, 3), (9, 2), (10, 3), (12, 4), (11, 5), (8, 3)])
def test_dp_is_exact_against_brute_force(t, n):
    g = torch.Generator().manual_seed(t * 31 + n)
    feats = torch.randn(t, 16, generator=g).cumsum(0) * torch.rand(t, 1, generator=g)
    cost = l1_cost_matrix(list(feats))
    steps = dp_schedule(cost, n)
    k, lo, hi = segment_bounds(t, n)
    bounds = (*steps, t)
    assert len(steps) == k and steps[0] == 0
    assert all(lo <= b - a <= hi for a, b in zip(bounds[:-1], bounds[1:]))
    assert schedule_error(cost, steps) == pytest.approx(brute_force(cost, n), rel=1e-12, abs=1e-12)


def test_dp_beats_uniform_at_equal_refresh_count():
    g = torch.Generator().manual_seed(0)
    # A trajectory that moves fast early and slowly late: the DP refreshes early more often.
    speed = torch.linspace(3, 0.1, 20).view(20, 1)
    feats = (torch.randn(20, 32, generator=g) * speed).cumsum(0)
    cost = l1_cost_matrix(list(feats))
    uniform = uniform_schedule(20, 4)
    dp = dp_schedule(cost, 4)
    assert len(dp) == len(uniform)
    assert schedule_error(cost, dp) < schedule_error(cost, uniform)
    assert dp[1] < uniform[1]


def test_quantized_cost_uses_reference_features():
    fp = [torch.full((4,), float(i)) for i in range(6)]
    q = [f + 0.5 for f in fp]
    cost = l1_cost_matrix(q, fp)
    assert cost[2, 2] == pytest.approx(0.5)  # quantization error at a refresh step
    assert cost[2, 4] == pytest.approx(1.5)  # |fp_4 - q_2|


def test_bad_inputs():
    with pytest.raises(DQError, match="step 0"):
        validate_refresh_steps([1, 3], 5)
    with pytest.raises(DQError, match="runs 4 steps"):
        validate_refresh_steps([0, 2, 6], 4)
    with pytest.raises(DQError, match="cannot cover"):
        dp_schedule(torch.zeros(10, 10), 3, num_segments=9)
    with pytest.raises(DQError, match="square"):
        dp_schedule(torch.zeros(3, 4), 2)
    with pytest.raises(DQError, match="interval"):
        uniform_schedule(4, 0)
