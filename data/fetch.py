"""Get a verified copy of the source archive: stream it over HTTP (resuming with Range) or read
a local file, then check its digest before anyone extracts it.

HTTP downloads land in `<data_dir>/.downloads/<slug>-<url hash>/<name>`: the body streams into
`<name>.part`, which is renamed to `<name>` only once complete and verified, next to a
`<name>.json` sidecar holding its digests. A later spec for the same source (say, another image
size) reuses the verified file with no network request. Callers for one URL take turns on a lock
file in `<data_dir>/.locks/`; a failed download removes its folder unless it keeps a partial file
to resume.

`download_file` is the one HTTP download primitive of the project (streaming, progress bar,
fail-fast timeouts, errors naming the host, temporary file then rename, optional Range resume):
the archive fetch here uses it, and so do the pretrained-weights fetches in
`tasks.training.pretrained`
and `tasks.evaluation.inception`, which translate its `data.errors` into their own error types.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import filelock
import requests
import urllib3
from tqdm import tqdm

from data.dataset import DatasetSpec, local_path
from data.errors import (
    ChecksumMismatchError,
    HostNotFoundError,
    PermanentError,
    ServerError,
    SourceNotFoundError,
    SourceUnreachableError,
    TruncatedDownloadError,
)

log = logging.getLogger(__name__)

# A short connect timeout makes an unreachable host fail fast; the read timeout is the longest
# silence tolerated between two chunks of the body.
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 60.0
# Consecutive resumes allowed inside one call, each of which must have received new bytes.
MAX_RESUMES = 5
CHUNK_BYTES = 1 << 20
# The way out of a bad archive URL, for the errors that name it.
SOURCE_HINT = "pass a reachable URL, a file:// URL or a local path as dataset.source"


@dataclass(frozen=True)
class Archive:
    """A complete, verified archive on local disk."""

    path: Path
    bytes: int
    sha256: str
    checksum: str  # ALGO:HEX that was verified, or "sha256:<hex>" when none was expected
    checksum_verified: bool


def fetch(
    spec: DatasetSpec,
    downloads_dir: Path,
    *,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    locks_dir: Path | None = None,
) -> Archive:
    """Return the spec's archive, verified against `spec.expected_checksum`.

    An http(s) source is downloaded into its own folder under `downloads_dir`, under a lock file
    in `locks_dir` (default `downloads_dir/.locks`) that concurrent callers for the same URL share.
    A failed download leaves that folder only if it holds a partial file to resume.

    Raises:
        SourceNotFoundError: HTTP 404/410, or no such local file.
        PermanentError: any other HTTP 4xx (403 and the like: access rights, not a missing file).
        HostNotFoundError: the host name does not resolve (offline, or a typo).
        SourceUnreachableError: connection refused/reset, a temporary DNS failure, or a timeout.
        ServerError: HTTP 5xx or 429.
        TruncatedDownloadError: the body stayed short after `MAX_RESUMES` resumes.
        ChecksumMismatchError: the digest differs (the bad download is deleted).
    """
    if urlparse(spec.source).scheme in ("http", "https"):
        return _fetch_http(spec, downloads_dir, locks_dir or downloads_dir / ".locks", timeout)
    path = local_path(spec.source)
    if not path.is_file():
        what = "is a directory, not an archive file" if path.is_dir() else "does not exist"
        raise SourceNotFoundError(f"{path} {what} (from dataset.source {spec.source!r})")
    return _verified(path, spec.expected_checksum, _digests(path, spec.expected_checksum))


def _fetch_http(
    spec: DatasetSpec, downloads_dir: Path, locks_dir: Path, timeout: tuple[float, float]
) -> Archive:
    final, _, _ = download_paths(spec, downloads_dir)
    locks_dir.mkdir(parents=True, exist_ok=True)
    # Versions of one source are built under different locks, but share this download. The lock
    # file lives outside the download's folder so that a failure can remove the folder: a lock
    # file must never be deleted (see data.staging).
    with filelock.FileLock(locks_dir / f"download-{final.parent.name}.lock"):
        try:
            return _fetch_http_locked(spec, downloads_dir, timeout)
        except BaseException:
            with contextlib.suppress(OSError):  # not empty: a partial file kept for a resume
                final.parent.rmdir()
            raise


def _fetch_http_locked(
    spec: DatasetSpec, downloads_dir: Path, timeout: tuple[float, float]
) -> Archive:
    url = spec.source
    final, _, sidecar = download_paths(spec, downloads_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    cached = _cached_digests(final, sidecar, url, spec.source_revision)
    if cached is not None:
        try:
            archive = _verified(final, spec.expected_checksum, cached)
            log.info("reusing the downloaded archive %s", final)
            return archive
        except ChecksumMismatchError:
            log.warning("the kept copy of %s does not match; downloading it again", url)
            sidecar.unlink()
            final.unlink()
    checked: list[tuple[Archive, dict[str, str]]] = []

    def verify(part: Path) -> None:
        digests = _digests(part, spec.expected_checksum)
        checked.append((_verified(part, spec.expected_checksum, digests), digests))

    download_file(url, final, timeout=timeout, resume=True, verify=verify, hint=SOURCE_HINT)
    archive, digests = checked[0]
    meta = {"url": url, "bytes": archive.bytes, "digests": digests}
    sidecar.write_text(json.dumps({**meta, "revision": spec.source_revision}))
    return dataclasses.replace(archive, path=final)


def download_paths(spec: DatasetSpec, downloads_dir: Path) -> tuple[Path, Path, Path]:
    """(verified archive, partial download, digest sidecar) paths for an http(s) source."""
    url = spec.source
    name = Path(unquote(urlparse(url).path)).name or "archive"
    folder = downloads_dir / f"{spec.slug()}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"
    return folder / name, partial_path(folder / name), folder / f"{name}.json"


def partial_path(dest: Path) -> Path:
    """Where a resumable download of `dest` keeps its bytes until complete: `<dest>.part`."""
    return dest.with_name(f"{dest.name}.part")


def _cached_digests(
    final: Path, sidecar: Path, url: str, revision: str | None
) -> dict[str, str] | None:
    """The kept download's digests, if it is `url`'s, complete, and (when a revision is asked
    for) of that revision: a changed upstream archive is downloaded again."""
    try:
        meta = json.loads(sidecar.read_text())
        same_revision = revision is None or meta.get("revision") == revision
        if meta["url"] == url and final.stat().st_size == meta["bytes"] and same_revision:
            return dict(meta["digests"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def download_file(
    url: str,
    dest: Path,
    *,
    timeout: tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
    resume: bool = False,
    verify: Callable[[Path], object] | None = None,
    hint: str = "",
) -> Path:
    """Download `url` to `dest` atomically: `dest` appears only complete and verified, or not at all.

    The body streams (with a tqdm bar on stderr) into a temporary file beside `dest`, on the same
    filesystem, which is renamed to `dest` once complete and accepted by `verify`.

    Args:
        url: an http(s) URL.
        dest: the file to create or replace; its folder is created if needed.
        timeout: (connect, read) seconds. The connect timeout makes an offline machine fail fast;
            the read timeout is the longest silence tolerated between two chunks, not a limit on
            the whole file.
        resume: keep the partial file (`partial_path(dest)`) across failures and continue it with
            an HTTP Range request, both at once inside this call (up to `MAX_RESUMES` times, each
            after new bytes arrived) and in the next call. The caller must keep two calls for one
            `dest` apart (a file lock). Without it the temporary file is unique to this call and
            deleted on any failure, and a cut-off body is an error at once.
        verify: called with the complete temporary file before the rename; whatever it raises
            propagates, and the file is deleted (a wrong body must be neither resumed nor reused).
        hint: the way out of a bad URL, for the caller's user (say "pass ... as dataset.source");
            appended to the errors about the URL.

    Returns:
        `dest`.

    Raises:
        HostNotFoundError: the host name does not resolve (offline, or a typo).
        SourceUnreachableError: connection refused/reset, a temporary DNS failure, or a timeout.
        ServerError: HTTP 5xx or 429.
        SourceNotFoundError: HTTP 404/410.
        PermanentError: any other HTTP 4xx.
        TruncatedDownloadError: the body stayed short of its Content-Length.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if resume:
        part = partial_path(dest)
    else:
        handle, name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        os.close(handle)
        part = Path(name)
    try:
        _download(url, part, dest.name, timeout, resume=resume, hint=hint)
    except BaseException:
        if not resume:
            part.unlink(missing_ok=True)
        raise
    try:
        if verify is not None:
            verify(part)
        part.replace(dest)
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return dest


