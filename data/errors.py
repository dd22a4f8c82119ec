"""Errors raised while getting and publishing a data set.

They split into two families so that callers can choose a retry policy by type alone:
`TransientError` (the same call may succeed later: the network, the server's load) and
`PermanentError` (retrying cannot help: wrong checksum, missing file, broken archive, bad input).
`tasks.adapters.prefect_tasks.ensure_dataset` retries the first family only.
"""

from __future__ import annotations


class DatasetError(Exception):
    """Base class of every error raised by the `data` package."""


class TransientError(DatasetError):
    """A failure that may go away if the same call is repeated later."""


class PermanentError(DatasetError):
    """A failure that repeating the call cannot fix."""


class SourceUnreachableError(TransientError):
    """Connecting to, or reading from, the source's host failed or timed out."""


class ServerError(TransientError):
    """The server answered HTTP 5xx or 429 (overloaded or rate-limited)."""


class TruncatedDownloadError(TransientError):
    """The body ended before the announced length; the partial file is kept for a resume."""


class HostNotFoundError(PermanentError):
    """The source's host name does not resolve: offline, or a typo in the URL.

    Permanent on purpose: a name that DNS says does not exist will not appear within a retry's
    backoff, and an offline machine should fail in seconds, not after minutes of retries. A
    temporary resolver failure (EAI_AGAIN) stays a `SourceUnreachableError`.
    """


class SourceNotFoundError(PermanentError):
    """The source does not exist (HTTP 404/410, or a missing local file)."""


class ChecksumMismatchError(PermanentError):
    """The archive's digest differs from the expected one."""


class InvalidArchiveError(PermanentError):
    """The archive cannot be read, is unsafe, or holds no usable classes."""


def one_line(exc: Exception) -> str:
    """A pydantic ValidationError as one line, `field: reason; field: reason` (pydantic's own
    text spans several lines per error); any other exception as its message."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error["loc"])
        reason = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {reason}" if where else reason)
    return "; ".join(parts)
