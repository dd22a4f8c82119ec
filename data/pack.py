"""Decode images into fixed-size RGB arrays and pack them into memory-mappable caches.

Resize (the same for every size S, applied to the decoded original):
1. JPEGs are decoded with Pillow's `draft()`, which lets libjpeg scale by 1/2, 1/4 or 1/8 in the
   DCT while keeping both sides >= S. This is what makes decoding fast; the next step's filter
   removes the blockiness the DCT scaling could leave.
2. The image is converted to RGB (grayscale, CMYK, palette all occur); transparent pixels
   (RGBA, LA, palette with transparency) are composited onto white. Every kept image that was not
   an RGB file of the format its name says is recorded as a `Conversion` for the manifest.
3. The centred square of side min(W, H) is resized to S x S with Pillow's antialiased bicubic
   filter (its support widens with the downscale factor, so no aliasing).

Memory: each member is at most the spec's `max_member_mib` (see `data.archive`); at most
`workers` x that many bytes wait for or sit in the decoding threads (`decode_stream`), plus the
member being read; and an image of more than `MAX_PIXELS` pixels is skipped from its header,
before its pixels are decoded.

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
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from data.archive import IMAGE_FORMATS, OTHER, Labelling, Skip
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
# Decompression-bomb guard, in pixels: Pillow's default MAX_IMAGE_PIXELS (0.25 GiB as RGB), made a
# hard limit here (Pillow only warns below twice it) and kept independent of Pillow's global, which
# other code may change. A 50-megapixel camera photo is well inside it.
MAX_PIXELS = 89_478_485


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


def decode(
    data: bytes, sizes: tuple[int, ...], max_pixels: int = MAX_PIXELS
) -> tuple[list[np.ndarray], str, str]:
    """Decode one encoded image to one (S, S, 3) uint8 array per size in `sizes`.

    Returns the arrays, then the format and mode Pillow found (e.g. "PNG", "RGBA").

    Raises:
        DecompressionBombError: the header claims more than `max_pixels` pixels (checked before
            any pixel is decoded).
        Whatever else Pillow raises on bad data (UnidentifiedImageError, OSError, ValueError, ...).
    """
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise Image.DecompressionBombError(
                f"{width} x {height} = {width * height} pixels, over the {max_pixels} limit"
            )
        source = (image.format or "unknown", image.mode)
        if image.format == "JPEG":
            image.draft("RGB", (max(sizes), max(sizes)))
        rgb = to_rgb(image)
    return [square_resize(rgb, size) for size in sizes], *source


@dataclass(frozen=True)
class Conversion:
    """A kept image whose file was not RGB, or not the format its name says: converted to RGB."""

    member: str
    format: str  # as Pillow identified the content, e.g. "PNG" for a PNG named .jpg
    mode: str  # Pillow mode before conversion, e.g. "L", "CMYK", "P", "RGBA"

    def as_dict(self) -> dict[str, str]:
        return {"member": self.member, "format": self.format, "mode": self.mode, "to": "RGB"}


def _conversion(name: str, fmt: str, mode: str) -> Conversion | None:
    promised = IMAGE_FORMATS.get(PurePosixPath(name).suffix.lower(), set())
    return None if mode == "RGB" and fmt in promised else Conversion(name, fmt, mode)


def _decode_member(
    item: tuple[str, bytes], sizes: tuple[int, ...]
) -> tuple[str, list[bytes] | Skip, Conversion | None]:
    """(name, one raw array per size or the reason to skip it, its conversion if any)."""
    name, data = item
    try:
        arrays, fmt, mode = decode(data, sizes)
    except Image.DecompressionBombError as exc:
        return name, Skip(name, "too many pixels", str(exc)), None
    except UnidentifiedImageError:
        return name, Skip(name, "undecodable", "not a format Pillow recognises"), None
    # Corrupt files make Pillow raise many unrelated types; each one means "skip this file".
    except Exception as exc:
        return name, Skip(name, "undecodable", f"{type(exc).__name__}: {exc}"), None
    return name, [array.tobytes() for array in arrays], _conversion(name, fmt, mode)


@dataclass
class Decoded:
    """Images decoded in arrival order into one raw (n, S, S, 3) uint8 scratch file per size."""

    names: list[str] = field(default_factory=list)
    scratch: dict[int, Path] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    converted: list[Conversion] = field(default_factory=list)  # of members in `names`


def decode_all(
    members: Iterable[tuple[str, bytes]],
    sizes: list[int],
    scratch_dir: Path,
    workers: int,
    *,
    max_member_bytes: int,
) -> Decoded:
    """Decode every member, spreading the work over `workers` threads (1: in the caller's).

    Members are at most `max_member_bytes` bytes each (`data.archive.iter_images` sees to it);
    at most (`workers` + 1) x `max_member_bytes` bytes of them are held at once. Undecodable,
    too-many-pixels and duplicate members are recorded in `Decoded.skipped`, conversions to RGB
    in `Decoded.converted`.
    """
    decoded = Decoded(scratch={s: scratch_dir / f"scratch_{s}.raw" for s in sizes})
    seen: set[str] = set()
    with contextlib.ExitStack() as stack:
        handles = {s: stack.enter_context(open(p, "wb")) for s, p in decoded.scratch.items()}
        bar = stack.enter_context(
            tqdm(desc="decode", unit="img", file=sys.stderr, mininterval=1.0, smoothing=0.1)
        )
        budget = max(workers, 1) * max_member_bytes
        for name, arrays, conversion in decode_stream(members, tuple(sizes), workers, budget):
            bar.update()
            if isinstance(arrays, Skip):
                decoded.skipped.append(arrays)
                continue
            if name in seen:
                decoded.skipped.append(Skip(name, "duplicate", "an earlier member has this name"))
                continue
            seen.add(name)
            decoded.names.append(name)
            if conversion is not None:
                decoded.converted.append(conversion)
            for size, raw in zip(sizes, arrays, strict=True):
                handles[size].write(raw)
    return decoded


def decode_stream(
    members: Iterable[tuple[str, bytes]], sizes: tuple[int, ...], workers: int, max_bytes: int
) -> Iterator[tuple[str, list[bytes] | Skip, Conversion | None]]:
    """Decoded members in archive order, `workers` at a time: for each, its name, one raw
    (S, S, 3) uint8 array per size (or the `Skip` saying why not), and its `Conversion` if any.

    Members waiting for or in the threads hold at most `max_bytes` bytes in all (a single bigger
    member is decoded alone) and number at most 8 per worker; the one member just taken from
    `members` comes on top, while older ones drain.

    Threads, not processes: Pillow releases the GIL while it decodes and resizes, so threads run
    in parallel without pickling every image through a pipe or starting interpreters, and they
    are safe inside callers that run threads themselves (Prefect). The window of pending images
    bounds memory while the archive is read ahead: by count for ordinary photos, by bytes when
    large members arrive faster than they decode.
    """
    if workers <= 1:
        for item in members:
            yield _decode_member(item, sizes)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque[tuple[Future, int]] = deque()
        held = 0
        for item in members:
            size = len(item[1])
            while pending and (
                len(pending) >= workers * _WINDOW_PER_WORKER or held + size > max_bytes
            ):
                future, nbytes = pending.popleft()
                held -= nbytes
                yield future.result()
            pending.append((pool.submit(_decode_member, item, sizes), size))
            held += size
        while pending:
            yield pending.popleft()[0].result()


@dataclass(frozen=True)
class Packed:
    classes: list[str]
    counts: dict[str, int]
    split_counts: dict[str, dict[str, int]]
    other_available: int
    caches: dict[int, str]
    converted: list[Conversion]  # of the packed rows, by member name


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
    kept = set(names)
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
        converted=sorted(
            (c for c in decoded.converted if c.member in kept), key=lambda c: c.member
        ),
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
