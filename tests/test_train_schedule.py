"""Warm-up + cosine LR schedule and the time budget that plans the step count."""

from __future__ import annotations

import itertools
import math
import time

import pytest
import torch

from tasks.training.budget import MAX_SLOWDOWN, TimeBudget, initial_total
from tasks.training.schedule import WarmupCosine


def _optimizer() -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def test_warmup_then_cosine_to_the_floor():
    opt = _optimizer()
    sched = WarmupCosine(opt, base_lr=1e-3, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = [sched.apply(s) for s in range(20)]
    assert lrs[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert lrs[4] == pytest.approx(1e-3)
    assert lrs[9] == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in itertools.pairwise(lrs[4:]))
    assert lrs[14:] == pytest.approx([1e-4] * 6)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    sched.set_total_steps(24)  # a budget re-plan stretches the decay
    assert sched.lr_at(14) == pytest.approx(1e-4 + 0.9e-3 * 0.5)
    clone = WarmupCosine(_optimizer(), 1.0, 0, 1)
    clone.load_state_dict(sched.state_dict())
    assert [clone.lr_at(s) for s in range(30)] == [sched.lr_at(s) for s in range(30)]


def test_bad_schedule_is_refused():
    with pytest.raises(ValueError, match="base_lr"):
        WarmupCosine(_optimizer(), base_lr=0.0, warmup_steps=1, total_steps=1)
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(_optimizer(), base_lr=1.0, warmup_steps=1, total_steps=0)


def test_budget_plans_from_measured_steps_and_stops_in_time():
    budget = TimeBudget(minutes=1.2 / 60, max_steps=10_000, skip_steps=2, reserve_fraction=0.1)
    assert budget.planned_total(0) == 10_000  # nothing measured yet
    step, plans = 0, []
    t0 = time.monotonic()
    while not budget.out_of_time(step):
        time.sleep(0.05)
        step += 1
        budget.step_done(step)
        plans.append(budget.planned_total(step))
    elapsed = time.monotonic() - t0
    assert elapsed <= 1.2 - 0.1 * 1.2 + 0.05  # the reserve is left for finishing work
    assert 10 <= step <= 22
    assert abs(plans[-1] - step) <= 2  # the plan converged on where it stopped
    assert 10 <= plans[3] <= 25  # after two measured steps it already knew roughly


def test_stalled_steps_widen_the_reserve_they_measured():
    budget = TimeBudget(minutes=1.0, max_steps=10_000, skip_steps=1, reserve_fraction=0.0)
    for step in range(1, 20):
        time.sleep(0.01)
        budget.step_done(step)
    budget.note_overhead("evaluate", 0.5)  # left out of the step durations
    budget.step_done(20)
    assert budget.slowest_step_s() < 0.25
    quiet = budget.reserve_s()
    # One stalled step: the next step must still fit, but one stall says little about the
    # finishing work, so the multiplier on it stays where it was.
    time.sleep(0.3)
    budget.step_done(21)
    assert budget.slowest_step_s() >= 0.3
    assert budget.slowdown() < MAX_SLOWDOWN
    # Another process takes the core for a while: many steps stall, and the reserve follows.
    for step in range(22, 26):
        time.sleep(0.3)
        budget.step_done(step)
    assert budget.slowdown() == MAX_SLOWDOWN  # ~0.3 s against a ~0.01 s median, capped
    assert budget.reserve_s() >= 0.3 + MAX_SLOWDOWN * 0.5 > quiet
    # One more step is refused once it would not fit, slowest step and reserve together.
    budget.spent_before_s = 60.0 - budget.reserve_s() - 0.25
    assert budget.out_of_time(25)


def test_budget_carries_spent_time_across_processes():
    first = TimeBudget(minutes=1.0, max_steps=100)
    state = first.state_dict()
    state["spent_s"] = 59.5
    second = TimeBudget(minutes=1.0, max_steps=100)
    second.load_state_dict(state)
    assert second.out_of_time(0)
    assert second.checkpoint_minutes(10.0) == 0.25
    assert TimeBudget(None, 100).planned_total(5) == 100
    assert not TimeBudget(None, 100).out_of_time(5)


def test_initial_total():
    assert initial_total(100, 100, 0, finished=False, budgeted=False) == 100
    assert initial_total(200, 100, 100, finished=False, budgeted=False) == 200  # more steps
    assert initial_total(200, 100, 100, finished=True, budgeted=False) == 100
    assert initial_total(10_000, 420, 50, finished=False, budgeted=True) == 420
