"""Has the source changed? One cheap question before a scheduled retraining.

An http(s) source is asked with a conditional HEAD request (RFC 9110 §13.1: `If-None-Match` with
the ETag seen last time, else `If-Modified-Since` with its Last-Modified): 304 means unchanged,
and no byte of the archive moves. A server that refuses HEAD (405/501) is asked with a
conditional GET whose body is never read. A local archive is identified by its sha256 (seconds
for the 792 MB Oxford archive). The answer is a `Revision`, whose `value` goes into
`DatasetSpec.source_revision` so that a changed archive publishes a new dataset version.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlparse

import requests

from data.dataset import DatasetSpec, local_path
from data.errors import SourceNotFoundError
from data.fetch import CONNECT_TIMEOUT_S, SOURCE_HINT, connection_error, raise_for_status

ETAG, LAST_MODIFIED, SHA256 = "etag:", "last-modified:", "sha256:"


@dataclass(frozen=True)
class Revision:
    """`value`: `etag:<ETag>`, `last-modified:<date>` or `sha256:<hex>`; None when the server
    gives no validator (then nothing can be compared and `changed` is None). `changed`: against
    the `previous` value asked about (True when there was none). `requests`: HTTP requests made."""

    value: str | None
    changed: bool | None
    requests: int


def source_revision(
    spec: DatasetSpec, previous: str | None = None, timeout_s: float = CONNECT_TIMEOUT_S
) -> Revision:
    """The revision of `spec.source` now, and whether it differs from `previous`.

    Raises:
        HostNotFoundError, SourceUnreachableError, ServerError, SourceNotFoundError,
        PermanentError: as a download of the source would (data.errors), in `timeout_s`.
    """
    if urlparse(spec.source).scheme not in ("http", "https"):
        path = local_path(spec.source)
        if not path.is_file():
            raise SourceNotFoundError(f"{path} does not exist (from dataset.source {spec.source!r})")
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
        value = SHA256 + digest.hexdigest()
        return Revision(value, value != previous, 0)
    headers = {}
    if previous and previous.startswith(ETAG):
        headers["If-None-Match"] = previous.removeprefix(ETAG)
    elif previous and previous.startswith(LAST_MODIFIED):
        headers["If-Modified-Since"] = previous.removeprefix(LAST_MODIFIED)
    response, made = _ask(spec.source, headers, timeout_s)
    if response.status_code == 304:
        return Revision(previous, False, made)
    raise_for_status(response, spec.source, f", or {SOURCE_HINT}")
    etag, modified = response.headers.get("ETag"), response.headers.get("Last-Modified")
    value = ETAG + etag if etag else LAST_MODIFIED + modified if modified else None
    return Revision(value, None if value is None else value != previous, made)


def _ask(url: str, headers: dict[str, str], timeout_s: float) -> tuple[requests.Response, int]:
    """HEAD, or GET without reading the body where HEAD is refused; (response, requests made)."""
    made = 0
    try:
        for method in ("HEAD", "GET"):
            made += 1
            with requests.request(
                method, url, headers=headers, timeout=timeout_s, stream=True, allow_redirects=True
            ) as response:
                if response.status_code not in (405, 501):
                    return response, made
        return response, made
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise connection_error(exc, url, "check", f", or {SOURCE_HINT}") from exc
