"""The Inception weights behind FID/KID: fetched from a real server on 127.0.0.1 into torch's hub
cache once, and refused (leaving nothing behind) when corrupt, failing or unreachable."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from tasks.evaluation import inception


def _weights_named_for(tmp_path: Path, body: bytes, *, corrupt: bool = False) -> str:
    digest = hashlib.sha256(body + (b"x" if corrupt else b"")).hexdigest()[:8]
    name = f"weights-test-{digest}.pth"
    (tmp_path / "www" / name).write_bytes(body)
    return name


def test_inception_weights_download_into_the_hub_cache_once(http_server, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    name = _weights_named_for(tmp_path, b"weights" * 1000)
    monkeypatch.setenv(inception.URL_ENV, http_server.url(f"/{name}"))
    path = inception.resolve_weights()
    assert path == tmp_path / "torch-home" / "hub" / "checkpoints" / name
    assert path.read_bytes() == b"weights" * 1000
    assert inception.resolve_weights() == path  # cached: no second request
    assert http_server.count(f"/{name}") == 1


def test_corrupt_or_unreachable_inception_download_fails_fast_and_leaves_nothing(
    http_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    name = _weights_named_for(tmp_path, b"weights", corrupt=True)
    monkeypatch.setenv(inception.URL_ENV, http_server.url(f"/{name}"))
    with pytest.raises(inception.InceptionUnavailable, match="corrupt"):
        inception.resolve_weights()
    assert not list((tmp_path / "torch-home" / "hub" / "checkpoints").iterdir())
    http_server.fail(f"/{name}", 503)
    with pytest.raises(inception.InceptionUnavailable, match="503"):
        inception.resolve_weights()
    # A closed port on 127.0.0.1: refused at once, and the message names the host.
    closed = http_server.url(f"/{name}").replace(f":{http_server.port}", ":9")
    monkeypatch.setenv(inception.URL_ENV, closed)
    started = time.monotonic()
    with pytest.raises(inception.InceptionUnavailable, match=r"host 127\.0\.0\.1:9"):
        inception.resolve_weights()
    assert time.monotonic() - started < inception.CONNECT_TIMEOUT_S + 2
