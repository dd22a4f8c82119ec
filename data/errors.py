"""Errors raised while getting and publishing a data set.

They split into two families so that callers can choose a retry policy by type alone:
`TransientError` (the same call may succeed later: the network, the server's load) and
`PermanentError` (retrying cannot help: wrong checksum, missing file, broken archive, bad input).
`tasks.adapters.prefect_tasks.ensure_dataset` retries the first family only.
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
import typing
from collections.abc import Mapping

# What the data layer's messages call the spec's fields, as a flow deployment's user sets them;
# each command line prints them as its flags (`in_flags`).
DATASET_FLAGS = {
    "dataset.source": "--source",
    "dataset.checksum": "--checksum",
    "dataset.labels": "--labels",
}


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
    text spans several lines per error); any other exception as its message, lines joined."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    parts = []
    for error in errors():
        where = ".".join(str(p) for p in error["loc"])
        reason = str(error["msg"]).removeprefix("Value error, ")
        parts.append(f"{where}: {reason}" if where else reason)
    return "; ".join(parts)


def in_flags(message: str, flags: Mapping[str, str]) -> str:
    """`message` in a command line's words: each parameter path that `flags` maps (e.g.
    ``dataset.source``) replaced by its flag (``--source``). Messages name parameter paths, the
    words of a deployment run, so that only the command lines translate."""
    for path, flag in flags.items():
        message = re.sub(rf"(?<![\w.-]){re.escape(path)}(?!\w)", flag, message)
    return message


def print_error(
    prefix: str, exc: BaseException, verbose: bool = False, flags: Mapping[str, str] | None = None
) -> None:
    """End a command line on `exc`: one line on stderr, `prefix` and the error in the words of
    `flags`; with `verbose`, the full traceback before it."""
    if verbose:
        traceback.print_exception(exc)
    print(f"{prefix}{in_flags(one_line(exc), flags or {})}", file=sys.stderr)


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors (an unknown flag, a bad choice, a missing value) end
    on one line with the way to the full usage, instead of the usage block and then the error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")
