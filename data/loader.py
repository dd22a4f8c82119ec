"""Batches from the packed image cache (`data.dataset.open_split`), with a resumable position.

The packed cache is one (N_all, H, W, 3) uint8 `.npy` per image size, memory-mapped, so a batch is
a gather of B rows: no JPEG decoding, no worker processes. The shuffle order of epoch `e` is a pure
function of `(seed, e)`, so the loader's whole state is `(epoch, cursor)` and resuming from a
checkpoint replays exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
import torch


class Split(Protocol):
    """What the loader needs of `data.dataset.PackedSplit`."""

    images: np.ndarray  # (N_all, H, W, 3) uint8, usually a memmap
    labels: np.ndarray  # (N_all,) int64
    indices: np.ndarray  # (n,) int64 rows of this split


def _gather(split: Split, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    # Reading the rows in ascending order keeps memmap access sequential; batch order is irrelevant
    # to the loss, and the sort is deterministic, so resume stays exact.
    rows = np.sort(rows)
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows]))
    labels = torch.from_numpy(np.asarray(split.labels[rows], dtype=np.int64))
    # (B, H, W, 3) -> (B, 3, H, W): a view in channels-last memory order, which convolutions prefer.
    return images.permute(0, 3, 1, 2), labels


class PackedBatches:
    """Endless shuffled training batches, dropping each epoch's incomplete tail.

    `next()` returns `(images, labels)`: images (B, 3, H, W) uint8 in [0, 255] (channels-last
    strides), labels (B,) int64.

    Raises:
        ValueError: the split holds fewer than `batch_size` images (names both numbers).
    """

    def __init__(self, split: Split, batch_size: int, seed: int) -> None:
        n = len(split.indices)
        if n < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} images of this split; lower batch_size"
            )
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.split.indices) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.split.indices)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return _gather(self.split, rows)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "n": len(self._order),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != len(self.split.indices) or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for {state['n']} images / seed {state['seed']}, this split has "
                f"{len(self.split.indices)} / seed {self.seed}"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def iter_batches(split: Split, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every image of the split once, in order (for evaluation); the last batch may be short."""
    for start in range(0, len(split.indices), batch_size):
        yield _gather(split, np.asarray(split.indices[start : start + batch_size]))
