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


def _rows(batch) -> list[int]:
    return batch[0][:, 0, 0, 0].tolist()


def test_rank_shards_are_disjoint_and_make_up_the_global_batch():
    split = _split()
    whole = PackedBatches(split, batch_size=6, seed=4)
    ranks = [PackedBatches(split, batch_size=6, seed=4, rank=r, world_size=3) for r in range(3)]
    for _ in range(5):  # across an epoch boundary (12 rows, 2 batches per epoch)
        expected = _rows(whole.next())
        shards = [_rows(loader.next()) for loader in ranks]
        assert all(len(s) == 2 for s in shards)
        assert [row for shard in shards for row in shard] == expected
    assert {loader.state_dict()["cursor"] for loader in ranks} == {whole.state_dict()["cursor"]}
    with pytest.raises(ValueError, match="batch_size=5 does not split over world_size=2"):
        PackedBatches(split, batch_size=5, seed=0, world_size=2)


def test_resident_rows_give_the_same_batches_as_the_memory_map():
    from data.loader import ResidentRows, fits_on_device

    split = _split()
    host = PackedBatches(split, batch_size=5, seed=7)
    resident = PackedBatches(split, batch_size=5, seed=7, source=ResidentRows(split, "cpu"))
    for _ in range(6):
        (a, la), (b, lb) = host.next(), resident.next()
        assert torch.equal(a, b) and torch.equal(la, lb)
        assert b.shape == (5, 3, 4, 4) and b.dtype == torch.uint8
    cpu = torch.device("cpu")
    assert fits_on_device(split, cpu, 0.5)  # 12 x 48 bytes
    assert not fits_on_device(split, cpu, 0.0)  # 0 turns the resident path off


def test_prefetching_loader_resumes_at_the_batch_it_returned_last():
    split = _split()
    straight = PackedBatches(split, batch_size=5, seed=1)
    expected = [_rows(straight.next()) for _ in range(7)]
    first = PackedBatches(split, batch_size=5, seed=1, prefetch=True)
    assert [_rows(first.next()) for _ in range(3)] == expected[:3]
    # One batch is already gathered ahead; the checkpoint must record the position before it.
    three = PackedBatches(split, batch_size=5, seed=1)
    for _ in range(3):
        three.next()
    assert first.state_dict() == three.state_dict()
    resumed = PackedBatches(split, batch_size=5, seed=1, prefetch=True)
    resumed.next()  # a prefetch from the start, which loading a state must discard
    resumed.load_state_dict(first.state_dict())
    assert [_rows(resumed.next()) for _ in range(4)] == expected[3:]
