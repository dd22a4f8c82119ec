"""Fetching a source over HTTP from a real server on 127.0.0.1 with injected faults: publish and
reuse, resume with Range, checksums, errors and their classes, timeouts, and the download_file
primitive."""

from __future__ import annotations

import hashlib
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from archive_factory import published, sha256

from data.dataset import DatasetSpec, read_manifest
from data.download import ensure
from data.errors import (
    ChecksumMismatchError,
    PermanentError,
    ServerError,
    SourceNotFoundError,
    SourceUnreachableError,
    TransientError,
    TruncatedDownloadError,
)
from data.fetch import download_file, download_paths, fetch, partial_path


def test_publishes_then_reuses_with_zero_requests(http_server, oxford_tar, tmp_path):
    data_dir = tmp_path / "data"
    spec = DatasetSpec(source=http_server.url("images.tar.gz"), image_sizes=[16])
    ref = ensure(spec, data_dir, workers=1)
    assert http_server.count("images.tar.gz") == 1
    assert ref.classes == ["Abyssinian", "British_Shorthair", "other"]
    assert ref.counts == {"Abyssinian": 4, "British_Shorthair": 4, "other": 6}
    manifest = read_manifest(Path(ref.root))
    assert manifest is not None
    assert manifest.archive.checksum == sha256(oxford_tar)  # none given: sha256 recorded
    assert not manifest.archive.checksum_verified

    again = ensure(spec, data_dir, workers=1)
    assert again == ref
    assert http_server.count() == 1  # the manifest answered; the server saw nothing new


def test_resumes_a_dropped_download_with_range(http_server, oxford_tar, tmp_path):
    http_server.drop("images.tar.gz", after=5000)
    spec = DatasetSpec(
        source=http_server.url("images.tar.gz"), checksum=sha256(oxford_tar), image_sizes=[16]
    )
    ref = ensure(spec, tmp_path / "data", workers=1)
    first, second = http_server.requests
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=5000-"
    assert second.status == 206
    manifest = read_manifest(Path(ref.root))
    assert manifest.archive.checksum_verified
    assert f"sha256:{manifest.archive.sha256}" == sha256(oxford_tar)
    assert sum(ref.counts.values()) == 14


def test_a_server_ignoring_range_restarts_from_zero(http_server, oxford_tar, tmp_path):
    http_server.ranges = False
    http_server.drop("images.tar.gz", after=5000)
    spec = DatasetSpec(source=http_server.url("images.tar.gz"), checksum=sha256(oxford_tar))
    ensure(spec, tmp_path / "data", workers=1)
    assert [r.status for r in http_server.requests] == [200, 200]
    assert http_server.requests[1].headers["Range"] == "bytes=5000-"


def test_a_complete_partial_file_is_finished_without_a_body(http_server, oxford_tar, tmp_path):
    spec = DatasetSpec(source=http_server.url("images.tar.gz"), checksum=sha256(oxford_tar))
    _, part, _ = download_paths(spec, tmp_path / "data" / ".downloads")
    part.parent.mkdir(parents=True)
    part.write_bytes(oxford_tar.read_bytes())  # as if killed between the last byte and the rename
    ensure(spec, tmp_path / "data", workers=1)
    assert [r.status for r in http_server.requests] == [416]


def test_a_body_that_never_arrives_is_a_transient_truncation(http_server, oxford_tar, tmp_path):
    http_server.drop("images.tar.gz", after=0, times=None)
    spec = DatasetSpec(source=http_server.url("images.tar.gz"))
    with pytest.raises(TruncatedDownloadError) as caught:
        ensure(spec, tmp_path / "data", workers=1)
    assert isinstance(caught.value, TransientError)
    assert http_server.count() == 1


def test_wrong_checksum_fails_showing_both_values(http_server, oxford_tar, tmp_path):
    data_dir = tmp_path / "data"
    wrong = "md5:" + "0" * 32
    spec = DatasetSpec(source=http_server.url("images.tar.gz"), checksum=wrong)
    with pytest.raises(ChecksumMismatchError) as caught:
        ensure(spec, data_dir, workers=1)
    actual = hashlib.md5(oxford_tar.read_bytes()).hexdigest()
    assert wrong in str(caught.value) and f"md5:{actual}" in str(caught.value)
    assert isinstance(caught.value, PermanentError)
    assert published(data_dir) == []
    assert not list((data_dir / ".downloads").rglob("*.part"))  # not kept for a resume


