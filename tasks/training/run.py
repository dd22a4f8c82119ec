"""The bookkeeping both trainers share around their loop: resume, step plan, log, checkpoints.

A trainer builds its model, optimizer, schedule and loader, names them in `parts`, and hands them
to `TrainingRun`, which restores them from the newest valid checkpoint (`tasks.training.checkpoint`),
decides how many steps remain (the config's `steps`, or a time budget's plan), logs each step,
saves checkpoints on cadence, and assembles the JSON-able result. The maths of a step stays in
the trainer, in plain sight.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

from tasks.training import checkpoint as ckpt
from tasks.training.budget import TimeBudget, initial_total
from tasks.training.config import RESUMABLE_FIELDS, TrainConfig
from tasks.training.distributed import Ranks, agree
from tasks.training.run_log import METRICS, Progress, RunLog
from tasks.training.runtime import resolve_precision
from tasks.training.schedule import WarmupCosine
from tasks.training.threads import AdaptiveThreads

T = TypeVar("T")


class TrainingRun:
    """Resume state and per-step bookkeeping of one run dir.

    Attributes:
        step: optimizer updates applied so far (restored on resume).
        total: the step count currently planned; fixed without a budget, re-planned every step
            from measured throughput with one.
        resumed_from: the checkpoint step this process started from, or None.
        ranks: this process's data-parallel rank; rank 0 alone plans, logs, evaluates and saves,
            and `active()` hands its decisions to the others.

    The constructor only records; `resume()` restores the checkpoint, in plain sight in the
    trainer.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset_version: str,
        run_dir: Path,
        budget: TimeBudget,
        schedule: WarmupCosine,
        parts: dict[str, ckpt.Stateful],
        progress: Progress | None,
        desc: str,
        ranks: Ranks = Ranks(),  # noqa: B008 - frozen dataclass
    ) -> None:
        self.config = config
        self.ranks = ranks
        self.dataset_version = dataset_version
        self.run_dir = run_dir
        self.budget = budget
        self.schedule = schedule
        self.parts = {**parts, "scheduler": schedule, "budget": budget}
        self.progress, self.desc = progress, desc
        self.step, self.total, self.resumed_from = 0, config.steps, None
        self.cadence = ckpt.Cadence(
            config.ckpt_every_steps, budget.checkpoint_minutes(config.ckpt_every_minutes)
        )
        self._probe = False
        self.threads = None
        self._threads_before = torch.get_num_threads()
        on_cuda = config.device != "cpu" and torch.cuda.is_available()
        # What `precision` resolved to here: config.json keeps "auto", which means fp32 on one CPU
        # and bf16 on another, so the final row says which one this run computed in. The training
        # loops autocast to this value, so the record and the computation share one resolution.
        self.precision = resolve_precision(
            torch.device("cuda" if on_cuda else "cpu"), config.precision
        )
        adaptive = config.adaptive_threads and config.num_threads is None and not ranks.enabled
        if budget.enabled and adaptive and not on_cuda:
            self.threads = AdaptiveThreads(torch.get_num_threads())
        self.steps_this_run = 0
        self.last_row: dict[str, Any] | None = None
        self.train_s = 0.0
        self._t_finish: float | None = None
        self._reserve_s: float | None = None

    def resume(self) -> TrainingRun:
        """Restore every part from the run dir's newest valid checkpoint (if any), plan the steps
        left, and open the log. Call once, before the loop; returns self.

        Raises:
            tasks.training.checkpoint.ResumeMismatchError: the checkpoint has another config or
                dataset version.
        """
        config, budget = self.config, self.budget
        self.step, finished, self.resumed_from = ckpt.resume(
            self.run_dir, config.model_dump(), self.dataset_version, RESUMABLE_FIELDS, self.parts
        )
        self.total = initial_total(
            config.steps, self.schedule.total_steps, self.step, finished, budget.enabled
        )
        self.schedule.set_total_steps(max(self.total, 1))
        self.log = RunLog(
            self.run_dir,
            self.total,
            self.step,
            self.progress,
            config.progress_bar,
            self.desc,
            writer=self.ranks.is_main,
        )
        self._t_train = time.monotonic()
        return self

    def active(self) -> bool:
        """Whether to run another step: steps remain and the budget allows one more. With data
        parallelism rank 0 decides and every rank gets its answer and its plan (a collective:
        every rank calls this once per step)."""
        go = self.step < self.total and not self.budget.out_of_time(self.step)
        go, total = agree(go, self.total, self.ranks)
        if total != self.total:
            self._plan(total)
        return go

    def _plan(self, total: int) -> None:
        """Adopt `total` planned steps: the LR schedule's length, its warm-up, the bar."""
        self.total = total
        self.schedule.set_total_steps(total)
        # A warm-up sized for a long run would eat a short budget: cap it at a fifth of the plan.
        self.schedule.warmup_steps = min(self.config.warmup_steps, max(1, total // 5))
        self.log.set_total(total)

    def lr(self) -> float:
        """Set and return the learning rate of the coming update."""
        return self.schedule.apply(self.step)

    def step_done(self, loss: torch.Tensor, lr: float) -> None:
        """Count the update just applied, re-plan under a budget, log."""
        self.step += 1
        self.steps_this_run += 1
        self.budget.step_done(self.step)
        if self.threads is not None:
            chosen = self.threads.step_done(self.budget.last_step_s)
            if chosen is not None:
                medians = {str(n): round(s, 4) for n, s in chosen[1].items()}
                self.log.write(
                    {"kind": "threads", "step": self.step, "threads": chosen[0], "step_s": medians}
                )
        if self.budget.enabled and self.ranks.is_main:
            self._plan(max(self.step, self.budget.planned_total(self.step)))
        row = self.log.step(
            self.step, loss, lr, self.config.batch_size, self.total, self.config.log_every
        )
        self.last_row = row or self.last_row
        # Under a budget, one evaluation and one save are timed as soon as timing starts (the
        # "probe", see tasks.training.budget), so the finishing work is known early.
        self._probe = self.budget.probe_due()

    def evaluation_due(self, every: int) -> bool:
        """Whether to evaluate (sample grid / validation) after this step: every `every` steps,
        and at the budget's probe; never at the last step, which the final evaluation covers."""
        due = (self.step % every == 0 or self._probe) and self.step < self.total
        return due and self.ranks.is_main

    def evaluate(self, work: Callable[[], T]) -> T:
        """Run a periodic evaluation, timed for the budget."""
        return self.timed("evaluate", work, one_off=self._probe)

    def timed(self, kind: str, work: Callable[[], T], one_off: bool = False) -> T:
        """Run finishing-like `work` ("evaluate" or "save") and tell the budget how long it took."""
        t0 = time.monotonic()
        out = work()
        self.budget.note_overhead(kind, time.monotonic() - t0, one_off)
        return out

    def save(self, is_final: bool, one_off: bool = False) -> Path:
        """Checkpoint every part, the RNG states and whether the run is finished."""
        state = ckpt.make_state(
            self.step,
            self.config.model_dump(),
            self.dataset_version,
            self.parts,
            finished=is_final,
        )
        path = self.timed(
            "save",
            lambda: ckpt.save_checkpoint(self.run_dir, state, self.config.keep_checkpoints),
            one_off,
        )
        self.cadence.saved()
        return path

    def maybe_save(self) -> None:
        """Save when the cadence says so (or for the budget's probe), except at the last step,
        which the final save covers."""
        due = (self.cadence.due(self.step) or self._probe) and self.step < self.total
        if due and self.ranks.is_main:
            self.save(is_final=False, one_off=self._probe)

    def end_training(self) -> None:
        self._t_finish = time.monotonic()
        self.train_s = self._t_finish - self._t_train
        if self.budget.enabled:
            self._reserve_s = self.budget.reserve_s()
        self.log.close()

    def result(self, files: dict[str, str], metrics: dict[str, Any]) -> dict[str, Any]:
        """Save the final checkpoint and return the run's JSON-able summary; `metrics` adds the
        trainer's own figures to the common ones, which are also appended to metrics.jsonl."""
        last_checkpoint = self.save(is_final=True)
        batch = self.config.batch_size
        common = {
            "steps": self.step,
            "steps_this_run": self.steps_this_run,
            "resumed_from_step": self.resumed_from,
            "final_loss": self.last_row["loss"] if self.last_row else None,
            "images_per_s": self.steps_this_run * batch / self.train_s
            if self.steps_this_run
            else None,
            "train_time_s": self.train_s,
            # The finishing work's planned reserve against its real cost: the measured margin.
            "budget_reserve_s": self._reserve_s,
            "budget_finish_s": time.monotonic() - self._t_finish if self._reserve_s else None,
            "budget_spent_s": self.budget.spent_s() if self.budget.enabled else None,
            "threads": torch.get_num_threads(),
            "world_size": self.ranks.world_size,
            "precision": self.precision,
        }
        metrics = {**common, **metrics}
        # The caller's setting, after the finishing work.
        torch.set_num_threads(self._threads_before)
        self.log.write({"kind": "final", "step": self.step, **metrics})
        return {
            "run_dir": str(self.run_dir),
            "metrics": metrics,
            "files": {
                **files,
                "metrics": str(self.run_dir / METRICS),
                "checkpoint": str(last_checkpoint),
            },
            "dataset_version": self.dataset_version,
            "config": self.config.model_dump(),
        }
