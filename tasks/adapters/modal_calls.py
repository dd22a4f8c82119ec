"""Dispatch a pipeline step to Modal and wait for it, as a Prefect-visible, cancellable call.

Why the deployed app (``modal.Function.from_name``) and not an ephemeral ``app.run()``:
scheduled retrainings are started by a Prefect worker, and a call to a deployed function lives
independently of that worker process. An ephemeral app stops its functions as soon as the client
that started it goes away, so a restarted worker would kill a day-long GPU run; it would also
rebuild and re-upload the image from whichever checkout the worker happens to have. Deploying is
one explicit, versioned step (``modal deploy tasks/adapters/modal_app.py``), and every call id recorded here
can be inspected or cancelled later from anywhere (``modal.FunctionCall.from_id``).

Cancellation reaches a Modal call two ways: the waiting loop cancels its call on any interrupt
(Prefect turns SIGTERM into an exception in the flow process), and ``cancel_recorded_calls`` -- the
flow's ``on_cancellation``/``on_crashed`` hook, which Prefect runs even after the flow process was
killed -- cancels every call id the flow run recorded as an artifact.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

from tasks.adapters import artifacts as monitoring
from tasks.paths import APP_NAME, METRICS, RUNS_VOLUME

CALL_ARTIFACT_PREFIX = "modal-call-"
POLL_S = 30.0


class ModalUnavailableError(RuntimeError):
    """``backend="modal"`` was asked for but Modal cannot be used (no credentials, app not deployed)."""


def modal_credentials_present() -> bool:
    """True when the Modal client has a token: ``MODAL_TOKEN_ID``/``SECRET`` or ``~/.modal.toml``."""
    from modal.config import config

    return bool(config.get("token_id")) and bool(config.get("token_secret"))


def require_modal_credentials() -> None:
    """Fail at once, before any work, when Modal has no credentials.

    Raises:
        ModalUnavailableError: naming both ways to provide a token and the local fallback.
    """
    if not modal_credentials_present():
        raise ModalUnavailableError(
            "backend='modal' needs Modal credentials, and none were found: set MODAL_TOKEN_ID and "
            "MODAL_TOKEN_SECRET, or run `modal token new` (writes ~/.modal.toml); then deploy the "
            "functions with `modal deploy tasks/adapters/modal_app.py`. Or use backend='local'."
        )


def lookup(function_name: str, gpu: str | None = None) -> Any:
    """The deployed ``train-cats`` function ``function_name``, on ``gpu`` when given.

    ``with_options(gpu=...)`` picks the GPU per call, so changing it needs no redeploy.
    """
    import modal

    function = modal.Function.from_name(APP_NAME, function_name)
    return function.with_options(gpu=gpu) if gpu else function


def call_from_id(call_id: str) -> Any:
    """A handle on an earlier Modal call, by its id (``fc-...``)."""
    import modal

    return modal.FunctionCall.from_id(call_id)


def read_volume_file(volume: str, path: str) -> bytes:
    """The committed content of ``path`` (relative to the volume root) on the named volume.

    Raises:
        FileNotFoundError: no such file has been committed yet.
    """
    import modal

    return b"".join(modal.Volume.from_name(volume).read_file(path))


class RemoteTrainingProgress:
    """Keeps a progress artifact current for a training running on Modal, from the client side.

    Called between polls of the Modal call: it reads the run's ``metrics.jsonl`` from the runs
    volume (committed by the training every few minutes, ``tasks.adapters.modal_app.COMMIT_EVERY_S``) and
    reports its newest ``train`` row as step/total_steps. Until a row is committed it reports the
    time since the spawn against the config's time budget (minutes; None: elapsed time only).
    """

    def __init__(self, label: str, run_name: str, budget_minutes: float | None):
        self.label = f"{label} (Modal)"
        self.artifact = monitoring.ProgressArtifact(self.label)
        self.path = f"{run_name}/{METRICS}"
        self.budget_s = None if budget_minutes is None else budget_minutes * 60.0
        self.t0 = time.monotonic()

    def _newest_row(self) -> dict | None:
        try:
            text = read_volume_file(RUNS_VOLUME, self.path).decode()
        except FileNotFoundError:
            return None
        except Exception as exc:  # progress is a convenience: a failed read must not fail the step
            get_run_logger().warning("could not read %s from %s: %s", self.path, RUNS_VOLUME, exc)
            return None
        for line in reversed(text.splitlines()):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a commit mid-write
            if row.get("kind") == "train":
                return row
        return None

    def __call__(self) -> None:
        row = self._newest_row()
        if row is not None:
            self.artifact(row)
            return
        elapsed_s = time.monotonic() - self.t0
        percent, of = 0.0, ""
        if self.budget_s is not None:
            percent, of = (
                min(99.0, 100.0 * elapsed_s / self.budget_s),
                f" of {self.budget_s / 60:g}",
            )
        self.artifact.report(
            percent,
            f"{self.label}: {elapsed_s / 60:.1f}{of} min since spawn, "
            "no metrics committed to the volume yet",
        )

    def finished(self) -> None:
        self.artifact.report(100.0, f"{self.label}: finished")


def _dashboard_url(call: Any) -> str:
    try:
        return call.get_dashboard_url()
    except Exception:  # the URL is a convenience; no URL must not fail the step
        return ""


def _record(function_name: str, call: Any, gpu: str | None) -> None:
    create_table_artifact(
        table=[
            {
                "function": function_name,
                "call_id": call.object_id,
                "gpu": gpu or "",
                "dashboard": _dashboard_url(call),
            }
        ],
        key=f"{CALL_ARTIFACT_PREFIX}{function_name.replace('_', '-')}",
        description=f"Modal call of `{APP_NAME}.{function_name}`; cancel with "
        f"`modal.FunctionCall.from_id('{call.object_id}').cancel()`.",
    )


def run_on_modal(
    function_name: str,
    *,
    gpu: str | None = None,
    poll_s: float | None = None,
    watch: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Spawn ``function_name(**kwargs)`` on the deployed app, record its call id, wait, return.

    The call id goes into a table artifact (key ``modal-call-<function>``) before waiting, so the
    flow's cancellation hook can find it. ``watch`` (e.g. a ``RemoteTrainingProgress``) is called
    every ``poll_s`` seconds (default ``POLL_S``) while the call runs. An interrupt while waiting
    (Prefect's cancellation signal, Ctrl-C) cancels the call before it propagates.

    Raises:
        ModalUnavailableError: the app is not deployed (names the ``modal deploy`` command).
        Exception: whatever the remote function raised, re-raised by Modal.
    """
    import modal.exception

    logger = get_run_logger()
    function = lookup(function_name, gpu)
    try:
        call = function.spawn(**kwargs)
    except modal.exception.NotFoundError as exc:
        raise ModalUnavailableError(
            f"Modal app {APP_NAME!r} has no function {function_name!r}: deploy it with "
            f"`modal deploy tasks/adapters/modal_app.py` ({exc})"
        ) from exc
    _record(function_name, call, gpu)
    logger.info("spawned Modal call %s: %s(%s)", call.object_id, function_name, sorted(kwargs))
    try:
        while True:
            try:
                return call.get(timeout=poll_s or POLL_S)
            # Only the builtin TimeoutError means "not finished yet"; a remote function that ran
            # out of time raises modal.exception.FunctionTimeoutError, which must propagate.
            except TimeoutError:
                if watch is None:
                    logger.info("Modal call %s still running", call.object_id)
                else:
                    watch()
    except Exception:
        raise  # the remote function failed (or the poll did): nothing of ours left to stop here
    except BaseException:  # cancellation (Prefect's TerminationSignal), Ctrl-C, exit
        logger.warning("cancelling Modal call %s", call.object_id)
        call.cancel()
        raise


def cancel_recorded_calls(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow state hook: cancel every Modal call this flow run recorded (idempotent).

    Runs on cancellation, crash and failure (e.g. the classifier failed while the DiT still
    trains), so no GPU keeps running for a finished flow run; cancelling a finished call is a
    no-op.
    """
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(like_=CALL_ARTIFACT_PREFIX),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]),
            )
        )
    for artifact in artifacts:
        for row in _rows(artifact.data):
            call_from_id(row["call_id"]).cancel()


def _rows(data: Any) -> list[dict]:
    rows = json.loads(data) if isinstance(data, str) else data
    return [row for row in rows or [] if isinstance(row, dict) and row.get("call_id")]
