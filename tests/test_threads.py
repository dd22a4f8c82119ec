"""The adaptive thread count: trials pick the faster setting, and a slowdown re-runs the trial.

Step durations are fed in as numbers, the way a contended machine would produce them, so the
decisions are checked exactly; the thread counts are torch's real ones."""

from __future__ import annotations

import pytest
import torch

from tasks.training.threads import SLOWER, AdaptiveThreads


@pytest.fixture(autouse=True)
def _restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _trial(threads: AdaptiveThreads, seconds: dict[int, float]):
    """Feed one whole trial: 1 warm-up + `trial` steps per candidate, at the given durations."""
    chosen = None
    for _ in threads.candidates:
        current = threads.threads
        for _ in range(threads.trial + 1):
            assert threads.threads == current
            chosen = threads.step_done(seconds[current])
    return chosen


def test_a_contended_machine_moves_to_one_thread_and_back_when_it_is_quiet():
    threads = AdaptiveThreads(max_threads=2, trial=3, period=10)
    assert threads.threads == 2  # a trial starts with all threads
    chosen = _trial(threads, {2: 0.4, 1: 0.5})  # quiet: 2 threads are faster
    assert chosen == (2, {2: 0.4, 1: 0.5}) and torch.get_num_threads() == 2
    # Another process takes a core: 2-thread steps stall. Within `trial` steps a new trial runs.
    for _ in range(threads.trial):
        threads.step_done(0.4 * SLOWER * 2)
    assert threads.threads == 2 and len(threads.chosen) == 1
    chosen = _trial(threads, {2: 1.6, 1: 0.55})
    assert chosen[0] == 1 and torch.get_num_threads() == 1
    # Still contended, nothing changes until the period is over; then the trial finds it quiet.
    for _ in range(threads.period - 1):
        assert threads.step_done(0.55) is None and threads.threads == 1
    threads.step_done(0.55)
    assert threads.threads == 2  # re-measuring all threads
    assert _trial(threads, {2: 0.4, 1: 0.5})[0] == 2
    assert [c[0] for c in threads.chosen] == [2, 1, 2]


def test_one_thread_or_untimed_steps_change_nothing():
    torch.set_num_threads(1)
    single = AdaptiveThreads(max_threads=1)
    assert not single.enabled and single.step_done(5.0) is None
    threads = AdaptiveThreads(max_threads=2, trial=2)
    for _ in range(10):
        assert threads.step_done(None) is None
    assert threads.threads == 2 and threads.chosen == []
    with pytest.raises(ValueError, match="must all be >= 1"):
        AdaptiveThreads(max_threads=2, trial=0)