def _download(
    url: str, part: Path, label: str, timeout: tuple[float, float], *, resume: bool, hint: str
) -> None:
    """Stream `url` into `part`; with `resume`, from its current size with an HTTP Range request.

    With `resume`, a cut-off body is resumed at once, up to `MAX_RESUMES` times, as long as each
    attempt received new bytes; anything else is left to the caller's retry policy.
    """
    or_hint = f", or {hint}" if hint else ""
    resumes = 0
    while True:
        offset = part.stat().st_size if resume and part.exists() else 0
        try:
            received, complete, cut = _stream_once(url, part, label, offset, timeout, or_hint)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise connection_error(exc, url, "download", or_hint) from exc
        if complete:
            return
        if resume and received > 0 and resumes < MAX_RESUMES:
            resumes += 1
            log.warning(
                "download of %s cut off (%s); resuming (%d/%d)", url, cut, resumes, MAX_RESUMES
            )
            continue
        size = part.stat().st_size if part.exists() else 0
        why = cut or "the body is shorter than its Content-Length"
        kept = "; the partial file is kept and the next call resumes it" if resume else ""
        raise TruncatedDownloadError(
            f"the download of {url} was cut off at {size} bytes ({why}){kept}"
        )


def connection_error(exc: BaseException, url: str, doing: str, or_hint: str) -> Exception:
    """The data error for a request to `url` (made to `doing` it) that got no answer:
    HostNotFoundError when DNS says the name does not exist, else SourceUnreachableError
    (refused/reset connections, temporary DNS failures, timeouts: worth a retry)."""
    if host_unknown(exc):
        return HostNotFoundError(
            f"cannot resolve the host {urlparse(url).hostname!r} of {url} (this machine "
            f"is offline, or the URL has a typo); check the URL{or_hint}"
        )
    return SourceUnreachableError(
        f"cannot reach {urlparse(url).netloc} to {doing} {url}: {exc}. Check the network{or_hint}"
    )


