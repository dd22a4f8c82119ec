"""The Prefect adapter: the pipeline's steps as Prefect tasks, on the local machine or on Modal.

Each task translates its arguments to the plain entry point (`data.download.ensure`,
`tasks.train.train`, `tasks.evaluate.evaluate_runs`) or to the deployed Modal function of the same
name (`tasks/adapters/modal_calls.py`), and leaves artifacts a person can read in the Prefect UI
(`tasks/adapters/artifacts.py`): live progress, the Modal call id, metrics tables, links to the
exported files, the evaluation report, and on failure a note saying what failed and how to resume.

`ensure_dataset` retries transient failures (connection errors, timeouts, HTTP 5xx/429, a truncated
body) with exponential backoff and jitter, and a resumed download continues from its partial
file. Anything else (checksum mismatch, 404, invalid archive, bad spec) fails at once, because a
retry would fetch the same wrong bytes again. Override the policy per call with Prefect's own
`ensure_dataset.with_options(retries=..., retry_delay_seconds=exponential_backoff(...))`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.runtime import flow_run, task_run
from prefect.tasks import exponential_backoff

from data.dataset import DatasetRef, DatasetSpec
from data.download import ensure
from data.errors import TransientError
from tasks.adapters import artifacts as monitoring
from tasks.adapters import limits, modal_calls
from tasks.evaluate import evaluate_runs
from tasks.evaluation.history import default_deployment
from tasks.evaluation.options import EvalOptions
from tasks.paths import DEFAULT_GPU, RUNS_VOLUME, run_path
from tasks.train import build_config, train

Backend = Literal["local", "modal"]

RETRIES = 4
# Delays of about 10, 20, 40 and 80 s: long enough for a restarting server or a flaky link.
RETRY_BACKOFF_S = 10.0
# Spreads retries of many concurrent runs so that they do not hit the server in lockstep.
RETRY_JITTER_FACTOR = 0.5


def is_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn`: retry only if the run failed with a `TransientError`."""
    try:
        state.result()
    except TransientError:
        return True
    except BaseException:
        return False
    return False


@task(
    name="ensure_dataset",
    task_run_name="ensure_dataset · {spec.labels}",
    retries=RETRIES,
    retry_delay_seconds=exponential_backoff(backoff_factor=RETRY_BACKOFF_S),
    retry_jitter_factor=RETRY_JITTER_FACTOR,
    retry_condition_fn=is_transient,
    # Runs once the task has finally failed (not on a retried attempt), like the training steps.
    on_failure=[monitoring.failure_artifact],
)
def ensure_dataset(
    spec: DatasetSpec,
    data_dir: str | Path | None = None,
    backend: Literal["local", "modal"] = "local",
) -> DatasetRef:
    """Return the DatasetRef (small, JSON-able; never image data) of `spec`'s published version.

    `data_dir` defaults to `$TRAIN_CATS_DATA_DIR`, else `./artifacts/data`. Raises the errors of
    `data.download.ensure`; only `TransientError`s are retried. With `backend="modal"` the same
    code runs in the deployed Modal function and publishes on the `train-cats-data` volume
    (`data_dir` is then the volume's `/data`); Modal re-raises its errors here, so the same
    retry policy applies.
    """
    if backend == "modal":
        ref = DatasetRef.model_validate(modal_calls.run_on_modal("ensure_dataset", spec=spec.model_dump_json()))
    else:
        ref = ensure(spec, data_dir)
    monitoring.publish_dataset_summary(ref)
    get_run_logger().info("data set %s at %s: %s", ref.version, ref.root, ref.counts)
    return ref

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
    max_queue_minutes: float,
) -> dict:
    """Train ``model`` locally (in the shared slot) or on Modal; publish its result artifacts."""
    logger = get_run_logger()
    config = build_config(model, preset, overrides)  # fail here, not in a GPU container
    if backend_name == "modal":
        step = limits.training_limits(model, config.time_budget_minutes, gpu, max_queue_minutes)
        if step.note:
            logger.warning("train_%s on Modal: %s", model, step.note)
        progress = modal_calls.RemoteTrainingProgress(
            f"{model} · {preset}", run_name, config.time_budget_minutes
        )
        result = modal_calls.run_on_modal(
            f"train_{model}",
            limits=step,
            watch=progress,
            dataset=json.dumps(dataset),
            run_name=run_name,
            preset=preset,
            overrides=json.dumps(overrides),
        )
        progress.finished()
        monitoring.publish_training(model, result, "volume train-cats-runs")
        return result
    run_dir = run_path(run_name)
    logger.info("training %s (%s) into %s", model, preset, run_dir)
    _ensure_local_limit()
    # The slot's lease is renewed in the background; a missed renewal must not kill a training.
    with concurrency(
        LOCAL_TRAINING_LIMIT, occupy=1, strict=True, raise_on_lease_renewal_failure=False
    ):
        result = train(
            model, preset, overrides, dataset, run_dir, monitoring.ProgressArtifact(f"{model} · {preset}")
        )
    monitoring.publish_training(model, result, "local")
    return result


def _training_task(model: str) -> Any:
    """The Prefect task that trains ``model`` (``train_classifier`` / ``train_dit``)."""

    def run(
        dataset: dict,
        run_name: str,
        preset: str,
        overrides: dict,
        backend_name: Backend = "local",
        gpu: str = DEFAULT_GPU,
        max_queue_minutes: float = limits.DEFAULT_MAX_QUEUE_MINUTES,
    ) -> dict:
        return _train(
            model, dataset, run_name, preset, overrides, backend_name, gpu, max_queue_minutes
        )

    run.__name__ = run.__qualname__ = f"train_{model}_task"
    run.__doc__ = f"Train the {model} (see ``tasks.train_{model}``); returns its JSON-able result."
    return task(
        name=f"train_{model}",
        task_run_name=f"train_{model} · {{preset}}",
        on_failure=[monitoring.failure_artifact],
    )(run)


train_classifier_task = _training_task("classifier")
train_dit_task = _training_task("dit")


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
    options: EvalOptions | None = None,
    backend_name: Backend = "local",
    gpu: str = DEFAULT_GPU,
    max_queue_minutes: float = limits.DEFAULT_MAX_QUEUE_MINUTES,
) -> dict:
    """Evaluate the exported runs named ``classifier``/``dit`` into the run name ``out``.

    Re-running the same flow run replaces its report (``overwrite``); the report history, and so
    the deltas against the previous run, is kept per Prefect deployment. On Modal it runs on
    ``gpu`` within ``limits.evaluation_limits`` (``max_queue_minutes`` to get a container).
    """
    given = options.model_dump(exclude_unset=True) if options is not None else {}
    opts = EvalOptions.model_validate(
        {"deployment": default_deployment(), "overwrite": True, **given}
    )
    if backend_name == "modal":
        result = modal_calls.run_on_modal(
            "evaluate",
            limits=limits.evaluation_limits(gpu, max_queue_minutes),
            dataset=json.dumps(dataset),
            out=out,
            classifier=classifier or "",
            dit=dit or "",
            options=opts.model_dump_json(),
        )
        # The grid and confusion matrix, read back from the runs volume, as locally.
        monitoring.publish_remote_report(
            result, out, lambda path: modal_calls.read_volume_file(RUNS_VOLUME, path)
        )
        return result
    result = evaluate_runs(dataset, out, classifier, dit, opts)
    monitoring.publish_report(Path(result["report_dir"]))
    return result
