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

from prefect import flow, get_run_logger
from prefect.states import Completed, State

from data.dataset import DatasetSpec
from flows.parameters import (
    ComputeParams,
    EvaluationParams,
    TrainingParams,
    plan,
    resolve_backend,
    teacher_is_explicit,
)
from tasks.adapters import artifacts, lifecycle, spend
from tasks.adapters import modal_calls as backend
from tasks.adapters.modal_access import report_backend
from tasks.adapters.prefect_tasks import (
    ensure_dataset,
    evaluate_task,
    run_prefix,
    train_classifier_task,
    train_dit_task,
)
from tasks.evaluation.history import default_deployment
from tasks.train import build_config

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
    force: bool = False,
) -> State:
    """Check for changes, build or reuse the dataset, train the chosen models, evaluate them and
    promote the better ones; the final state (Unchanged, Promoted, Challenger, Trained) carries
    a summary. `force` retrains although nothing changed since the champions."""
    models = sorted(set(models))
    training = {"classifier": classifier, "dit": dit}
    compute, why = resolve_backend(compute)  # auto: modal or local, before the presets
    report_backend(compute.backend, why)
    spec, presets = plan(dataset, models, training, compute, evaluation)
    repa = _choose_repa(training, presets, models, evaluation.enabled, compute.backend, spec.labels)
    deployment = evaluation.deployment or default_deployment()
    configs = {m: build_config(m, presets[m], training[m].overrides).model_dump() for m in models}
    governed = lifecycle.is_deployment_run()  # scheduled or `prefect deployment run` runs
    check = lifecycle.check_for_changes(
        spec, configs, models, deployment, probe=governed, backend=compute.backend
    )
    lifecycle.publish_change_check(check, deployment, force, governed)
    if governed and not check.changed and not force:
        return Completed(name="Unchanged", message="nothing changed since the champions")
    spec = check.spec
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
    report, decisions = None, {}
    # A DiT trained alone is judged by a classifier champion that knows its classes, if any.
    judge = None
    if evaluation.enabled and "classifier" not in models:
        teacher = configs.get("dit", {}).get("repa_teacher")
        judge = lifecycle.find_judge(ref["classes"], compute.backend, teacher)
    if evaluation.enabled:
        report = spend.bounded(evaluate_task, limits.get("evaluate"))(
            ref,
            out=f"{prefix}/report",
            classifier=train.get("classifier", {}).get("run_name") or (judge and judge.run_name),
            dit=train.get("dit", {}).get("run_name"),
            options=evaluation.options(),
            backend_name=compute.backend,
            gpu=compute.gpu,
            max_queue_minutes=compute.max_queue_minutes,
        )
    if report is not None:  # where the reports are: here, or in a Modal container
        decisions = lifecycle.promote_models(
            deployment, {m: train[m]["run_name"] for m in models}, report["report_dir"], ref,
            evaluation.options(), check, judge and judge.run_name, compute.backend,
        )  # fmt: skip
    summary = {
        "dataset_version": ref["version"],
        "run_dirs": {m: r["run_dir"] for m, r in results.items()},
        "metrics": {m: r.get("metrics", {}) for m, r in results.items()},
        "report": report,
        "promoted": {m: d.promoted for m, d in decisions.items()},
        "repa": repa,
    }
    if not decisions:
        return Completed(name="Trained", message="trained and evaluated", data=summary)
    verdicts = "; ".join(
        f"{m} {'promoted' if d.promoted else 'kept as challenger'}: {d.reason}"
        for m, d in decisions.items()
    )
    name = "Promoted" if all(d.promoted for d in decisions.values()) else "Challenger"
    return Completed(name=name, message=verdicts, data=summary)


def _choose_repa(
    training: dict[str, TrainingParams],
    presets: dict[str, str],
    models: list[str],
    judged: bool,
    backend: str,
    labels: str,
) -> str | None:
    """A DiT preset whose REPA teacher may be missing (`cpu-small`) trains with REPA or without
    it (`lifecycle.choose_repa`): pin that choice in `training["dit"]`'s overrides, before the
    change check fingerprints the configs and the task builds its own, and log it. A teacher the
    user named (`repa_teacher` in the overrides, without `repa_fallback`) is required instead:
    `flows.parameters.plan` has checked it. Returns the line, or None where nothing was chosen."""
    if "dit" not in models:
        return None
    params = training["dit"]
    if teacher_is_explicit(params.overrides):
        pinned = {**params.overrides, "repa_fallback": "error"}
        training["dit"] = params.model_copy(update={"overrides": pinned})
        return None
    config = build_config("dit", presets["dit"], params.overrides)
    seed = None  # of the classifier this run trains, its DiT's judge
    if "classifier" in models:
        classifier = training["classifier"]
        seed = build_config("classifier", presets["classifier"], classifier.overrides).seed
    choice = lifecycle.choose_repa(
        config, models=models, backend=backend, judged=judged, classifier_seed=seed, labels=labels
    )
    if choice is None:
        return None
    pinned, line = choice
    training["dit"] = params.model_copy(update={"overrides": {**params.overrides, **pinned}})
    get_run_logger().info(line)
    return line
