"""Bounded spend on Modal, the Prefect side: each GPU step's limits, the cost published before any
GPU starts, infrastructure-only retries, and failing fast when one of two trainings fails.

The arithmetic is in ``tasks/adapters/limits.py`` and the prices in ``tasks/adapters/costs.py``;
``docs/operations.md`` ("On Modal") explains the bounds to the person who pays.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import PrefectFuture, as_completed
from prefect.runtime import flow_run

from tasks.adapters import costs, limits, modal_calls
from tasks.adapters.limits import StepLimits
from tasks.train import build_config


def plan_spend(
    presets: dict[str, str],
    overrides: dict[str, dict],
    gpu: str,
    max_queue_minutes: float,
    evaluate: bool,
) -> dict[str, StepLimits]:
    """The limits of each Modal GPU step (``classifier``/``dit`` by model, ``evaluate``), after
    publishing the most they can cost together (``publish_spend_plan``).

    Raises:
        ValueError: an invalid preset or override, or a ``gpu`` without a known price.
    """
    steps = {
        m: limits.training_limits(
            m, build_config(m, preset, overrides[m]).time_budget_minutes, gpu, max_queue_minutes
        )
        for m, preset in presets.items()
    }
    if evaluate:
        steps["evaluate"] = limits.evaluation_limits(gpu, max_queue_minutes)
    publish_spend_plan(list(steps.values()))
    return steps


def bounded(task: Any, step: StepLimits | None) -> Any:
    """``task`` with the Prefect timeout (seconds) and the infrastructure-only retries of ``step``;
    ``task`` unchanged when ``step`` is None (the local backend, where nothing is billed by the
    hour and the trainings' own time budgets bound them)."""
    if step is None:
        return task
    return task.with_options(
        timeout_seconds=step.task_timeout_s,
        retries=step.attempts - 1,
        retry_delay_seconds=limits.INFRA_RETRY_DELAY_S,
        retry_condition_fn=is_infrastructure_failure,
    )


def is_infrastructure_failure(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry only after a failure of Modal's infrastructure.

    Never after the project's own errors (a bad config, a NaN loss's FloatingPointError, a bug), a
    timeout, a queue timeout or a cancellation: each would fail the same way, on a paid GPU.
    """
    try:
        state.result()
    except BaseException as exc:
        return modal_calls.is_infrastructure_error(exc)
    return False


def gather_or_fail_fast(futures: dict[str, PrefectFuture]) -> dict[str, Any]:
    """The results of concurrent trainings by name, or, as soon as one fails, its error.

    Before that error propagates, every Modal call of this flow run is cancelled, so a sibling
    training stops now instead of running (and billing) to its end while the flow waits on it.

    Raises:
        Exception: the first failed training's own error.
    """
    names = {id(f): name for name, f in futures.items()}
    for future in as_completed(list(futures.values())):
        try:
            future.result()
        except BaseException:
            cancelled = modal_calls.cancel_flow_run_calls(flow_run.get_id())
            others = sorted(set(futures) - {names[id(future)]})
            get_run_logger().error(
                "%s failed; cancelled this flow run's Modal calls %s%s", names[id(future)],
                cancelled, f" rather than wait for {' and '.join(others)}" if others else "",
            )  # fmt: skip
            raise
    return {name: future.result() for name, future in futures.items()}


def publish_spend_plan(steps: list[StepLimits]) -> float:
    """Publish the most the Modal GPU steps can cost, before any starts; returns it in USD.

    A markdown artifact (key ``modal-max-cost``) with one row per step (GPU, $/hour, attempts,
    timeouts, worst-case hours, USD) and a log line with the total. The figure is an upper bound
    at the list prices of ``tasks/adapters/costs.py`` (see ``tasks/adapters/limits.py``).
    """
    total = sum(step.max_cost_usd for step in steps)
    rows = [
        f"| {s.step} | {s.gpu} | {costs.usd_per_hour(s.gpu):.2f} | {s.attempts} "
        f"| {s.modal_timeout_s / 60:.0f} | {s.max_queue_s / 60:g} | {s.task_timeout_s / 60:.0f} "
        f"| {s.worst_case_hours:.2f} | {s.max_cost_usd:.2f} | {s.note} |"
        for s in steps
    ]
    lines = [
        f"## At most ${total:.2f} of Modal GPU time",
        "",
        "| step | gpu | $/h (all GPUs) | attempts | Modal timeout (min) | max queue (min) "
        "| Prefect timeout (min) | worst-case hours | max $ | note |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"Every attempt counted for its whole Prefect timeout. GPU list prices of "
        f"{costs.PRICES_DATE} from {costs.PRICES_SOURCE} (they change; CPU and memory are "
        "billed on top, a few cents an hour).",
    ]
    create_markdown_artifact(
        key="modal-max-cost",
        markdown="\n".join(lines),
        description=f"Most this run can cost on Modal: ${total:.2f}",
    )
    get_run_logger().info(
        "Modal GPU spend of this run is at most $%.2f (%s)", total,
        ", ".join(f"{s.step} {s.gpu} {s.worst_case_hours:.2f} h ${s.max_cost_usd:.2f}"
                  for s in steps),
    )  # fmt: skip
    return total
