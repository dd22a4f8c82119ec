"""Get a verified copy of the source archive: stream it over HTTP (resuming with Range) or read
a local file, then check its digest before anyone extracts it.

HTTP downloads land in `<data_dir>/.downloads/<slug>-<url hash>/<name>`: the body streams into
`<name>.part`, which is renamed to `<name>` only once complete and verified, next to a
`<name>.json` sidecar holding its digests. A later spec for the same source (say, another image
size) reuses the verified file with no network request.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import socket
import sys
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
) -> Archive:
    """Return the spec's archive, verified against `spec.expected_checksum`.

    Raises:
        SourceNotFoundError: HTTP 404/410/other 4xx, or no such local file.
        HostNotFoundError: the host name does not resolve (offline, or a typo).
        SourceUnreachableError: connection refused/reset, a temporary DNS failure, or a timeout.
        ServerError: HTTP 5xx or 429.
        TruncatedDownloadError: the body stayed short after `MAX_RESUMES` resumes.
        ChecksumMismatchError: the digest differs (the bad download is deleted).
    """
    if urlparse(spec.source).scheme in ("http", "https"):
        return _fetch_http(spec, downloads_dir, timeout)
    path = local_path(spec.source)
    if not path.is_file():
        raise SourceNotFoundError(f"no such archive file: {path} (from --source {spec.source!r})")
    return _verified(path, spec.expected_checksum, _digests(path, spec.expected_checksum))


def _fetch_http(spec: DatasetSpec, downloads_dir: Path, timeout: tuple[float, float]) -> Archive:
    url = spec.source
    final, part, sidecar = download_paths(spec, downloads_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Versions of one source are built under different locks, but share this download.
    with filelock.FileLock(final.parent / f"{final.name}.lock"):
        cached = _cached_digests(final, sidecar, url)
        if cached is not None:
            try:
                archive = _verified(final, spec.expected_checksum, cached)
                log.info("reusing the downloaded archive %s", final)
                return archive
            except ChecksumMismatchError:
                log.warning("the kept copy of %s does not match; downloading it again", url)
                sidecar.unlink()
                final.unlink()
        _download(url, part, timeout)
        digests = _digests(part, spec.expected_checksum)
        try:
            archive = _verified(part, spec.expected_checksum, digests)
        except ChecksumMismatchError:
            part.unlink()  # a wrong body must not be resumed or reused
            raise
        part.replace(final)
        sidecar.write_text(json.dumps({"url": url, "bytes": archive.bytes, "digests": digests}))
        return dataclasses.replace(archive, path=final)


def download_paths(spec: DatasetSpec, downloads_dir: Path) -> tuple[Path, Path, Path]:
    """(verified archive, partial download, digest sidecar) paths for an http(s) source."""
    url = spec.source
    name = Path(unquote(urlparse(url).path)).name or "archive"
    folder = downloads_dir / f"{spec.slug()}-{hashlib.sha1(url.encode()).hexdigest()[:10]}"
    return folder / name, folder / f"{name}.part", folder / f"{name}.json"


def _cached_digests(final: Path, sidecar: Path, url: str) -> dict[str, str] | None:
    try:
        meta = json.loads(sidecar.read_text())
        if meta["url"] == url and final.stat().st_size == meta["bytes"]:
            return dict(meta["digests"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _download(url: str, part: Path, timeout: tuple[float, float]) -> None:
    """Stream `url` into `part`, resuming from its current size with an HTTP Range request.

    Inside one call a cut-off body is resumed at once, up to `MAX_RESUMES` times, as long as each
    attempt received new bytes; anything else is left to the caller's retry policy.
    """
    resumes = 0
    while True:
        offset = part.stat().st_size if part.exists() else 0
        try:
            received, complete, cut = _stream_once(url, part, offset, timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            host = urlparse(url).hostname
            if _host_unknown(exc):
                raise HostNotFoundError(
                    f"cannot resolve the host {host!r} of {url} (this machine is offline, or the "
                    "URL has a typo). Pass a reachable URL, a file:// URL or a local path with "
                    "--source (the flow's dataset.source)"
                ) from exc
            # Refused/reset connections, temporary DNS failures and timeouts before the body.
            raise SourceUnreachableError(
                f"cannot reach {urlparse(url).netloc} to download {url}: {exc}. Check the "
                "network, or pass a reachable URL, a file:// URL or a local path with --source"
            ) from exc
        if complete:
            return
        if received > 0 and resumes < MAX_RESUMES:
            resumes += 1
            log.warning(
                "download of %s cut off (%s); resuming (%d/%d)", url, cut, resumes, MAX_RESUMES
            )
            continue
        size = part.stat().st_size if part.exists() else 0
        why = cut or "the body is shorter than its Content-Length"
        raise TruncatedDownloadError(
            f"the download of {url} was cut off at {size} bytes ({why}); "
            "the partial file is kept and the next call resumes it"
        )


def _host_unknown(exc: BaseException) -> bool:
    """True when the error chain holds DNS's definite "no such name" (EAI_NONAME)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, socket.gaierror) and seen.errno == socket.EAI_NONAME:
            return True
        reason = getattr(seen, "reason", None)
        seen = reason if isinstance(reason, BaseException) else seen.__cause__ or seen.__context__
    return False


def _stream_once(
    url: str, part: Path, offset: int, timeout: tuple[float, float]
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
        _raise_for_status(response, url)
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
                desc=part.name.removesuffix(".part"),
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


def _raise_for_status(response: requests.Response, url: str) -> None:
    status = response.status_code
    if status < 400:
        return
    detail = f"HTTP {status} {response.reason} for {url}"
    if status == 429 or status >= 500:
        raise ServerError(f"{detail}; the server is busy or failing, try again later")
    if status in (404, 410):
        raise SourceNotFoundError(f"{detail}; check the URL passed with --source")
    raise PermanentError(f"{detail}; check the URL passed with --source and its access rights")


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
            f"got {algo}:{digests[algo]}. The source changed or is corrupt; fix --source or "
            "pass the right --checksum"
        )
    log.info("checksum ok: %s %s:%s", name, algo, want)
    return Archive(path, size, digests["sha256"], expected, True)
