"""A wall-clock time budget that plans a run's step count from measured throughput.

The first `skip_steps` steps of each process (allocator growth, `torch.compile`, cold page cache)
are not timed; after them the seconds per step are the mean over every later step *including* the
periodic evaluations and checkpoints, so their amortised cost is planned for. So that those are
known early, the trainers run one evaluation and one save as soon as timing starts (`probe_due`)
when a budget is set.

The budget is a hard bound on the whole call, exports included, so the reserve kept for the
finishing work (final evaluation or sample grid, exports, last checkpoint) is sized from what this
process has measured rather than from a guess:

- the *slowest* recent step, not the mean one, decides whether one more step still fits;
- the finishing work is reserved at the longest evaluation plus the longest save seen so far,
  times the `slowdown`: how much slower the slow recent steps (90th percentile) were than the
  median one. On a quiet machine that is the floor of 1.5x; when another process takes a core,
  steps (and so the finishing work) stall by 2-10x, and the reserve grows with the stalls seen;
- plus a small fixed share of the budget.

Each result reports the reserve planned and the finishing time actually spent
(`budget_reserve_s`, `budget_finish_s`), so the margin stays measured.

Time spent by earlier, preempted processes of the same run is carried in checkpoints
(`spent_s`), so a resumed run spends only what is left.
"""

from __future__ import annotations

import math
import statistics
import time
from collections import deque
from typing import Any

# The reserve's multiplier on the measured finishing work: at least this, at most the cap, and in
# between the 90th-percentile recent step over the median one (see the module docstring). In 16
# loaded runs (benchmarks/under_load.py) finishing took at most 0.2x the reserve so planned.
MIN_SLOWDOWN = 1.5
MAX_SLOWDOWN = 4.0
# Recent step durations kept for the slowest-step and slowdown estimates.
STEP_WINDOW = 64


