"""An intra-op thread count that follows CPU contention, for budgeted CPU trainings.

torch's OpenMP threads spin-wait at every barrier. When another process takes one of the cores,
the spinning thread burns the time slice its partner needs: on a 2-core machine the `cpu-small`
DiT step fell to 28 % of its quiet speed with 2 threads, while 1 thread kept 93 % (Intel Xeon
AVX-512, `benchmarks/bench_contention.py`, docs/benchmarks.md). A passive wait policy keeps the
speed under contention but loses two thirds of it on a quiet machine, so it is not used.

`AdaptiveThreads` therefore measures instead of guessing: it times a few steps at each candidate
count (all threads, one thread), keeps the faster, and re-measures every `period` steps, or at once
when the kept setting's steps get `SLOWER`x slower than they were when it was chosen.

It is used only under a time budget, where the step count already depends on the clock; an
unbudgeted run keeps one thread count, so that it stays reproducible.
"""

from __future__ import annotations

import statistics
from collections import deque

import torch

# A kept setting whose recent median step is this much slower than when it was chosen is
# re-measured at once (another process has probably started or stopped).
SLOWER = 1.5


class AdaptiveThreads:
    """Chooses torch's intra-op thread count from measured step times.

    Args:
        max_threads: the thread count for a quiet machine (torch's default); >= 1. With 1 there
            is nothing to choose and `step_done` does nothing.
        trial: steps timed per candidate in a trial (after one warm-up step each), >= 1.
        period: steps between re-trials while nothing changes, >= 1.

    Attributes:
        threads: the count in force now.
        chosen: (threads, median step seconds per candidate) of each finished trial, in order.
    """

    def __init__(self, max_threads: int, trial: int = 5, period: int = 200) -> None:
        if max_threads < 1 or trial < 1 or period < 1:
            raise ValueError(
                f"max_threads={max_threads}, trial={trial}, period={period} must all be >= 1"
            )
        self.candidates = [max_threads, 1] if max_threads > 1 else [1]
        self.trial, self.period = trial, period
        self.chosen: list[tuple[int, dict[int, float]]] = []
        self._times: dict[int, list[float]] = {}
        self._recent: deque[float] = deque(maxlen=trial)
        self._baseline = 0.0
        self._since_trial = 0
        self.threads = torch.get_num_threads()
        self._in_trial = False
        if self.enabled:
            self._start_trial()

    @property
    def enabled(self) -> bool:
        return len(self.candidates) > 1

    def _set(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.threads = threads

    def _start_trial(self) -> None:
        self._in_trial = True
        self._times = {}
        self._set(self.candidates[0])

    def step_done(self, seconds: float | None) -> tuple[int, dict[int, float]] | None:
        """Record one step's duration (evaluations and saves left out; None: not timed). Returns
        (threads, median step seconds per candidate) when a trial has just chosen, else None."""
        if not self.enabled or seconds is None:
            return None
        if self._in_trial:
            return self._trial_step(seconds)
        self._since_trial += 1
        self._recent.append(seconds)
        slower = (
            len(self._recent) == self.trial
            and statistics.median(self._recent) > SLOWER * self._baseline
        )
        if slower or self._since_trial >= self.period:
            self._start_trial()
        return None

    def _trial_step(self, seconds: float) -> tuple[int, dict[int, float]] | None:
        times = self._times.setdefault(self.threads, [])
        times.append(seconds)
        if len(times) < self.trial + 1:  # the first step after a switch warms the pool up
            return None
        position = self.candidates.index(self.threads)
        if position + 1 < len(self.candidates):
            self._set(self.candidates[position + 1])
            return None
        medians = {n: statistics.median(t[1:]) for n, t in self._times.items()}
        best = min(medians, key=medians.__getitem__)
        self._set(best)
        self._in_trial = False
        self._baseline = medians[best]
        self._recent.clear()
        self._since_trial = 0
        self.chosen.append((best, medians))
        return best, medians
