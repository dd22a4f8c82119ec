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

Spend is bounded per call (``tasks/adapters/limits.py``): each GPU call gets a Modal timeout from
its config's time budget and no Modal-side retries (``with_options``), and a call that has not
started within the queue time (``call_started``) is cancelled.
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
from tasks.adapters.limits import StepLimits
from tasks.paths import APP_NAME, METRICS, PROGRESS_DICT, RUNS_VOLUME

CALL_ARTIFACT_PREFIX = "modal-call-"
POLL_S = 30.0
# A watched call (a training's progress) is polled at least this often: with the container's
# Dict writes every 5 s (modal_app.PROGRESS_EVERY_S), the UI trails a step by 15 s at most.
WATCH_POLL_S = 10.0


class ModalUnavailableError(RuntimeError):
    """``backend="modal"`` was asked for but Modal cannot be used (no credentials, app not deployed)."""


class QueueTimeoutError(RuntimeError):
    """A Modal call got no container (no GPU free) within the flow's ``compute.max_queue_minutes``."""


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


def lookup(function_name: str, **options: Any) -> Any:
    """The deployed ``train-cats`` function ``function_name``, with per-call ``options``.

    ``options`` go to ``Function.with_options`` (``gpu``, ``timeout`` in seconds, ``retries``), so
    the GPU and the timeout follow each run's parameters with no redeploy.
    """
    import modal

    function = modal.Function.from_name(APP_NAME, function_name)
    return function.with_options(**options) if options else function


def call_started(call: Any) -> bool | None:
    """Whether Modal has given ``call`` a container yet: True, False, or None when it cannot tell.

    Modal's client has no "running" status; its call graph (``FunctionCall.get_call_graph``, see
    https://modal.com/docs/reference/modal.call_graph) lists each input with a ``task_id`` (the
    container it was assigned to, empty while queued) and a status (``PENDING`` until it ends).
    Modal calls that graph best-effort and not real-time, so an empty graph or an API error is
    "cannot tell" (None), never "not started": the caller must not cancel a call on missing
    information.
    """
    from modal.call_graph import InputStatus

    try:
        graph = call.get_call_graph()
    except Exception as exc:
        get_run_logger().warning("could not read the call graph of %s: %s", call.object_id, exc)
        return None
    inputs = [i for i in _walk(graph) if i.function_call_id == call.object_id]
    if not inputs:
        return None
    return any(i.task_id or i.status != InputStatus.PENDING for i in inputs)


def _walk(nodes: list) -> list:
    return [n for node in nodes for n in (node, *_walk(node.children))]


def is_infrastructure_error(exc: BaseException) -> bool:
    """True for a failure of Modal's infrastructure that reached the client, worth one retry.

    Only ``modal.exception.InternalFailure`` ("retriable internal error"): preemption and crashed
    containers are restarted by Modal itself, and anything else is the project's own error (a bad
    config, a NaN loss, a bug), a timeout or a cancellation, which a retry would only repeat.
    """
    import modal.exception

    return isinstance(exc, modal.exception.InternalFailure)


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


def list_volume_dir(volume: str, path: str) -> list[str]:
    """The names in folder ``path`` (relative to the volume root) of the named volume; [] when
    there is no such folder."""
    import modal
    import modal.exception

    try:
        entries = modal.Volume.from_name(volume).listdir(path)
    except (FileNotFoundError, modal.exception.NotFoundError):
        return []
    return sorted(entry.path.rstrip("/").rsplit("/", 1)[-1] for entry in entries)


def modal_dict(name: str) -> Any:
    """The named Modal Dict (``modal.Dict.from_name``), created if missing."""
    import modal

    return modal.Dict.from_name(name, create_if_missing=True)


