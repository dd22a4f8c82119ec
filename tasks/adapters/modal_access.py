"""Whether this process can use Modal, for ``compute.backend="auto"``: where the Modal client's
credentials come from, and whether the app is deployed (one Modal API call, bounded in time); and
the run's report of the backend it chose and why (a log line and the ``backend`` artifact).

The choice itself is ``flows.parameters.resolve_backend``; tests stand in for
``hydrate_function``, the one call that reaches Modal.
"""

from __future__ import annotations

import os
import threading

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact

from tasks.adapters.modal_calls import ModalUnavailableError, modal_credentials_present
from tasks.paths import APP_NAME

# The app check's one Modal API call answers in about a second; offline, Modal's client retries
# for about a minute before it gives up, so the check stops waiting after this many seconds.
APP_CHECK_TIMEOUT_S = 20.0


def modal_credentials_source() -> str | None:
    """Where the Modal client's token comes from, in words, or None when it has no token. The
    token id is named (it identifies the token; the secret is never shown)."""
    if not modal_credentials_present():
        return None
    if os.environ.get("MODAL_TOKEN_ID") and os.environ.get("MODAL_TOKEN_SECRET"):
        return (
            f"the environment (MODAL_TOKEN_ID={os.environ['MODAL_TOKEN_ID']}, MODAL_TOKEN_SECRET)"
        )
    from modal.config import user_config_path

    return user_config_path.replace(os.path.expanduser("~"), "~", 1)


def hydrate_function(function_name: str) -> None:
    """Look ``function_name`` up in the deployed app: one Modal API call (``NotFoundError`` when
    the app or the function is not deployed). Tests stand in for it."""
    import modal

    modal.Function.from_name(APP_NAME, function_name).hydrate()


def require_app_deployed(
    credentials: str, function_name: str = "train_dit", timeout_s: float | None = None
) -> None:
    """Fail at once, on one line, unless Modal accepts the ``credentials`` (where they came from,
    for the message) and the app is deployed; waits at most ``timeout_s`` (default
    ``APP_CHECK_TIMEOUT_S``) for Modal to answer.

    Raises:
        ModalUnavailableError: the app is not deployed (naming the ``modal deploy`` command),
            Modal refused the token, or it did not answer (offline) in time.
    """
    import modal.exception

    timeout_s = APP_CHECK_TIMEOUT_S if timeout_s is None else timeout_s
    outcome: list[BaseException | None] = []

    def check() -> None:
        try:
            hydrate_function(function_name)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    # A daemon thread, so a Modal client stuck in its retries never holds the process open.
    thread = threading.Thread(target=check, name="modal-app-check", daemon=True)
    thread.start()
    thread.join(timeout_s)
    found = f"Modal credentials from {credentials}"
    if not outcome:
        why = f"the Modal API did not answer within {timeout_s:g} s (offline?)"
    elif outcome[0] is None:
        return
    elif isinstance(outcome[0], modal.exception.NotFoundError):
        raise ModalUnavailableError(
            f"{found}, but the Modal app {APP_NAME!r} is not deployed: run `modal deploy "
            "tasks/adapters/modal_app.py` with them, or set compute.backend='local'"
        ) from outcome[0]
    elif isinstance(outcome[0], modal.exception.AuthError):
        why = f"Modal refused them ({_first_line(outcome[0])})"
    else:
        why = f"Modal could not be asked ({type(outcome[0]).__name__}: {_first_line(outcome[0])})"
    raise ModalUnavailableError(
        f"{found}, but {why}: check the network and the token, or set compute.backend='local'"
    ) from (outcome[0] if outcome else None)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0]


def report_backend(backend: str, reason: str) -> None:
    """Log and publish (artifact ``backend``) where this run's steps run and why."""
    get_run_logger().info("backend %s: %s", backend, reason)
    create_markdown_artifact(
        markdown=f"**Backend: {backend}**: {reason}",
        key="backend",
        description="Where this run's steps ran (compute.backend) and why",
    )