@pytest.mark.parametrize(
    ("status", "error"),
    [(404, SourceNotFoundError), (503, ServerError), (429, ServerError), (403, PermanentError)],
)
def test_http_errors_map_to_error_classes(http_server, oxford_tar, tmp_path, status, error):
    http_server.fail("images.tar.gz", status)
    with pytest.raises(error) as caught:
        ensure(DatasetSpec(source=http_server.url("images.tar.gz")), tmp_path / "data", workers=1)
    assert isinstance(caught.value, TransientError) == (status in (503, 429))
    # Only 404/410 say the source is missing; a 403 is a plain PermanentError (access rights).
    assert isinstance(caught.value, SourceNotFoundError) == (status == 404)
    assert f"HTTP {status}" in str(caught.value)
    assert http_server.count() == 1


def test_unreachable_host_fails_fast_naming_host_and_option(tmp_path):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    spec = DatasetSpec(source=f"http://127.0.0.1:{port}/images.tar.gz")
    with pytest.raises(SourceUnreachableError) as caught:
        ensure(spec, tmp_path / "data", workers=1)
    assert time.monotonic() - started < 30
    assert f"127.0.0.1:{port}" in str(caught.value) and "dataset.source" in str(caught.value)


def test_a_silent_server_times_out_as_transient(http_server, oxford_tar, tmp_path):
    http_server.stall("images.tar.gz", seconds=2)
    spec = DatasetSpec(source=http_server.url("images.tar.gz"))
    with pytest.raises(SourceUnreachableError):
        fetch(spec, tmp_path / "downloads", timeout=(1.0, 0.3))


# --- the download primitive itself (also behind the pretrained-weights fetches) ----------------


@pytest.fixture
def blob(http_server, tmp_path) -> tuple[str, bytes]:
    data = np.random.default_rng(0).bytes(300_000)
    (tmp_path / "blob.bin").write_bytes(data)
    return http_server.add("/files/blob.bin", tmp_path / "blob.bin"), data


def test_download_file_without_resume_leaves_nothing_after_a_drop(http_server, blob, tmp_path):
    url, data = blob
    dest = tmp_path / "out" / "blob.bin"
    http_server.drop("/files/blob.bin", after=4096)
    with pytest.raises(TruncatedDownloadError, match=r"cut off at 4096 bytes"):
        download_file(url, dest)
    assert list(dest.parent.iterdir()) == []  # neither dest nor the temporary file
    assert http_server.count() == 1  # no resume without resume=True
    assert download_file(url, dest) == dest
    assert dest.read_bytes() == data
    assert [p.name for p in dest.parent.iterdir()] == ["blob.bin"]


def test_download_file_resumes_a_drop_in_the_same_call(http_server, blob, tmp_path):
    url, data = blob
    dest = tmp_path / "out" / "blob.bin"
    http_server.drop("/files/blob.bin", after=100_000)
    download_file(url, dest, resume=True)
    assert dest.read_bytes() == data and not partial_path(dest).exists()
    assert http_server.requests[1].headers["Range"] == "bytes=100000-"


def test_download_file_deletes_a_body_that_verify_rejects(http_server, blob, tmp_path):
    url, data = blob
    dest = tmp_path / "out" / "blob.bin"
    seen: list[bytes] = []

    def reject(part: Path) -> None:
        seen.append(part.read_bytes())
        raise ChecksumMismatchError("wrong body")

    for resume in (False, True):
        with pytest.raises(ChecksumMismatchError, match="wrong body"):
            download_file(url, dest, resume=resume, verify=reject)
        assert list(dest.parent.iterdir()) == []  # a rejected body is not kept, even to resume
    assert seen == [data, data]


def test_download_file_errors_name_the_url_and_the_callers_way_out(http_server, tmp_path):
    dest = tmp_path / "out" / "x.bin"
    with pytest.raises(
        SourceNotFoundError, match=r"HTTP 404 .*/nope\.bin; check the URL, or use X"
    ):
        download_file(http_server.url("/nope.bin"), dest, hint="use X")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(SourceUnreachableError, match=rf"cannot reach 127\.0\.0\.1:{port} "):
        download_file(f"http://127.0.0.1:{port}/x.bin", dest, timeout=(1.0, 1.0))
    assert time.monotonic() - started < 5
    assert list(dest.parent.iterdir()) == []
