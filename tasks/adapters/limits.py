"""How long a Modal step may take, how often it may be tried, and so the most it can cost.

Pure arithmetic (no Prefect, no Modal), shared by the Modal app (its static timeouts for direct
``modal run`` use), the Prefect tasks (the per-call Modal options) and the flow (the Prefect task
timeouts and the published cost bound), so that the three always agree.

Three nested bounds per GPU step, from the inside out:

1. **Modal timeout** (``modal_timeout_s``): a training's time budget plus ``TIMEOUT_MARGIN_S``;
   Modal stops the attempt there with ``FunctionTimeoutError``, which is not retried.
2. **Queue time** (``max_queue_s``, the flow's ``compute.max_queue_minutes``): a call that has not
   got a container by then is cancelled and the flow fails, saying so.
3. **Prefect timeout** (``task_timeout_s`` = queue time + Modal timeout + ``WAIT_GRACE_S``): the
   wall-clock cap of one attempt, from spawn to result. It also bounds what Modal's own restarts
   add: a preempted input restarts with a fresh Modal timeout (Modal counts timeouts per execution
   attempt), so only this cap bounds an attempt that keeps being preempted.

The cost bound counts every attempt (``attempts``: the first try plus ``INFRA_RETRIES``) as billed
for its whole Prefect timeout, on every GPU of ``compute.gpu``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tasks.adapters import costs

# Beyond a training's time budget (which already includes its exports, see docs/training.md):
# container start (image pull, importing torch), the volume reloads, and the final volume commit.
TIMEOUT_MARGIN_S = 15 * 60
# A training config without a time budget is bounded by its step count only, which says nothing
# about wall time on an unknown GPU; on Modal it is given this budget's timeout instead.
UNBUDGETED_MINUTES = 60.0
# The evaluation has no time budget of its own: sampling and metrics of the gpu presets take
# minutes on a GPU, so an hour is a generous, stated ceiling.
EVALUATION_TIMEOUT_S = 60 * 60
# Beyond the Modal timeout, before Prefect gives up on an attempt: one poll interval of the waiting
# loop, the result's transfer, and Modal's "a handful of seconds" of timeout accuracy.
WAIT_GRACE_S = 2 * 60
# Retries of a whole step after an infrastructure failure that Modal itself did not absorb
# (``modal.exception.InternalFailure``); never after an error of the project's own code.
INFRA_RETRIES = 1
INFRA_RETRY_DELAY_S = 60.0
DEFAULT_MAX_QUEUE_MINUTES = 30.0


@dataclass(frozen=True)
class StepLimits:
    """The bounds of one Modal GPU step (all times in seconds, money in USD)."""

    step: str  # "train_dit", "train_classifier", "evaluate"
    gpu: str  # the Modal GPU string, e.g. "H100:2"
    modal_timeout_s: int
    max_queue_s: float
    attempts: int = 1 + INFRA_RETRIES
    note: str = ""  # e.g. why the timeout is a cap rather than budget + margin

    @property
    def task_timeout_s(self) -> float:
        """The Prefect task timeout: queue time + Modal timeout + grace, per attempt."""
        return self.max_queue_s + self.modal_timeout_s + WAIT_GRACE_S

    @property
    def worst_case_hours(self) -> float:
        """Wall-clock hours of all attempts, each run up to its Prefect timeout."""
        return self.attempts * self.task_timeout_s / 3600.0

    @property
    def max_cost_usd(self) -> float:
        """Worst-case hours x the GPUs' list price per hour (``tasks.adapters.costs``)."""
        return self.worst_case_hours * costs.usd_per_hour(self.gpu)


def training_timeout_s(budget_minutes: float | None) -> int:
    """The Modal timeout of a training, in whole seconds: its budget plus ``TIMEOUT_MARGIN_S``.

    ``None`` (no time budget) counts as ``UNBUDGETED_MINUTES``.
    """
    minutes = UNBUDGETED_MINUTES if budget_minutes is None else budget_minutes
    return math.ceil(minutes * 60 + TIMEOUT_MARGIN_S)


def training_limits(
    model: str, budget_minutes: float | None, gpu: str, max_queue_minutes: float
) -> StepLimits:
    """The bounds of training ``model`` with that time budget (minutes; None: none) on ``gpu``.

    Raises:
        ValueError: ``gpu`` has no known price (see ``costs.parse_gpu``).
    """
    costs.parse_gpu(gpu)
    note = ""
    if budget_minutes is None:
        note = (
            f"no time_budget_minutes: stopped after {UNBUDGETED_MINUTES:g} min + margin; set "
            "overrides.time_budget_minutes to choose"
        )
    return StepLimits(
        step=f"train_{model}",
        gpu=gpu,
        modal_timeout_s=training_timeout_s(budget_minutes),
        max_queue_s=max_queue_minutes * 60.0,
        note=note,
    )


def evaluation_limits(gpu: str, max_queue_minutes: float) -> StepLimits:
    """The bounds of the evaluation on ``gpu``.

    Raises:
        ValueError: ``gpu`` has no known price (see ``costs.parse_gpu``).
    """
    costs.parse_gpu(gpu)
    return StepLimits("evaluate", gpu, EVALUATION_TIMEOUT_S, max_queue_minutes * 60.0)
