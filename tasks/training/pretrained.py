"""Pretrained ImageNet weights for the classifier's backbone: cache, then fetch.

Weights come from torchvision's weight files (``<Weights>.url``) into torch's hub cache,
``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``), the same file name and place torchvision
uses, so a cache filled by torchvision is reused and vice versa. The fetch is the project's
download primitive ``data.fetch.download_file``. Set ``TRAIN_CATS_TORCHVISION_WEIGHTS_URL`` to a
mirror's base URL (default ``https://download.pytorch.org/models/``) to fetch from elsewhere.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import torch

from data.errors import DatasetError
from data.fetch import download_file
from models import classifier
from models.classifier import BACKBONES, Classifier, require_imagenet_weights

WEIGHTS_URL_ENV = "TRAIN_CATS_TORCHVISION_WEIGHTS_URL"
DEFAULT_WEIGHTS_URL = "https://download.pytorch.org/models/"
# Connect quickly or give up: offline, a fetch must fail in seconds, not hang. The read timeout
# is per chunk, not for the whole file.
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 60.0


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights could be neither found in the cache nor downloaded."""


def build_classifier(
    backbone: str,
    num_classes: int,
    pretrained: bool = False,
    small_input_stem: bool = False,
    test_time_flip: bool = False,
) -> Classifier:
    """``models.classifier.build_classifier``, with the ImageNet weights fetched first when
    ``pretrained``.

    Raises:
        ValueError: as ``models.classifier.build_classifier``, or ``pretrained`` for a backbone
            without ImageNet weights (resnet8, resnet10).
        PretrainedWeightsUnavailable: ``pretrained=True`` and the weights are neither cached nor
            downloadable; the message names the host and suggests ``pretrained=False``.
    """
    state = load_imagenet_state_dict(backbone) if pretrained and backbone in BACKBONES else None
    return classifier.build_classifier(
        backbone, num_classes, state, small_input_stem, test_time_flip
    )


def weights_url(backbone: str) -> str:
    """Where ``backbone``'s ImageNet weights are fetched from: the mirror base URL
    (``$TRAIN_CATS_TORCHVISION_WEIGHTS_URL``, default download.pytorch.org) + torchvision's file name."""
    base = os.environ.get(WEIGHTS_URL_ENV) or DEFAULT_WEIGHTS_URL
    return base.rstrip("/") + "/" + _weights_filename(backbone)


def weights_cache_path(backbone: str) -> Path:
    """The hub-cache file for ``backbone``'s weights: ``torch.hub.get_dir()/checkpoints/<name>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / _weights_filename(backbone)


def load_imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet state dict for ``backbone`` (1000-class head), from cache or network.

    A download streams into a temporary file beside the cache file and is renamed into place
    when complete, so an interrupted fetch never leaves a partial file in the cache.

    Raises:
        PretrainedWeightsUnavailable: no cached file and the download failed (unreachable host,
            timeout, HTTP error), or the file is not a readable state dict.
    """
    path = weights_cache_path(backbone)
    if not path.is_file():
        _download(weights_url(backbone), path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling/format error means the same: a bad file
        raise PretrainedWeightsUnavailable(
            f"cached weights {path} are not a readable state dict ({exc}); delete the file and "
            "retry, or use pretrained=False"
        ) from exc


def _weights_filename(backbone: str) -> str:
    return Path(urlsplit(require_imagenet_weights(backbone).url).path).name


def _download(url: str, dest: Path) -> None:
    try:
        download_file(url, dest, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
    except DatasetError as exc:
        raise PretrainedWeightsUnavailable(
            f"could not download ImageNet weights from {url} (host {urlsplit(url).netloc}): "
            f"{exc}. Offline? Use pretrained=False, or pre-seed the cache by placing {dest.name} "
            f"in {dest.parent} (set TORCH_HOME to move it), or set {WEIGHTS_URL_ENV} to a "
            "reachable mirror"
        ) from exc
