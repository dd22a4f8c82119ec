"""A wall-clock time budget that plans a run's step count from measured throughput.

The first `skip_steps` steps of each process (allocator growth, `torch.compile`, cold page cache)
are not timed; after them the seconds per step are the mean over every later step *including* the
periodic evaluations and checkpoints, so their amortised cost is planned for. The plan leaves a
reserve for the finishing work (final evaluation or sample grid, exports, last checkpoint): a
fixed fraction of the budget, one step, and 1.5x the longest evaluation plus the longest
checkpoint save seen so far. So that those are known early, the trainers run one evaluation and
one save as soon as timing starts (`probe_due`) when a budget is set.

Time spent by earlier, preempted processes of the same run is carried in checkpoints
(`spent_s`), so a resumed run spends only what is left.
"""

from __future__ import annotations

import math
import time
from typing import Any


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
        reserve_fraction: float = 0.05,
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

    @property
    def enabled(self) -> bool:
        return self.budget_s is not None

    def spent_s(self) -> float:
        return self.spent_before_s + (time.monotonic() - self._t_start)

    def remaining_s(self) -> float:
        assert self.budget_s is not None
        return self.budget_s - self.spent_s()

    def reserve_s(self) -> float:
        assert self.budget_s is not None
        return (
            self.reserve_fraction * self.budget_s
            + (self.seconds_per_step() or 0.0)
            + 1.5 * sum(self.overheads_s.values())
        )

    def note_overhead(self, kind: str, seconds: float, one_off: bool = False) -> None:
        """Record the duration of finishing-like work (`kind` "evaluate" for a sample grid or a
        validation pass, "save" for a checkpoint), so that the final one is reserved for.
        `one_off` work (the probe) is also left out of the seconds per step, which should only
        amortise work that recurs."""
        self.overheads_s[kind] = max(self.overheads_s.get(kind, 0.0), seconds)
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
        self._steps_seen += 1
        if self._steps_seen == self.skip_steps:
            self._t_measure = time.monotonic()

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
        usable = self.remaining_s() - self.reserve_s()
        more = max(0, math.floor(usable / per_step))
        return min(self.max_steps, step + more)

    def out_of_time(self, step: int) -> bool:
        """True when one more step would eat into the finishing reserve."""
        if self.budget_s is None:
            return False
        per_step = self.seconds_per_step() or 0.0
        return self.remaining_s() - self.reserve_s() < per_step

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
        self._t_start = time.monotonic()


def initial_total(max_steps: int, planned: int, step: int, finished: bool, budgeted: bool) -> int:
    """Steps to train up to when a run (re)starts at `step`: none more for a finished run; under
    a budget, the checkpoint's last plan `planned` until throughput is re-measured; otherwise
    `max_steps` (so a changed step count re-plans the schedule's tail on resume)."""
    if finished:
        return step
    return max(step, min(max_steps, planned) if budgeted else max_steps)
