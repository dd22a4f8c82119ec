"""Prefect tasks for training and evaluation, on the local machine or on Modal.

Each task translates its arguments, picks the backend, and leaves artifacts a person can read in the
Prefect UI: live progress (on Modal, read from the runs volume), the call id (Modal), a metrics
table, links to the exported files, and on failure a markdown note saying what failed and how to
resume.
"""

from __future__ import annotations

import contextlib
import json
import time
from typing import Literal

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run, task_run

from data.dataset import DatasetRef
from tasks import backend, monitoring, trainers
from tasks import evaluate as evaluation

Backend = Literal["local", "modal"]
# One local training at a time per Prefect server: two would halve each other's CPU (or GPU).
LOCAL_TRAINING_LIMIT = "train-cats-local-training"


def run_prefix() -> str:
    """The folder, relative to the runs root, shared by this flow run's models and report.

    ``<UTC date>-<flow run name>-<8 hex of its id>``: stable across task retries and Modal
    retries (so a retry resumes), distinct between runs. Outside a flow run, a timestamp.
    """
    run_id = flow_run.get_id()
    if not run_id:
        return time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    started = flow_run.get_scheduled_start_time()
    return f"{started:%Y%m%d}-{flow_run.get_name()}-{run_id[:8]}"


def _ensure_local_limit() -> None:
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(LOCAL_TRAINING_LIMIT)
        except ObjectNotFound:
            with contextlib.suppress(ObjectAlreadyExists):  # another run created it first
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=LOCAL_TRAINING_LIMIT, limit=1)
                )


def _train(
    model: str,
    dataset: dict,
    run_name: str,
    preset: str,
    overrides: dict,
    backend_name: Backend,
    gpu: str,
) -> dict:
    """Train ``model`` locally (in the shared slot) or on Modal; publish its result artifacts."""
    logger = get_run_logger()
    config = trainers.build_config(model, preset, overrides)  # fail here, not in a GPU container
    if backend_name == "modal":
        progress = backend.RemoteTrainingProgress(
            f"{model} · {preset}", run_name, config.time_budget_minutes
        )
        result = backend.run_on_modal(
            f"train_{model}",
            gpu=gpu,
            watch=progress,
            dataset=json.dumps(dataset),
            run_name=run_name,
            preset=preset,
            overrides=json.dumps(overrides),
        )
        progress.finished()
        monitoring.publish_training(model, result, "volume train-cats-runs")
        return result
    run_dir = trainers.run_path(run_name)
    logger.info("training %s (%s) into %s", model, preset, run_dir)
    _ensure_local_limit()
    # The slot's lease is renewed in the background; a missed renewal must not kill a training.
    with concurrency(
        LOCAL_TRAINING_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False
    ):
        result = trainers.TRAINERS[model].train(
            config,
            DatasetRef.model_validate(dataset),
            run_dir,
            progress=monitoring.ProgressArtifact(f"{model} · {preset}"),
        )
    monitoring.publish_training(model, result, "local")
    return result


@task(
    name="train_classifier",
    task_run_name="train_classifier · {preset}",
    on_failure=[monitoring.failure_artifact],
)
def train_classifier_task(
    dataset: dict,
    run_name: str,
    preset: str,
    overrides: dict,
    backend_name: Backend = "local",
    gpu: str = backend.DEFAULT_GPU,
) -> dict:
    """Train the classifier (see ``tasks.train_classifier``); returns its JSON-able result."""
    return _train("classifier", dataset, run_name, preset, overrides, backend_name, gpu)


@task(
    name="train_dit", task_run_name="train_dit · {preset}", on_failure=[monitoring.failure_artifact]
)
def train_dit_task(
    dataset: dict,
    run_name: str,
    preset: str,
    overrides: dict,
    backend_name: Backend = "local",
    gpu: str = backend.DEFAULT_GPU,
) -> dict:
    """Train the DiT (see ``tasks.train_dit``); returns its JSON-able result."""
    return _train("dit", dataset, run_name, preset, overrides, backend_name, gpu)


def _evaluation_name() -> str:
    """``evaluate · classifier + dit``: the models this evaluation covers."""
    params = task_run.get_parameters()
    return "evaluate · " + " + ".join(m for m in ("classifier", "dit") if params.get(m))


@task(
    name="evaluate",
    task_run_name=_evaluation_name,
    on_failure=[monitoring.failure_artifact],
)
def evaluate_task(
    dataset: dict,
    out: str,
    classifier: str | None = None,
    dit: str | None = None,
    options: dict | None = None,
    backend_name: Backend = "local",
    gpu: str = backend.DEFAULT_GPU,
) -> dict:
    """Evaluate the exported runs named ``classifier``/``dit`` into the run name ``out``.

    Re-running the same flow run replaces its report (``overwrite``); the report history, and so
    the deltas against the previous run, is kept per Prefect deployment.
    """
    options = {"deployment": evaluation.default_deployment(), "overwrite": True, **(options or {})}
    if backend_name == "modal":
        result = backend.run_on_modal(
            "evaluate",
            gpu=gpu,
            dataset=json.dumps(dataset),
            out=out,
            classifier=classifier or "",
            dit=dit or "",
            options=json.dumps(options),
        )
        monitoring.publish_remote_report(result, out)
        return result
    return evaluation.evaluate(
        DatasetRef.model_validate(dataset),
        classifier=trainers.run_path(classifier) if classifier else None,
        dit=trainers.run_path(dit) if dit else None,
        out=trainers.run_path(out),
        **options,
    )
