"""Copy detection: does the DiT emit its training images? The nearest-neighbour ratio test.

For each generated sample x̂, d1 is the distance to its nearest training image and d2 to the second
nearest (another image, not the same one mirrored). A sample far closer to one training image than
to any other, d1 / d2 < `RATIO_THRESHOLD`, is flagged as a likely copy of that image. This is the
idea of Carlini et al. 2023, "Extracting Training Data from Diffusion Models": a generation counts
as extracted when it is much closer to one training example than to the training examples nearest
it, which tells a copy apart from a typical image of a dense region (where d1 is small too, but
so is d2). The threshold 1/3 is the value of follow-up work that applies this test with the second
nearest neighbour (Yoon et al. 2023; Gu et al. 2023, "On Memorization in Diffusion Models"): a
sample three times closer to one image than to every other is that image, barely changed, while
images that copy none give ratios near 1: oxford-pets-mini's held-out images against its
training images at 32 and 64 px give 0.79 to 1.0 (median 0.97), and training images with noise
of standard deviation 0.02 added give at most 0.14 (`tests/test_memorisation.py`).

Two spaces: L2 on [0, 1] pixels at the DiT's size (the training images as the DiT saw them, each
also mirrored when it trained with flips: the distance to an image is the smaller of the two), and
L2 in the judge's penultimate features (`ClassifierUnderTest.predict`), a second view in which a
near-copy that differs in pixels (shifted, recoloured) may still stand out. Distances come from
`torch.cdist` over chunks of training images, so memory stays at (samples x chunk) distances,
whatever the training set's size.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from data.dataset import DatasetRef, open_split

RATIO_THRESHOLD = 1 / 3
CHUNK = 256  # training images per cdist call


@dataclass
class Neighbours:
    """The two nearest training images of each of N samples.

    Attributes:
        d1, d2: (N,) float64 distances to the nearest and the second nearest training image.
        index: (N,) int64 position of the nearest in the references' order.
        view: (N,) int64 which view of it was nearest (0: as stored, 1: mirrored).
    """

    d1: torch.Tensor
    d2: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor

    @property
    def ratio(self) -> torch.Tensor:
        """(N,) d1 / d2 in [0, 1]; 0 for a sample equal to a training image stored twice."""
        return self.d1 / self.d2.clamp_min(1e-12)

    def copy_fraction(self, threshold: float = RATIO_THRESHOLD) -> float:
        """The share of samples whose ratio is below `threshold`: likely copies."""
        return float((self.ratio < threshold).double().mean())


def nearest_two(queries: torch.Tensor, chunks: Iterator[torch.Tensor]) -> Neighbours:
    """The nearest and second nearest reference of every query, in L2.

    Args:
        queries: (N, D) float.
        chunks: (m, V, D) float blocks of the references in order, V views of each (an image
            and its mirror, or V = 1); the distance to a reference is its smallest over its views.

    Raises:
        ValueError: fewer than 2 references.
    """
    q = queries.detach().reshape(len(queries), -1).double()
    best = torch.full((len(q), 2), torch.inf, dtype=torch.float64)
    best_index = torch.zeros((len(q), 2), dtype=torch.long)
    best_view = torch.zeros((len(q), 2), dtype=torch.long)
    seen = 0
    for chunk in chunks:
        m, views = chunk.shape[:2]
        refs = chunk.reshape(m * views, -1).to(q.device, torch.float64)
        dist = torch.cdist(q, refs).view(len(q), m, views)
        dist, view = dist.min(dim=2)  # (N, m): the nearer view of each reference
        index = torch.arange(seen, seen + m).expand(len(q), m)
        values = torch.cat([best, dist.cpu()], dim=1)
        top = values.topk(2, dim=1, largest=False)
        best = top.values
        best_index = torch.cat([best_index, index], dim=1).gather(1, top.indices)
        best_view = torch.cat([best_view, view.cpu()], dim=1).gather(1, top.indices)
        seen += m
    if seen < 2:
        raise ValueError(f"the ratio test needs at least 2 training images, got {seen}")
    return Neighbours(best[:, 0], best[:, 1], best_index[:, 0], best_view[:, 0])


@dataclass
class TrainingImages:
    """The training split's images of some classes, read chunk by chunk from the packed cache."""

    images: np.ndarray  # (N_all, S, S, 3) uint8, memory-mapped
    rows: np.ndarray  # (M,) int64 rows of `images` in the training split and the classes
    labels: np.ndarray  # (M,) int64 label ids of those rows (the dataset's numbering)

    @classmethod
    def open(cls, ref: DatasetRef, image_size: int, class_names: list[str]) -> TrainingImages:
        split = open_split(ref, image_size, "train")
        ids = [ref.classes.index(name) for name in class_names]
        rows = split.indices[np.isin(split.labels[split.indices], ids)]
        return cls(split.images, rows, np.asarray(split.labels[rows]))

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> torch.Tensor:
        """(3, S, S) float in [0, 1], the i-th training image."""
        return torch.from_numpy(np.array(self.images[self.rows[i]])).permute(2, 0, 1) / 255.0

    def batches(self, size: int = CHUNK) -> Iterator[torch.Tensor]:
        """(m, 3, S, S) float32 in [0, 1] blocks, in order."""
        for start in range(0, len(self.rows), size):
            block = np.ascontiguousarray(self.images[self.rows[start : start + size]])
            yield torch.from_numpy(block).permute(0, 3, 1, 2).float() / 255.0


def pixel_neighbours(samples: torch.Tensor, train: TrainingImages, mirror: bool) -> Neighbours:
    """The ratio test in pixel space. samples: (N, 3, S, S) float in [0, 1], at the size of
    `train`'s images; mirror: also compare with each training image flipped left-right."""

    def views() -> Iterator[torch.Tensor]:
        for x in train.batches():
            both = torch.stack([x, x.flip(-1)], dim=1) if mirror else x[:, None]
            yield both.flatten(2)

    return nearest_two(samples.clamp(0, 1).flatten(1), views())


def feature_neighbours(
    samples: torch.Tensor,
    train: TrainingImages,
    features: Callable[[torch.Tensor], torch.Tensor],
) -> Neighbours:
    """The ratio test in a feature space: `features((n, 3, S, S) in [0, 1]) -> (n, D)`."""
    chunks = (features(x)[:, None] for x in train.batches())
    return nearest_two(features(samples.clamp(0, 1)), chunks)
