"""Inception-v3 FID and KID (torchmetrics + torch-fidelity), with weights found locally or fetched.

FID and KID here are `tasks.evaluation.metrics.frechet_distance` / `kernel_inception_distance` on the pool-3
features of torchmetrics' `NoTrainInceptionV3`, the network behind its `FrechetInceptionDistance`
(`tests/test_metrics.py` checks that our maths gives torchmetrics' numbers on equal features). One
forward pass then serves both metrics, and KID subsets are seeded. The network is torch-fidelity's
port of the TensorFlow FID Inception, whose weights file (`weights-inception-2015-12-05-6726825d.pth`,
about 92 MB) torch-fidelity would fetch through `torch.hub` with no timeout. Here the file is found,
in this order, before any of that code runs:

1. `$TRAIN_CATS_INCEPTION_WEIGHTS` (or the `weights` argument): a path to that file. Set it on an
   offline machine after copying the file there once.
2. torch's hub cache, `torch.hub.get_dir()/checkpoints/<file name>` (`$TORCH_HOME` moves it): the
   same place torch-fidelity caches it, so either one's download serves both.
3. A download from `$TRAIN_CATS_INCEPTION_URL` (default: torch-fidelity's release URL) into that
   cache, with a 5 s connect timeout so that an offline machine fails in seconds, verified against
   the sha256 prefix in the file name (torch.hub's convention), by `data.fetch.download_file`.
   `TRAIN_CATS_INCEPTION_DOWNLOAD=0` forbids the download.

When none works, `InceptionUnavailable` says why; the evaluation then reports Inception FID/KID
as "not computed" with that reason instead of a number.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from urllib.parse import urlsplit

import torch
from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
from torchmetrics.image.fid import NoTrainInceptionV3

from data.errors import DatasetError
from data.fetch import download_file

WEIGHTS_ENV = "TRAIN_CATS_INCEPTION_WEIGHTS"
URL_ENV = "TRAIN_CATS_INCEPTION_URL"
DOWNLOAD_ENV = "TRAIN_CATS_INCEPTION_DOWNLOAD"
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0
# torch.hub names checked files "<name>-<first hex digits of the sha256>.<ext>".
_HASH_PREFIX = re.compile(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$")


class InceptionUnavailable(RuntimeError):
    """The Inception weights are neither configured, cached nor downloadable."""


def weights_url() -> str:
    """Where the weights are fetched from: `$TRAIN_CATS_INCEPTION_URL` or torch-fidelity's URL."""
    return os.environ.get(URL_ENV) or URL_INCEPTION_V3


def resolve_weights(weights: str | Path | None = None, download: bool | None = None) -> Path:
    """Path of a local Inception weights file, fetching it into torch's hub cache if allowed.

    Args:
        weights: explicit path; default `$TRAIN_CATS_INCEPTION_WEIGHTS`.
        download: allow a download; default: unless `$TRAIN_CATS_INCEPTION_DOWNLOAD` is "0".

    Raises:
        InceptionUnavailable: the configured file is missing, or there is no cached copy and the
            download is disabled, fails (host unreachable within 5 s, HTTP error) or is corrupt.
    """
    configured = weights or os.environ.get(WEIGHTS_ENV)
    if configured:
        path = Path(configured).expanduser()
        if not path.is_file():
            raise InceptionUnavailable(
                f"Inception weights file {path} (from {WEIGHTS_ENV} or --inception-weights) does "
                f"not exist; point it at {Path(urlsplit(URL_INCEPTION_V3).path).name}"
            )
        return path
    url = weights_url()
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlsplit(url).path).name
    if cached.is_file():
        return cached
    if download is None:
        download = os.environ.get(DOWNLOAD_ENV, "1") != "0"
    if not download:
        raise InceptionUnavailable(
            f"no Inception weights: {WEIGHTS_ENV} is unset, {cached} does not exist and "
            f"downloads are disabled (--no-inception-download or {DOWNLOAD_ENV}=0); set {WEIGHTS_ENV} to a local copy of "
            f"{url}"
        )
    _download(url, cached)
    return cached


def _download(url: str, dest: Path) -> None:
    try:
        download_file(
            url,
            dest,
            timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            verify=lambda part: _check_sha256_prefix(part, url),
        )
    except DatasetError as exc:
        raise InceptionUnavailable(
            f"could not download the Inception weights from host {urlsplit(url).netloc} ({url}): "
            f"{exc}. Offline? Set {WEIGHTS_ENV} to a local copy of the file, or {URL_ENV} to a "
            "mirror"
        ) from exc


def _check_sha256_prefix(path: Path, url: str) -> None:
    """Raise `InceptionUnavailable` unless `path`'s sha256 starts with the hex digits that end
    the URL's file name (torch.hub's convention); a name without them is not checked."""
    match = _HASH_PREFIX.search(Path(urlsplit(url).path).name)
    if match is None:
        return
    with open(path, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    if not digest.startswith(match[1]):
        raise InceptionUnavailable(
            f"the Inception weights from {url} are corrupt (sha256 {digest[:16]}…, expected a "
            f"prefix of {match[1]}); retry, or set {WEIGHTS_ENV} to a good copy"
        )


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float in about [0, 1] -> (B, 3, H, W) uint8, clamped first so that values
    outside [0, 1] saturate instead of wrapping around."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def inception_features(
    images: torch.Tensor,
    weights: Path,
    batch_size: int = 32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Pool-3 features of torchmetrics' FID Inception-v3 (torch-fidelity's TF-FID port).

    Args:
        images: (N, 3, H, W) float in [0, 1] (clamped, then rounded to uint8 as the network
            expects); any H, W: the network resizes to 299 px itself.
        weights: the Inception weights file (see `resolve_weights`).
        batch_size: images per forward pass.
        device: where the network runs.

    Returns:
        (N, 2048) float32 features, on the CPU.
    """
    network = NoTrainInceptionV3(
        name="inception-v3-compat",
        features_list=["2048"],
        feature_extractor_weights_path=str(weights),
    ).to(device)
    return torch.cat(
        [network(to_uint8(batch.to(device))).cpu() for batch in images.split(batch_size)]
    )
