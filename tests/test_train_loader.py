"""The packed-cache batch loader: shuffling, epochs, resumable position, evaluation order."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from data.loader import PackedBatches, iter_batches


@dataclass
class _Split:
    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray


def _split(n_all: int = 23) -> _Split:
    # Each image's pixels hold its own row number, so a batch shows which rows it gathered.
    images = np.broadcast_to(
        np.arange(n_all, dtype=np.uint8)[:, None, None, None], (n_all, 4, 4, 3)
    )
    labels = np.arange(n_all, dtype=np.int64) % 3
    return _Split(np.ascontiguousarray(images), labels, np.arange(0, n_all, 2, dtype=np.int64))


def test_each_epoch_visits_every_row_once_and_drops_the_tail():
    split = _split()  # 12 rows in the split
    loader = PackedBatches(split, batch_size=5, seed=3)
    assert loader.steps_per_epoch == 2
    epoch = [loader.next() for _ in range(2)]
    rows = torch.cat([images[:, 0, 0, 0] for images, _ in epoch]).tolist()
    assert len(set(rows)) == 10 and set(rows) <= set(split.indices.tolist())
    images, labels = epoch[0]
    assert images.shape == (5, 3, 4, 4) and images.dtype == torch.uint8
    assert labels.dtype == torch.int64
    assert torch.equal(labels, images[:, 0, 0, 0].long() % 3)  # labels follow their images
    loader.next()
    assert loader.epoch == 1


def test_state_dict_resumes_the_same_batch_sequence():
    split = _split()
    straight = PackedBatches(split, batch_size=5, seed=1)
    expected = [straight.next()[0] for _ in range(7)]
    first = PackedBatches(split, batch_size=5, seed=1)
    for _ in range(3):
        first.next()
    resumed = PackedBatches(split, batch_size=5, seed=1)
    resumed.load_state_dict(first.state_dict())
    got = [resumed.next()[0] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(expected[3:], got, strict=True))
    other_seed = PackedBatches(split, batch_size=5, seed=2)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(first.state_dict())


def test_batch_larger_than_split_is_refused():
    with pytest.raises(ValueError, match="batch_size=13 exceeds the 12 images"):
        PackedBatches(_split(), batch_size=13, seed=0)


def test_iter_batches_covers_the_split_in_order():
    split = _split()
    rows = torch.cat([images[:, 0, 0, 0] for images, _ in iter_batches(split, 5)]).tolist()
    assert rows == split.indices.tolist()
