"""What a data set version is: the spec that builds it, its manifest, and the reference to it.

Three small models describe a published version:

- `DatasetSpec` (in `data.spec`, re-exported here): what to build (source, checksum, label mode,
  image sizes, "other" cap, split, member size limit). Its `version_id()` is derived from every
  field that changes the output, so a different spec publishes a sibling version instead of
  overwriting one.
- `Manifest` (`manifest.json`, written last): everything about how the version was built.
  A folder without a valid manifest is never treated as ready.
- `DatasetRef` (`reference.json`, and the last stdout line of `python data/download.py`): the small
  JSON-able handle every training and evaluation entry point accepts (docs/ARCHITECTURE.md).

The reading side, `load_ref` and `open_split`, memory-maps the packed caches; nothing here decodes
a JPEG or touches the network.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, ValidationError

from data.errors import PermanentError

# Re-exported (`X as X`), so that `from data.dataset import DatasetSpec` keeps working.
from data.spec import KNOWN_CHECKSUMS as KNOWN_CHECKSUMS
from data.spec import KNOWN_SLUGS as KNOWN_SLUGS
from data.spec import OFFICIAL_OXFORD_URL as OFFICIAL_OXFORD_URL
from data.spec import TOOL_VERSION, DatasetSpec
from data.spec import local_path as local_path

DATA_DIR_ENV = "TRAIN_CATS_DATA_DIR"
DEFAULT_DATA_DIR = Path("artifacts/data")

MANIFEST_NAME = "manifest.json"
REFERENCE_NAME = "reference.json"
LABELS_NAME = "labels.npy"
SPLIT_NAME = "split.npy"
SPLIT_IDS = {"train": 0, "val": 1}


def cache_name(image_size: int) -> str:
    """File name of the packed cache at `image_size` px, relative to a version folder."""
    return f"images_{image_size}.npy"


def default_data_dir() -> Path:
    """`$TRAIN_CATS_DATA_DIR` if set, else `./artifacts/data` (absolute)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()


class DatasetRef(BaseModel):
    """Handle to a published version; paths other than `root` are relative to `root`."""

    root: str = Field(description="Absolute path of the published version folder.")
    version: str = Field(description="Version id, e.g. 'oxford-pets-breed-3f2a9c1d'.")
    label_mode: Literal["breed", "species", "folder"]
    classes: list[str] = Field(description="Class names; the index is the label id.")
    counts: dict[str, int] = Field(description="Images per class, all splits.")
    caches: dict[int, str] = Field(description="Image size (px) -> images_<size>.npy.")
    labels: str = Field(LABELS_NAME, description="(N,) int64 label ids.")
    split: str = Field(SPLIT_NAME, description="(N,) uint8, 0 = train, 1 = val.")


class FileInfo(BaseModel):
    bytes: int
    sha256: str


class ArchiveInfo(BaseModel):
    name: str
    bytes: int
    sha256: str
    checksum: str = Field(description="ALGO:HEX that was verified, or the computed sha256.")
    checksum_verified: bool = Field(description="False when no expected checksum was known.")


class Manifest(BaseModel):
    """Contents of `manifest.json`, the last file written into a version folder."""

    tool_version: str
    version: str
    created_at: str = Field(description="UTC, ISO 8601.")
    spec: DatasetSpec
    source: str
    archive: ArchiveInfo
    layout: Literal["oxford-pets", "folder"]
    label_mode: Literal["breed", "species", "folder"]
    classes: list[str]
    counts: dict[str, int]
    split_counts: dict[str, dict[str, int]] = Field(description="'train'/'val' -> class -> n.")
    other_available: int = Field(description="Decodable 'other' images before the cap.")
    skipped: list[dict[str, str]] = Field(description="[{'member', 'reason', 'detail'}] per skip.")
    skipped_counts: dict[str, int]
    converted: list[dict[str, str]] = Field(
        description="[{'member', 'format', 'mode', 'to'}] for each kept image that was not an RGB "
        "file of the format its name says (a PNG named .jpg, grayscale, CMYK, palette, RGBA)."
    )
    converted_counts: dict[str, int] = Field(description="'FORMAT MODE' (e.g. 'PNG RGBA') -> n.")
    limits: dict[str, int] = Field(description="'max_member_bytes' and 'max_pixels' applied.")
    resize: str
    caches: dict[int, str]
    files: dict[str, FileInfo]
    content_hash: str = Field(description="sha256 over the sorted 'name sha256' of every file.")

    def to_ref(self, root: Path) -> DatasetRef:
        return DatasetRef(
            root=str(root.resolve()),
            version=self.version,
            label_mode=self.label_mode,
            classes=self.classes,
            counts=self.counts,
            caches=self.caches,
        )


def read_manifest(root: Path) -> Manifest | None:
    """The manifest of a ready version folder, or None if the folder is not ready.

    Ready means: `manifest.json` parses, names this folder and this tool version, and every file
    it lists exists with its recorded size. (Sizes, not hashes, so that the check stays far under
    a second; `verify_files` re-hashes.)
    """
    try:
        manifest = Manifest.model_validate_json((root / MANIFEST_NAME).read_bytes())
    except (OSError, ValidationError, ValueError):
        return None
    if manifest.version != root.name or manifest.tool_version != TOOL_VERSION:
        return None
    for name, info in manifest.files.items():
        try:
            if (root / name).stat().st_size != info.bytes:
                return None
        except OSError:
            return None
    return manifest