def host_unknown(exc: BaseException) -> bool:
    """True when the error chain holds DNS's definite "no such name" (EAI_NONAME)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.errno == socket.EAI_NONAME:
            return True
        reason = getattr(seen, "reason", None)
        seen = reason if isinstance(reason, BaseException) else seen.__cause__ or seen.__context__
    return False


def _stream_once(
    url: str, part: Path, label: str, offset: int, timeout: tuple[float, float], or_hint: str
) -> tuple[int, bool, Exception | None]:
    """One GET from `offset`: (bytes received, body complete, the error that cut it off)."""
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, headers=headers, stream=True, timeout=timeout) as response:
        if response.status_code == 416 and offset:
            # Nothing past our offset. If that is the whole file (a crash between the last byte
            # and the rename), it is complete; otherwise the partial file is unusable.
            if response.headers.get("Content-Range") == f"bytes */{offset}":
                return 0, True, None
            log.warning("server rejected Range bytes=%d- for %s; restarting", offset, url)
            part.unlink()
            return offset, False, None
        raise_for_status(response, url, or_hint)
        if offset and response.status_code != 206:
            log.warning("server ignored the Range request for %s; restarting from byte 0", url)
            offset = 0
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        received, cut = 0, None
        with (
            open(part, "r+b" if offset else "wb") as handle,
            tqdm(
                total=total,
                initial=offset,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=label,
                file=sys.stderr,
                mininterval=1.0,
            ) as bar,
        ):
            handle.seek(offset)
            handle.truncate()
            try:
                # read1 hands over every byte that arrived before a drop (a plain read(n) loses
                # its partial buffer), and decode_content=False keeps the archive's own bytes
                # even when a server labels a .tar.gz "Content-Encoding: gzip".
                while chunk := response.raw.read1(CHUNK_BYTES, decode_content=False):
                    handle.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                cut = exc
        return received, cut is None and (total is None or offset + received == total), cut


def raise_for_status(response: requests.Response, url: str, or_hint: str) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = f"HTTP {status} {response.reason} for {url}"
    if status == 429 or status >= 500:
        raise ServerError(f"{detail}; the server is busy or failing, try again later")
    if status in (404, 410):
        raise SourceNotFoundError(f"{detail}; check the URL{or_hint}")
    raise PermanentError(f"{detail}; check the URL and its access rights{or_hint}")


def _digests(path: Path, expected: str | None) -> dict[str, str]:
    """sha256 (always recorded) plus the expected checksum's algorithm, in one read."""
    algos = {"sha256"} | ({expected.split(":", 1)[0]} if expected else set())
    hashers = {algo: hashlib.new(algo) for algo in sorted(algos)}
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            for hasher in hashers.values():
                hasher.update(block)
    return {algo: hasher.hexdigest() for algo, hasher in hashers.items()}


def _verified(path: Path, expected: str | None, digests: dict[str, str]) -> Archive:
    size = path.stat().st_size
    name = path.name.removesuffix(".part")
    if expected is None:
        log.info("no checksum known for %s; recording its sha256 %s", name, digests["sha256"])
        return Archive(path, size, digests["sha256"], f"sha256:{digests['sha256']}", False)
    algo, want = expected.split(":", 1)
    if algo not in digests:
        digests = _digests(path, expected)
    if digests[algo] != want:
        raise ChecksumMismatchError(
            f"checksum mismatch for {name} ({size} bytes): expected {algo}:{want}, "
            f"got {algo}:{digests[algo]}. The source changed or is corrupt; fix dataset.source "
            "or pass the right dataset.checksum"
        )
    log.info("checksum ok: %s %s:%s", name, algo, want)
    return Archive(path, size, digests["sha256"], expected, True)
