"""The ``train-cats`` flow: ensure_dataset -> train_classifier + train_dit -> evaluate.

Run it through the deployments in ``prefect.yaml`` (``prefect deployment run train-cats/dit``), or
in-process on a temporary Prefect server with ``python -m flows.train_cats`` / ``train-cats``
(``flows/cli.py``). Its parameters and their validation are in ``flows/parameters.py``.
"""

from __future__ import annotations

import sys
from typing import Literal

if __name__ == "__main__":  # the command line answers --help and bad flags before Prefect loads
    from flows.cli import main

    sys.exit(main())

from prefect import flow

from data.dataset import DatasetSpec
from flows.parameters import (
    ComputeParams,
    EvaluationParams,
    TrainingParams,
    plan,
    resolve_backend,
)
from tasks.adapters import artifacts, spend
from tasks.adapters import modal_calls as backend
from tasks.adapters.modal_access import report_backend
from tasks.adapters.prefect_tasks import (
    ensure_dataset,
    evaluate_task,
    run_prefix,
    train_classifier_task,
    train_dit_task,
)

TRAIN_TASKS = {"classifier": train_classifier_task, "dit": train_dit_task}


@flow(
    name="train-cats",
    on_cancellation=[backend.cancel_recorded_calls],
    on_crashed=[backend.cancel_recorded_calls],
    on_failure=[backend.cancel_recorded_calls, artifacts.flow_failure_artifact],
)
def train_cats(
    dataset: DatasetSpec = DatasetSpec(),  # noqa: B008 - pydantic defaults render the UI form
    models: list[Literal["classifier", "dit"]] = ["classifier", "dit"],  # noqa: B006
    classifier: TrainingParams = TrainingParams(),  # noqa: B008
    dit: TrainingParams = TrainingParams(),  # noqa: B008
    compute: ComputeParams = ComputeParams(),  # noqa: B008
    evaluation: EvaluationParams = EvaluationParams(),  # noqa: B008
) -> dict:
    """Build or reuse the dataset, train the chosen models, evaluate them; return a summary."""
    models = sorted(set(models))
    training = {"classifier": classifier, "dit": dit}
    compute, why = resolve_backend(compute)  # auto: modal or local, before the presets
    report_backend(compute.backend, why)
    spec, presets = plan(dataset, models, training, compute, evaluation)
    limits = {}  # Modal: each GPU step's timeouts and retries, and the most they can cost
    if compute.backend == "modal":
        overrides = {m: training[m].overrides for m in models}
        limits = spend.plan_spend(
            presets, overrides, compute.gpu, compute.max_queue_minutes, evaluation.enabled
        )
    ref = ensure_dataset(spec, backend=compute.backend).model_dump(mode="json")
    prefix = run_prefix()
    train = {
        m: dict(
            dataset=ref,
            run_name=f"{prefix}/{m}",
            preset=presets[m],
            overrides=training[m].overrides,
            backend_name=compute.backend,
            gpu=compute.gpu,
            max_queue_minutes=compute.max_queue_minutes,
        )
        for m in models
    }
    if compute.backend == "modal":  # separate GPU containers: both at once; one fails, both stop
        futures = {m: spend.bounded(TRAIN_TASKS[m], limits[m]).submit(**train[m]) for m in models}
        results = spend.gather_or_fail_fast(futures)
    else:  # one machine: one after the other
        results = {m: TRAIN_TASKS[m](**train[m]) for m in models}
    report = None
    if evaluation.enabled:
        report = spend.bounded(evaluate_task, limits.get("evaluate"))(
            ref,
            out=f"{prefix}/report",
            classifier=train.get("classifier", {}).get("run_name"),
            dit=train.get("dit", {}).get("run_name"),
            options=evaluation.options(),
            backend_name=compute.backend,
            gpu=compute.gpu,
            max_queue_minutes=compute.max_queue_minutes,
        )
    return {
        "dataset_version": ref["version"],
        "run_dirs": {m: r["run_dir"] for m, r in results.items()},
        "metrics": {m: r.get("metrics", {}) for m, r in results.items()},
        "report": report,
    }