def verify_files(root: Path) -> list[str]:
    """Names of the files whose sha256 differs from the manifest's (empty when all match)."""
    manifest = read_manifest(root)
    if manifest is None:
        raise PermanentError(
            f"{root} is not a published data set version (no valid {MANIFEST_NAME})"
        )
    return [
        name for name, info in manifest.files.items() if sha256_file(root / name) != info.sha256
    ]


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def load_ref(value: str | Path | DatasetRef | dict) -> DatasetRef:
    """Accept a DatasetRef, its JSON or its dict (as Prefect and Modal pass it), or a path to a
    version folder, reference.json or manifest.json.

    A path's `root` is set to where the folder actually is, so a version copied or mounted
    elsewhere (a Modal volume at /data) still resolves.

    Raises:
        PermanentError: the path (or the reference's root) is not a published version (missing or
            invalid manifest), or the JSON is not a DatasetRef.
    """
    if isinstance(value, DatasetRef):
        return _published(value)
    if isinstance(value, dict):  # str() of a dict is not JSON: validate it as it is
        try:
            return _published(DatasetRef.model_validate(value))
        except ValidationError as exc:
            raise PermanentError(f"not a DatasetRef: {exc}") from exc
    text = str(value).strip()
    if text.startswith("{"):
        try:
            return _published(DatasetRef.model_validate_json(text))
        except ValidationError as exc:
            raise PermanentError(f"not a DatasetRef JSON: {exc}") from exc
    path = Path(text).expanduser()
    if not path.exists():
        raise PermanentError(
            f"dataset {text!r} does not exist; pass a version folder, its reference.json, or the "
            "DatasetRef JSON printed by `python data/download.py`"
        )
    root = path if path.is_dir() else path.parent
    manifest = read_manifest(root)
    if manifest is None:
        raise PermanentError(
            f"{root} is not a published data set version (no valid {MANIFEST_NAME}); "
            "publish one with `python data/download.py`"
        )
    return manifest.to_ref(root)


def _published(ref: DatasetRef) -> DatasetRef:
    """`ref` itself, once its root holds a valid manifest: a reference is only as good as the
    folder it points at (a half-built or deleted one must never be read)."""
    if read_manifest(Path(ref.root)) is None:
        raise PermanentError(
            f"{ref.root} (version {ref.version}) is not a published data set version (no valid "
            f"{MANIFEST_NAME}); publish it again with `python data/download.py`"
        )
    return ref


@dataclass(frozen=True)
class PackedSplit:
    """One split of a packed cache.

    Attributes:
        images: (N_all, H, W, 3) uint8 RGB, memory-mapped, every row of the version (both splits).
        labels: (N_all,) int64 label ids, indices into `classes`.
        indices: (n,) int64 rows of `images`/`labels` that belong to this split, ascending.
        classes: class names; index == label id.
    """

    images: np.ndarray
    labels: np.ndarray
    indices: np.ndarray
    classes: list[str]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
        """The i-th image of this split, (H, W, 3) uint8, and its label id."""
        row = int(self.indices[i])
        return np.asarray(self.images[row]), int(self.labels[row])


def open_split(
    ref: str | Path | DatasetRef, image_size: int, split: Literal["train", "val"]
) -> PackedSplit:
    """Memory-map the cache at `image_size` px and select the rows of `split`.

    Raises:
        ValueError: unknown split name, or no cache at that size (the message lists the sizes there).
        PermanentError: `ref` does not resolve to a published version, or its cache files are
            damaged (unreadable, of different lengths, labels out of range, an empty split).
    """
    ref = load_ref(ref)
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if image_size not in ref.caches:
        raise ValueError(
            f"data set {ref.version} has no cache at {image_size} px (it has "
            f"{sorted(ref.caches)}); publish one with `python data/download.py --image-size "
            f"{image_size}` and the same source and labels"
        )
    root = Path(ref.root)
    republish = "the version is damaged: delete the folder and publish it again"
    try:
        images = np.load(root / ref.caches[image_size], mmap_mode="r")
        labels = np.load(root / ref.labels)
        split_ids = np.load(root / ref.split)
    except (OSError, ValueError) as exc:  # a truncated or overwritten .npy
        raise PermanentError(f"{root}: cannot read the packed cache ({exc}); {republish}") from exc
    if not (len(images) == len(labels) == len(split_ids)):
        raise PermanentError(f"{root}: cache, labels and split have different lengths; {republish}")
    if len(labels) and not 0 <= labels.min() <= labels.max() < len(ref.classes):
        raise PermanentError(
            f"{root}: labels.npy holds ids outside [0, {len(ref.classes)}); {republish}"
        )
    indices = np.flatnonzero(split_ids == SPLIT_IDS[split]).astype(np.int64)
    if len(indices) == 0:
        raise PermanentError(
            f"{root}: the {split!r} split is empty (a class needs 2 or more images to appear in "
            "both splits; otherwise the version is damaged: delete it and publish it again)"
        )
    return PackedSplit(images=images, labels=labels, indices=indices, classes=list(ref.classes))
