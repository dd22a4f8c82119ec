"""Prefect task `ensure_dataset`: publish (or reuse) the data set version for a spec.

The body is one call to `data.download.ensure`; this module adds the retry policy and, on a final
failure, the `failure-ensure-dataset` artifact (`tasks.monitoring.failure_artifact`). Transient
failures (connection errors, timeouts, HTTP 5xx/429, a truncated body) are retried with
exponential backoff and jitter, and a resumed download continues from its partial file. Anything
else (checksum mismatch, 404, invalid archive, bad spec) fails at once, because a retry would
fetch the same wrong bytes again.

Override the policy per call with Prefect's own `ensure_dataset.with_options(retries=...,
retry_delay_seconds=exponential_backoff(...))` (the tests shrink the delays that way).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect import get_run_logger, task
from prefect.tasks import exponential_backoff

from data.dataset import DatasetRef, DatasetSpec
from data.download import ensure
from data.errors import TransientError
from tasks.backend import run_on_modal
from tasks.monitoring import failure_artifact, publish_dataset_summary

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
    on_failure=[failure_artifact],
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
        ref = DatasetRef.model_validate(run_on_modal("ensure_dataset", spec=spec.model_dump_json()))
    else:
        ref = ensure(spec, data_dir)
    publish_dataset_summary(ref)
    get_run_logger().info("data set %s at %s: %s", ref.version, ref.root, ref.counts)
    return ref