class TimeBudget:
    """Plans `total_steps` so that training plus finishing fits in `minutes` of wall clock.

    Args:
        minutes: the budget, > 0; None means "no budget" (the plan is always `max_steps`).
        max_steps: upper bound on the plan (the config's `steps`).
        skip_steps: steps of this process excluded from the throughput measurement, >= 1.
        reserve_fraction: share of the budget kept for finishing work, in [0, 0.5].
    """

    def __init__(
        self,
        minutes: float | None,
        max_steps: int,
        skip_steps: int = 3,
        reserve_fraction: float = 0.03,
    ) -> None:
        if skip_steps < 1:
            raise ValueError(f"skip_steps must be >= 1, got {skip_steps}")
        self.budget_s = None if minutes is None else float(minutes) * 60.0
        self.max_steps = max_steps
        self.skip_steps = skip_steps
        self.reserve_fraction = reserve_fraction
        self.spent_before_s = 0.0  # by earlier processes of this run
        self.overheads_s: dict[str, float] = {}  # longest duration per kind of finishing work
        self._probed = False
        self._excluded_s = 0.0
        self._t_start = time.monotonic()
        self._steps_seen = 0
        self._t_measure: float | None = None
        self._t_last_step = self._t_start
        self._overhead_since_step = 0.0
        self._durations: deque[float] = deque(maxlen=STEP_WINDOW)  # net of evaluations/saves
        self.last_step_s: float | None = None  # the latest timed step's duration, net likewise

    @property
    def enabled(self) -> bool:
        return self.budget_s is not None

    def spent_s(self) -> float:
        return self.spent_before_s + (time.monotonic() - self._t_start)

    def remaining_s(self) -> float:
        assert self.budget_s is not None
        return self.budget_s - self.spent_s()

    def slowest_step_s(self) -> float:
        """The slowest of the recent timed steps (evaluations and saves left out); 0 before any."""
        return max(self._durations, default=0.0)

    def slowdown(self) -> float:
        """How much slower than the median the slow recent steps are: the 90th percentile step
        over the median one, in [MIN_SLOWDOWN, MAX_SLOWDOWN]. A percentile, not the maximum: one
        stalled 50 ms step says little about a 1 s export, a tenth of the steps stalling does."""
        if len(self._durations) < 2:
            return MIN_SLOWDOWN
        ordered = sorted(self._durations)
        median = statistics.median(ordered)
        p90 = ordered[min(len(ordered) - 1, math.ceil(0.9 * len(ordered)) - 1)]
        ratio = p90 / median if median > 0 else MAX_SLOWDOWN
        return min(MAX_SLOWDOWN, max(MIN_SLOWDOWN, ratio))

    def reserve_s(self) -> float:
        """Seconds kept for the finishing work: see the module docstring."""
        assert self.budget_s is not None
        return (
            self.reserve_fraction * self.budget_s
            + self.slowest_step_s()
            + self.slowdown() * sum(self.overheads_s.values())
        )

    def note_overhead(self, kind: str, seconds: float, one_off: bool = False) -> None:
        """Record the duration of finishing-like work (`kind` "evaluate" for a sample grid or a
        validation pass, "save" for a checkpoint), so that the final one is reserved for.
        `one_off` work (the probe) is also left out of the seconds per step, which should only
        amortise work that recurs."""
        self.overheads_s[kind] = max(self.overheads_s.get(kind, 0.0), seconds)
        self._overhead_since_step += seconds
        if one_off:
            self._excluded_s += seconds

    def probe_due(self) -> bool:
        """True once per process, when a budget is set and timing has just started: the moment
        to run (and time) one evaluation and one checkpoint save."""
        if self.budget_s is None or self._probed or self._t_measure is None:
            return False
        self._probed = True
        return True

    def step_done(self, step: int) -> None:
        """Call after each optimizer step; `step` = number of updates applied so far."""
        now = time.monotonic()
        self._steps_seen += 1
        self.last_step_s = None
        if self._steps_seen > self.skip_steps:
            self.last_step_s = max(0.0, now - self._t_last_step - self._overhead_since_step)
            self._durations.append(self.last_step_s)
        if self._steps_seen == self.skip_steps:
            self._t_measure = now
        self._t_last_step = now
        self._overhead_since_step = 0.0

    def seconds_per_step(self) -> float | None:
        if self._t_measure is None:
            return None
        measured = self._steps_seen - self.skip_steps
        if measured < 1:
            return None
        return (time.monotonic() - self._t_measure - self._excluded_s) / measured

    def planned_total(self, step: int) -> int:
        """The step count to aim for, given that `step` updates are done; in [step, max_steps]."""
        if self.budget_s is None:
            return self.max_steps
        per_step = self.seconds_per_step()
        if per_step is None:
            return self.max_steps
        # The same test as `out_of_time` (the next step may be as slow as the slowest recent one),
        # so that the plan ends exactly where the run will stop and the LR decays to its floor.
        spare = self.remaining_s() - self.reserve_s() - self.slowest_step_s()
        more = 0 if spare < 0 else 1 + math.floor(spare / per_step)
        return min(self.max_steps, step + more)

    def out_of_time(self, step: int) -> bool:
        """True when one more step, as slow as the slowest recent one, would eat into the
        finishing reserve."""
        if self.budget_s is None:
            return False
        return self.remaining_s() - self.reserve_s() < self.slowest_step_s()

    def checkpoint_minutes(self, minutes: float) -> float:
        """The checkpoint interval under this budget: a preempted budgeted run should lose at
        most a quarter of its budget, whatever the configured interval."""
        if self.budget_s is None:
            return minutes
        return min(minutes, self.budget_s / 60.0 / 4)

    def state_dict(self) -> dict[str, Any]:
        return {"spent_s": self.spent_s(), "overheads_s": dict(self.overheads_s)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.spent_before_s = float(state["spent_s"])
        self.overheads_s = {k: float(v) for k, v in state["overheads_s"].items()}
        # The clock keeps running from this process's start: loading data and building the model
        # before the resume count too.


def initial_total(max_steps: int, planned: int, step: int, finished: bool, budgeted: bool) -> int:
    """Steps to train up to when a run (re)starts at `step`: none more for a finished run; under
    a budget, the checkpoint's last plan `planned` until throughput is re-measured; otherwise
    `max_steps` (so a changed step count re-plans the schedule's tail on resume)."""
    if finished:
        return step
    return max(step, min(max_steps, planned) if budgeted else max_steps)
