"""Decode images into fixed-size RGB arrays and pack them into memory-mappable caches.

Resize (the same for every size S, applied to the decoded original):
1. JPEGs are decoded with Pillow's `draft()`, which lets libjpeg scale by 1/2, 1/4 or 1/8 in the
   DCT while keeping both sides >= S. This is what makes decoding fast; the next step's filter
   removes the blockiness the DCT scaling could leave.
2. The image is converted to RGB (grayscale, CMYK, palette all occur); transparent pixels
   (RGBA, LA, palette with transparency) are composited onto white.
3. The centred square of side min(W, H) is resized to S x S with Pillow's antialiased bicubic
   filter (its support widens with the downscale factor, so no aliasing).

Each image size becomes `images_<S>.npy`, (N, S, S, 3) uint8, with `labels.npy` (N,) int64 and
`split.npy` (N,) uint8 (0 = train, 1 = val) in the same row order: member names, sorted.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.archive import OTHER, Labelling, Skip
from data.dataset import LABELS_NAME, SPLIT_NAME, cache_name

log = logging.getLogger(__name__)

RESIZE_METHOD = (
    "JPEG draft decoding (DCT scaling, both sides kept >= S), RGB conversion (transparency onto "
    "white), centred square crop of side min(W, H), Pillow antialiased bicubic resize to S x S"
)
# Rows copied per step from the decode-order scratch file into the sorted cache.
_COPY_ROWS = 1024

# Images in flight per decoding thread: enough to keep each busy while the archive is read.
_WINDOW_PER_WORKER = 8


def default_workers() -> int:
    """CPUs this process may use (the affinity mask, which containers restrict)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image as RGB; transparent pixels become white."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def square_resize(image: Image.Image, size: int) -> np.ndarray:
    """Centre-crop `image` to a square and resize it to (size, size, 3) uint8."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    resized = image.resize(
        (size, size), Image.Resampling.BICUBIC, box=(left, top, left + side, top + side)
    )
    return np.asarray(resized, dtype=np.uint8)


def decode(data: bytes, sizes: tuple[int, ...]) -> list[np.ndarray]:
    """Decode one encoded image to one (S, S, 3) uint8 array per size in `sizes`.

    Raises whatever Pillow raises on bad data (OSError, ValueError, DecompressionBombError, ...).
    """
    with Image.open(io.BytesIO(data)) as image:
        if image.format == "JPEG":
            image.draft("RGB", (max(sizes), max(sizes)))
        rgb = to_rgb(image)
    return [square_resize(rgb, size) for size in sizes]


def _decode_member(
    item: tuple[str, bytes], sizes: tuple[int, ...]
) -> tuple[str, list[bytes] | None, str]:
    name, data = item
    try:
        return name, [array.tobytes() for array in decode(data, sizes)], ""
    except UnidentifiedImageError:
        return name, None, "not a format Pillow recognises"
    # Corrupt files make Pillow raise many unrelated types; each one means "skip this file".
    except Exception as exc:
        return name, None, f"{type(exc).__name__}: {exc}"


@dataclass
class Decoded:
    """Images decoded in arrival order into one raw (n, S, S, 3) uint8 scratch file per size."""

    names: list[str] = field(default_factory=list)
    scratch: dict[int, Path] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)


def decode_all(
    members: Iterable[tuple[str, bytes]], sizes: list[int], scratch_dir: Path, workers: int
) -> Decoded:
    """Decode every member, spreading the work over `workers` threads (1: in the caller's).

    Undecodable and duplicate members are recorded in `Decoded.skipped`.
    """
    decoded = Decoded(scratch={s: scratch_dir / f"scratch_{s}.raw" for s in sizes})
    seen: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles = {s: stack.enter_context(open(p, "wb")) for s, p in decoded.scratch.items()}
        bar = stack.enter_context(
            tqdm(desc="decode", unit="img", file=sys.stderr, mininterval=1.0, smoothing=0.1)
        )
        for name, arrays, error in _decoded_stream(members, tuple(sizes), workers):
            bar.update()
            if arrays is None:
                decoded.skipped.append(Skip(name, "undecodable", error))
                continue
            if name in seen:
                decoded.skipped.append(Skip(name, "duplicate", "an earlier member has this name"))
                continue
            seen.add(name)
            decoded.names.append(name)
            for size, raw in zip(sizes, arrays, strict=True):
                handles[size].write(raw)
    return decoded


def _decoded_stream(
    members: Iterable[tuple[str, bytes]], sizes: tuple[int, ...], workers: int
) -> Iterator[tuple[str, list[bytes] | None, str]]:
    """Decoded members in archive order, `workers` at a time.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, so threads run
    in parallel without pickling every image through a pipe or starting interpreters, and they
    are safe inside callers that run threads themselves (Prefect). The window of pending images
    bounds memory while the archive is read ahead.
    """
    if workers <= 1:
        for item in members:
            yield _decode_member(item, sizes)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        for item in members:
            pending.append(pool.submit(_decode_member, item, sizes))
            if len(pending) >= workers * _WINDOW_PER_WORKER:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


@dataclass(frozen=True)
class Packed:
    classes: list[str]
    counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    other_available: int
    caches: dict[int, str]


def pack(
    decoded: Decoded,
    labelling: Labelling,
    sizes: list[int],
    out_dir: Path,
    *,
    max_other: int | None,
    val_fraction: float,
    seed: int,
) -> Packed:
    """Write labels.npy, split.npy and images_<S>.npy into `out_dir`, rows sorted by member name.

    "other" is capped to `max_other` images (a seeded random subset; 0 drops the class), then each
    class is split into train/val with its own seeded permutation (stratified).
    """
    row_of = {name: row for row, name in enumerate(decoded.names)}
    labelled = sorted(n for n in decoded.names if n in labelling.label_of)
    others = [n for n in labelled if labelling.label_of[n] == OTHER]
    keep_others = set(others)
    if max_other is not None and len(others) > max_other:
        rng = np.random.default_rng([seed, 0])
        keep_others = set(rng.permutation(others)[:max_other].tolist())
    names = [n for n in labelled if labelling.label_of[n] != OTHER or n in keep_others]
    classes = [c for c in labelling.classes if c != OTHER or keep_others]
    class_id = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_id[labelling.label_of[n]] for n in names], dtype=np.int64)
    split = stratified_split(labels, len(classes), val_fraction, seed)

    np.save(out_dir / LABELS_NAME, labels)
    np.save(out_dir / SPLIT_NAME, split)
    rows = np.array([row_of[n] for n in names], dtype=np.int64)
    caches = {}
    for size in sizes:
        caches[size] = cache_name(size)
        _write_cache(decoded.scratch[size], len(decoded.names), size, rows, out_dir / caches[size])
        decoded.scratch[size].unlink()

    def per_class(mask: np.ndarray) -> dict[str, int]:
        return {c: int(np.sum(labels[mask] == i)) for i, c in enumerate(classes)}

    return Packed(
        classes=classes,
        counts=per_class(np.ones(len(labels), dtype=bool)),
        split_counts={"train": per_class(split == 0), "val": per_class(split == 1)},
        other_available=len(others),
        caches=caches,
    )


def stratified_split(
    labels: np.ndarray, n_classes: int, val_fraction: float, seed: int
) -> np.ndarray:
    """(N,) uint8, 1 for validation rows: round(n_c * val_fraction) of each class c, seeded.

    A class with at least two images keeps at least one in each split.
    """
    rng = np.random.default_rng([seed, 1])
    split = np.zeros(len(labels), dtype=np.uint8)
    for class_id in range(n_classes):
        rows = np.flatnonzero(labels == class_id)
        n_val = round(len(rows) * val_fraction)
        if len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)
        split[rng.permutation(rows)[:n_val]] = 1
    return split


def _write_cache(scratch: Path, n_decoded: int, size: int, rows: np.ndarray, path: Path) -> None:
    source = np.memmap(scratch, dtype=np.uint8, mode="r", shape=(n_decoded, size, size, 3))
    target = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.uint8, shape=(len(rows), size, size, 3)
    )
    for start in range(0, len(rows), _COPY_ROWS):
        target[start : start + _COPY_ROWS] = source[rows[start : start + _COPY_ROWS]]
    target.flush()
    del source, target
