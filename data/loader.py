"""Batches from the packed image cache (`data.dataset.open_split`), with a resumable position.

The packed cache is one (N_all, H, W, 3) uint8 `.npy` per image size, memory-mapped, so a batch is
a gather of B rows: no JPEG decoding, no worker processes. The shuffle order of epoch `e` is a pure
function of `(seed, e)`, so the loader's whole state is `(epoch, cursor)` and resuming from a
checkpoint replays exactly the batches an uninterrupted run would have drawn.

Where the rows come from is a `RowSource`:

- `HostRows`: gathered from the memory map; on CUDA staged through pinned memory and copied on a
  side stream. With `prefetch`, the next batch is gathered in a background thread while the
  current step computes.
- `ResidentRows`: the whole split copied to the device once (`fits_on_device` decides), after
  which a batch is an `index_select` on the device: no per-step image copy, only the B int64 row
  positions cross the bus.

With data parallelism every rank walks the same global order and takes its own contiguous shard
of each global batch (`rank`, `world_size`), so the shards are disjoint, their union is the batch a
single process would draw, and the position to resume from is the same on every rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch


class Split(Protocol):
    """What the loader needs of `data.dataset.PackedSplit`."""

    images: np.ndarray  # (N_all, H, W, 3) uint8, usually a memmap
    labels: np.ndarray  # (N_all,) int64
    indices: np.ndarray  # (n,) int64 rows of this split


Batch = tuple[torch.Tensor, torch.Tensor]


def _gather(split: Split, rows: np.ndarray) -> Batch:
    # `rows` arrive sorted (see PackedBatches), which keeps memmap access sequential.
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows]))
    labels = torch.from_numpy(np.asarray(split.labels[rows], dtype=np.int64))
    # (B, H, W, 3) -> (B, 3, H, W): a view in channels-last memory order, which convolutions prefer.
    return images.permute(0, 3, 1, 2), labels


class RowSource(Protocol):
    def gather(self, rows: np.ndarray) -> Batch:
        """Images (B, 3, H, W) uint8 and labels (B,) int64 of `rows`, on the training device."""
        ...


class HostRows:
    """Rows read from the memory map, moved to `device` per batch."""

    def __init__(self, split: Split, device: torch.device | str = "cpu") -> None:
        self.split, self.device = split, torch.device(device)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def gather(self, rows: np.ndarray) -> Batch:
        images, labels = _gather(self.split, rows)
        if self._stream is None:
            return images, labels
        # Pinned pages let the copy run asynchronously; the side stream keeps it off the compute
        # stream, and waiting for it here (in the prefetch thread) makes the batch safe to use.
        with torch.cuda.stream(self._stream):
            images = images.pin_memory().to(self.device, non_blocking=True)
            labels = labels.pin_memory().to(self.device, non_blocking=True)
        self._stream.synchronize()
        return images, labels


def device_memory_bytes(device: torch.device) -> int:
    """Total memory of `device` in bytes: the GPU's, or the host's RAM for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fits_on_device(split: Split, device: torch.device, fraction: float) -> bool:
    """Whether the split's images take at most `fraction` (0..1) of `device`'s memory."""
    row_bytes = int(np.prod(split.images.shape[1:])) * split.images.itemsize
    return fraction > 0 and len(split.indices) * row_bytes <= fraction * device_memory_bytes(device)


class ResidentRows:
    """The split's images and labels copied to `device` once; a batch is an on-device gather.

    Memory: n x H x W x 3 bytes on the device (the Oxford cats at 128 px: about 120 MB).
    """

    def __init__(self, split: Split, device: torch.device | str) -> None:
        self.device = torch.device(device)
        self.rows = np.sort(np.asarray(split.indices))
        images = np.ascontiguousarray(split.images[self.rows])
        self.images = torch.from_numpy(images).to(self.device)  # (n, H, W, 3) uint8
        labels = np.asarray(split.labels[self.rows], dtype=np.int64)
        self.labels = torch.from_numpy(labels).to(self.device)

    def gather(self, rows: np.ndarray) -> Batch:
        positions = torch.from_numpy(np.searchsorted(self.rows, rows)).to(self.device)
        images = self.images.index_select(0, positions).permute(0, 3, 1, 2)
        return images, self.labels.index_select(0, positions)


class PackedBatches:
    """Endless shuffled training batches, dropping each epoch's incomplete tail.

    `next()` returns this rank's `(images, labels)`: images (B / world_size, 3, H, W) uint8 in
    [0, 255] (channels-last strides), labels (B / world_size,) int64, where B = `batch_size` is the
    global batch. `source` (default `HostRows(split)`: CPU tensors) says where they are gathered.

    Raises:
        ValueError: the split holds fewer than `batch_size` images, or the batch does not split
            evenly over `world_size` (the message names both numbers).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        seed: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        source: RowSource | None = None,
        prefetch: bool = False,
    ) -> None:
        n = len(split.indices)
        if n < batch_size:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {n} images of this split; lower batch_size"
            )
        if batch_size % world_size:
            raise ValueError(
                f"batch_size={batch_size} does not split over world_size={world_size}; "
                "use a multiple of it"
            )
        self.split = split
        self.batch_size = batch_size
        self.seed = seed
        self.shard = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.source: RowSource = source or HostRows(split)
        self.epoch = 0
        self.cursor = 0
        self._order = self._permutation(0)
        self._pool = ThreadPoolExecutor(1, "prefetch") if prefetch else None
        # The prefetched batch and the position it was drawn from (which a checkpoint records).
        self._pending: tuple[tuple[int, int], Future[Batch]] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return len(self.split.indices) // self.batch_size

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.split.indices)

    def _next_rows(self) -> np.ndarray:
        """This rank's rows of the next global batch; advances the position."""
        if self.cursor + self.batch_size > len(self._order):
            self.epoch += 1
            self.cursor = 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        # Sorted, then sharded: every rank sorts the same global batch, so shards stay disjoint.
        return np.sort(rows)[self.shard]

    def _submit(self) -> tuple[tuple[int, int], Future[Batch]]:
        position = (self.epoch, self.cursor)
        rows = self._next_rows()
        assert self._pool is not None
        return position, self._pool.submit(self.source.gather, rows)

    def next(self) -> Batch:
        if self._pool is None:
            return self.source.gather(self._next_rows())
        pending = self._pending or self._submit()
        batch = pending[1].result()
        self._pending = self._submit()
        return batch

    def _position(self) -> tuple[int, int]:
        """The position of the next batch `next()` returns (before any prefetched one)."""
        return self._pending[0] if self._pending else (self.epoch, self.cursor)

    def state_dict(self) -> dict[str, Any]:
        epoch, cursor = self._position()
        return {"epoch": epoch, "cursor": cursor, "seed": self.seed, "n": len(self._order)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != len(self.split.indices) or state["seed"] != self.seed:
            raise ValueError(
                f"loader state is for {state['n']} images / seed {state['seed']}, this split has "
                f"{len(self.split.indices)} / seed {self.seed}"
            )
        if self._pending is not None:  # drop the batch prefetched from the old position
            self._pending[1].result()
            self._pending = None
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)


def iter_batches(split: Split, batch_size: int) -> Iterator[Batch]:
    """Every image of the split once, in order (for evaluation); the last batch may be short."""
    for start in range(0, len(split.indices), batch_size):
        yield _gather(split, np.sort(np.asarray(split.indices[start : start + batch_size])))
