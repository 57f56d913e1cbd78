"""The dynamic batch controller: shares follow speeds, bounds and globalBatch hold,
and the weighted update is the full-batch mean."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from dtj_trainer.balancer import Balancer, allocate, gradient_scales
from dtj_trainer.config import BatchingSpec


def spec(**kw: int) -> BatchingSpec:
    return BatchingSpec.model_validate({"dynamic": True, **kw})


def test_shares_follow_measured_speeds_damping_noise_and_taking_real_changes_whole():
    bal = Balancer(spec(globalBatch=120, minPerWorker=1), beta=0.5)
    assert bal.start([1, 1, 1, 1]) == [30, 30, 30, 30]
    # Worker 0 is 3x faster: the first measurement replaces the hints outright...
    assert bal.replan([3.0, 1.0, 1.0, 1.0]) == [60, 20, 20, 20]
    # ... a small change (noise: 0.464 against 0.5 of the samples) is damped, halfway...
    assert bal.replan([2.6, 1.0, 1.0, 1.0])[0] == 58
    for _ in range(12):
        plan = bal.replan([2.6, 1.0, 1.0, 1.0])
    assert plan[0] == 56
    # ... and a real one (worker 0 slowed down 2.6x) is taken at once.
    assert bal.replan([1.0, 1.0, 1.0, 1.0]) == [30, 30, 30, 30]


def test_hints_seed_the_first_plan_and_unmeasured_members_keep_their_share():
    bal = Balancer(spec(perWorker=32, minPerWorker=1))
    assert bal.start([2.0, 1.0, 1.0]) == [48, 24, 24]
    # Member 2 has not measured yet (a joiner): it keeps its share, the others move.
    plan = bal.replan([4.0, 1.0, 0.0])
    assert plan[2] == 24 and plan[0] > 48 and sum(plan) == 96


@pytest.mark.parametrize("seed", range(20))
def test_bounds_and_the_global_batch_hold(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    low, high = rng.randint(1, 8), rng.randint(16, 64)
    total = rng.randint(n * low, n * high)
    speeds = [rng.uniform(0.05, 10) for _ in range(n)]
    out = allocate(speeds, total, low, high)
    assert sum(out) == total
    assert all(low <= b <= high for b in out)
    # Order follows speed (ties aside): a faster worker never gets a smaller batch.
    for i in range(n):
        for j in range(n):
            if speeds[i] > speeds[j]:
                assert out[i] >= out[j]


def test_an_unreachable_global_batch_gives_the_nearest_the_bounds_allow():
    assert allocate([1, 1], 1000, 4, 100) == [100, 100]
    assert allocate([100, 1], 2, 4, 100) == [4, 4]


def test_the_weighted_average_of_the_workers_gradients_is_the_full_batch_gradient():
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    x, y = torch.randn(100, 5), torch.randint(0, 3, (100,))
    batches = allocate([5.0, 1.0, 2.5, 1.5], 100, 1, 100)
    assert len(set(batches)) > 1

    def grad(xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(xs), ys).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    bounds = torch.tensor([0, *batches]).cumsum(0).tolist()
    local = [grad(x[a:b], y[a:b]) for a, b in itertools.pairwise(bounds)]
    scales = gradient_scales(batches)
    averaged = sum(s * g for s, g in zip(scales, local, strict=True)) / len(local)
    full = grad(x, y)
    assert torch.allclose(averaged, full, atol=1e-6)
    # The reference code's mistake: averaging p_i g_i divides the step by n again.
    shares = [b / sum(batches) for b in batches]
    buggy = sum(p * g for p, g in zip(shares, local, strict=True)) / len(local)
    assert torch.allclose(buggy * len(local), full, atol=1e-6)
    assert not torch.allclose(buggy, full, atol=1e-3)


def test_speed_is_an_average_of_compute_time_per_sample():
    bal = Balancer(spec(), smoothing=0.5)
    assert bal.speed() == 0.0
    bal.observe(0.5, 50)  # 0.01 s/sample
    assert bal.speed() == pytest.approx(100.0)
    bal.observe(0.12, 10)  # 0.012 s/sample, within noise: EMA 0.011
    assert bal.speed() == pytest.approx(1 / 0.011)
    bal.observe(0.3, 10)  # 0.03 s/sample: a real change, taken whole
    assert bal.speed() == pytest.approx(1 / 0.03)
