"""Model partitioners: balanced is optimal (against brute force), uniform/explicit, errors, profiler."""

import itertools
import random

import pytest
import torch
from torch import nn

from lightning_distnn.partition.model import (
    StagePlan,
    balanced,
    explicit,
    make_plan,
    profile_layer_costs,
    uniform,
)
from lightning_distnn.testing.equivalence import tiny_classifier


def brute_force_bottleneck(costs, stages):
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])))
    return best


HAND_MADE = [
    ([1, 1, 1, 1], 2, 2),
    ([4, 1, 1, 1, 1, 4], 2, 6),
    ([10, 1, 1, 1, 1, 1], 2, 10),
    ([1, 2, 3, 4, 5, 6, 7, 8, 9], 3, 17),
    ([5, 5, 5, 1, 1, 1, 1, 1], 4, 5),
    ([3, 1, 4, 1, 5, 9, 2, 6], 4, 9),
    ([2, 2, 2, 2, 2, 2, 2, 2], 8, 2),
]


@pytest.mark.parametrize("costs,stages,expected", HAND_MADE)
def test_balanced_on_hand_made_costs(costs, stages, expected):
    plan = balanced(costs, stages)
    assert plan.bottleneck() == pytest.approx(expected)
    assert plan.bottleneck() == pytest.approx(brute_force_bottleneck(costs, stages))
    assert [i for s in plan.stages for i in s] == list(range(len(costs)))  # contiguous, ordered, complete
    assert all(plan.stages)


def test_balanced_is_optimal_on_random_costs():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        stages = rng.randint(1, n)
        costs = [rng.choice([0.5, 1.0, 2.0, 3.0, rng.random() * 10]) for _ in range(n)]
        plan = balanced(costs, stages)
        assert plan.num_stages == stages and all(plan.stages)
        assert plan.bottleneck() == pytest.approx(brute_force_bottleneck(costs, stages))
        assert plan.bottleneck() <= uniform(n, stages, costs=costs).bottleneck() + 1e-12


def test_uniform_and_explicit():
    assert uniform(8, 3).counts == [3, 3, 2]
    assert uniform(8, 4).stages == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert explicit([3, 5]).stages == [[0, 1, 2], [3, 4, 5, 6, 7]]
    assert make_plan([1, 7], 8, 2).counts == [1, 7]
    assert make_plan("UNIFORM", 8, 2).counts == [4, 4]


def test_plan_prints_as_table():
    plan = balanced([4.0, 1.0, 1.0, 1.0, 1.0, 4.0], 2)
    plan.stage_ranks = [0, 1]
    text = str(plan)
    assert text.splitlines()[0] == "| stage | rank | layers | cost | share |"
    assert "| 0 | 0 | 0-2 | 6 | 0.5 |" in text
    assert isinstance(plan, StagePlan) and plan.stage_costs() == [6.0, 6.0]


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: uniform(3, 4), "4 pipeline stages need at least 4 layers, the model has 3"),
        (lambda: balanced([1.0, 2.0], 3), "at least 3 layers"),
        (lambda: explicit([3, 0]), "positive integer"),
        (lambda: explicit([3, 4], num_layers=8), "must add up to 8"),
        (lambda: make_plan([4, 4], 8, 4), "has 2 stages, but the pipeline has 4"),
        (lambda: make_plan("greedy", 8, 2), "valid: balanced, uniform"),
        (lambda: balanced([1.0, -1.0], 1), "non-negative"),
    ],
)
def test_partition_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_profile_layer_costs_times_every_layer():
    net = tiny_classifier(seed=0).net
    costs = profile_layer_costs(net, torch.randn(4, 3, 16, 16), repeats=2, warmup=1)
    assert len(costs) == len(net) and all(c > 0 for c in costs)
    assert all(p.grad is None for p in net.parameters())
    plan = balanced(costs, 2)
    assert plan.num_layers == len(net)


def test_balanced_weighs_each_cut_by_the_bytes_it_sends():
    from lightning_distnn.partition.model import LinkCost

    costs = [1.0] * 6
    assert balanced(costs, 2).counts == [3, 3]
    # layer 2 outputs a large activation: the cut moves off it, and the table shows the comm share
    plan = balanced(costs, 2, cut_bytes=[1, 1, 100, 1, 1, 1], link=LinkCost(latency_s=0.0, bandwidth_Bps=10.0))
    assert plan.counts != [3, 3] and plan.stages[0][-1] != 2
    assert plan.comm_costs == [pytest.approx(0.2), pytest.approx(0.2)]
    assert plan.bottleneck() == pytest.approx(4.2)
    assert "of which comm" in str(plan)
    # latency alone: a middle stage pays two cuts, the ends one; the plan is optimal against brute force
    link = LinkCost(latency_s=0.5, bandwidth_Bps=1e12)
    three = balanced([1.0, 2.0, 1.0, 3.0, 1.0, 1.0], 3, cut_bytes=[8] * 6, link=link)
    best = min(
        max(sum([1.0, 2.0, 1.0, 3.0, 1.0, 1.0][i:j]) + (1.0 if i > 0 else 0) + (1.0 if j < 6 else 0)
            for i, j in ((0, a), (a, b), (b, 6)))
        for a in range(1, 5) for b in range(a + 1, 6)
    )
    assert three.bottleneck() == pytest.approx(best)
    with pytest.raises(ValueError, match="both"):
        balanced(costs, 2, cut_bytes=[1] * 6)
    with pytest.raises(ValueError, match="bandwidth"):
        LinkCost(latency_s=1e-4, bandwidth_Bps=0)


def test_layer_output_bytes():
    from lightning_distnn.partition.model import layer_output_bytes

    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert layer_output_bytes(net, torch.zeros(3, 4)) == [3 * 8 * 4, 3 * 8 * 4, 3 * 2 * 4]


def test_choose_microbatches_trades_bubble_for_latency():
    from lightning_distnn.parallel.pipeline import choose_microbatches, modelled_step_seconds

    common = dict(schedule="1f1b", pp_size=2, num_stages=2, compute_seconds=0.02)
    free = choose_microbatches(64, message_seconds=0.0, **common)
    cheap = choose_microbatches(64, message_seconds=1e-4, **common)
    dear = choose_microbatches(64, message_seconds=5e-3, **common)
    assert free == 64 and free > cheap > dear >= 2  # 1F1B needs m >= pp
    # the choice is the model's minimum over the counts that divide the batch
    t = {m: modelled_step_seconds(m, schedule="1f1b", pp_size=2, stages_per_rank=1, compute_seconds=0.02,
                                  message_seconds=1e-4) for m in (2, 4, 8, 16, 32, 64)}
    assert cheap == min(t, key=t.get)
    assert choose_microbatches(12, message_seconds=1e-4, max_microbatches=5, **common) in (2, 3, 4)
    with pytest.raises(ValueError, match="compute_seconds"):
        choose_microbatches(8, message_seconds=1e-4, **{**common, "compute_seconds": 0.0})