class RemoteTrainingProgress:
    """Keeps a progress artifact current for a training running on Modal, from the client side.

    Called between polls of the Modal call: it reads the newest progress row that the container
    put in the ``train-cats-progress`` Dict under the run name (every few seconds,
    ``tasks.adapters.modal_app.PROGRESS_EVERY_S``) and reports it as step/total_steps. Without one
    (an older deployment, a failed Dict read) it falls back to the newest ``train`` row of the
    run's ``metrics.jsonl`` on the runs volume, committed every few minutes
    (``tasks.adapters.modal_app.COMMIT_EVERY_S``); without either, to the time since the spawn
    against the config's time budget (minutes; None: elapsed time only). A row left from an
    earlier call with the same run name is dropped when this starts and once it finishes.
    """

    def __init__(self, label: str, run_name: str, budget_minutes: float | None):
        self.label = f"{label} (Modal)"
        self.artifact = monitoring.ProgressArtifact(self.label)
        self.key = run_name
        self.path = f"{run_name}/{METRICS}"
        self.budget_s = None if budget_minutes is None else budget_minutes * 60.0
        self.t0 = time.monotonic()
        self._forget()

    def _forget(self) -> None:
        try:
            modal_dict(PROGRESS_DICT).pop(self.key, None)
        except Exception as exc:  # progress is a convenience: never fail the step for it
            get_run_logger().warning("could not clear progress %s in %s: %s", self.key,
                                     PROGRESS_DICT, exc)  # fmt: skip

    def _dict_row(self) -> dict | None:
        try:
            return modal_dict(PROGRESS_DICT).get(self.key)
        except Exception as exc:
            get_run_logger().warning("could not read progress %s from %s: %s", self.key,
                                     PROGRESS_DICT, exc)  # fmt: skip
            return None

    def _newest_row(self) -> dict | None:
        row = self._dict_row()
        if row is not None:
            return row
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
        self._forget()


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
    limits: StepLimits | None = None,
    poll_s: float | None = None,
    watch: Callable[[], None] | None = None,
    **kwargs: Any,
) -> Any:
    """Spawn ``function_name(**kwargs)`` on the deployed app, record its call id, wait, return.

    With ``limits`` (a GPU step) the call runs on ``limits.gpu`` with ``limits.modal_timeout_s``
    (seconds) and no Modal-side retries, and is cancelled if it has not started within
    ``limits.max_queue_s`` seconds. The call id goes into a table artifact (key
    ``modal-call-<function>``) before waiting, so the flow's cancellation hook can find it.
    ``watch`` (e.g. a ``RemoteTrainingProgress``) is called every ``poll_s`` seconds (default
    ``POLL_S``; with a ``watch``, at most ``WATCH_POLL_S``) while the call runs. Whatever ends the
    wait early (the queue time, a failed poll, Prefect's timeout or cancellation, Ctrl-C) cancels
    the call before it propagates.

    Raises:
        ModalUnavailableError: the app is not deployed (names the ``modal deploy`` command).
        QueueTimeoutError: the call did not start within ``limits.max_queue_s``.
        Exception: whatever the remote function raised, re-raised by Modal.
    """
    import modal.exception

    logger = get_run_logger()
    options: dict[str, Any] = {}
    if limits is not None:
        # retries=0 also overrides a stale deployment that still declares retries.
        options = dict(gpu=limits.gpu, timeout=limits.modal_timeout_s, retries=0)
    function = lookup(function_name, **options)
    try:
        call = function.spawn(**kwargs)
    except modal.exception.NotFoundError as exc:
        raise ModalUnavailableError(
            f"Modal app {APP_NAME!r} has no function {function_name!r}: deploy it with "
            f"`modal deploy tasks/adapters/modal_app.py` ({exc})"
        ) from exc
    _record(function_name, call, options.get("gpu"))
    logger.info("spawned Modal call %s: %s(%s) %s", call.object_id, function_name, sorted(kwargs),
                options)  # fmt: skip
    try:
        poll_s = poll_s or (min(POLL_S, WATCH_POLL_S) if watch is not None else POLL_S)
        return _wait(call, function_name, limits, poll_s, watch)
    except BaseException as exc:  # cancelling a finished call is a no-op, so cancel on every path
        logger.warning("cancelling Modal call %s (%s)", call.object_id, type(exc).__name__)
        call.cancel()
        raise


def _wait(
    call: Any,
    function_name: str,
    limits: StepLimits | None,
    poll_s: float,
    watch: Callable[[], None] | None,
) -> Any:
    logger = get_run_logger()
    t0 = time.monotonic()
    started = None if limits is not None else True
    while True:
        waited = time.monotonic() - t0
        timeout = poll_s
        if not started and limits is not None:  # look again at the end of the queue time
            timeout = max(0.0, min(poll_s, limits.max_queue_s - waited)) or poll_s
        try:
            return call.get(timeout=timeout)
        # Only the builtin TimeoutError means "not finished yet"; a remote function that ran
        # out of time raises modal.exception.FunctionTimeoutError, which must propagate.
        except TimeoutError:
            pass
        if not started and limits is not None:
            started = call_started(call)
            waited = time.monotonic() - t0
            if started is False and waited >= limits.max_queue_s:
                raise QueueTimeoutError(
                    f"Modal call {call.object_id} ({function_name} on {limits.gpu}) did not start "
                    f"within {limits.max_queue_s / 60:g} min (no {limits.gpu} free?), so it was "
                    "cancelled: raise compute.max_queue_minutes or choose another compute.gpu"
                )
            if started:
                logger.info("Modal call %s started after %.0f s", call.object_id, waited)
        if watch is None:
            logger.info("Modal call %s still %s", call.object_id,
                        "running" if started else "waiting for a container")  # fmt: skip
        else:
            watch()


def cancel_recorded_calls(flow: Any, flow_run: Any, state: Any) -> None:
    """Flow state hook: cancel every Modal call this flow run recorded (idempotent).

    Runs on cancellation, crash and failure (e.g. the classifier failed while the DiT still
    trains), so no GPU keeps running for a finished flow run; cancelling a finished call is a
    no-op.
    """
    cancel_flow_run_calls(flow_run.id)


def cancel_flow_run_calls(flow_run_id: Any) -> list[str]:
    """Cancel every Modal call recorded by the flow run ``flow_run_id``; returns their call ids."""
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(like_=CALL_ARTIFACT_PREFIX),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    ids = [row["call_id"] for artifact in artifacts for row in _rows(artifact.data)]
    for call_id in ids:
        call_from_id(call_id).cancel()
    return ids


def _rows(data: Any) -> list[dict]:
    rows = json.loads(data) if isinstance(data, str) else data
    return [row for row in rows or [] if isinstance(row, dict) and row.get("call_id")]
