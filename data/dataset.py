"""What a data set version is: the spec that builds it, its manifest, and the reference to it.

Three small models describe a published version:

- `DatasetSpec`: what to build (source, checksum, label mode, image sizes, "other" cap, split).
  Its `version_id()` is derived from every field that changes the output, so a different spec
  publishes a sibling version instead of overwriting one.
- `Manifest` (`manifest.json`, written last): everything about how the version was built.
  A folder without a valid manifest is never treated as ready.
- `DatasetRef` (`reference.json`, and the last stdout line of `python data/download.py`): the small
  JSON-able handle every training and evaluation entry point accepts (docs/ARCHITECTURE.md).

The reading side, `load_ref` and `open_split`, memory-maps the packed caches; nothing here decodes
a JPEG or touches the network.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.errors import PermanentError

# Bump when the packed format or the build procedure changes: it is part of every version id.
TOOL_VERSION = "train-cats-data/1"

OFFICIAL_OXFORD_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"
# Published by the dataset's authors; other sources pass --checksum or get their sha256 recorded.
KNOWN_CHECKSUMS = {OFFICIAL_OXFORD_URL: "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c"}
KNOWN_SLUGS = {OFFICIAL_OXFORD_URL: "oxford-pets"}

DATA_DIR_ENV = "TRAIN_CATS_DATA_DIR"
DEFAULT_DATA_DIR = Path("artifacts/data")

MANIFEST_NAME = "manifest.json"
REFERENCE_NAME = "reference.json"
LABELS_NAME = "labels.npy"
SPLIT_NAME = "split.npy"
SPLIT_IDS = {"train": 0, "val": 1}

_CHECKSUM_RE = re.compile(r"^(?P<algo>md5|sha1|sha256|sha512):(?P<hex>[0-9a-f]+)$", re.IGNORECASE)
_DIGEST_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
# Archive stems too generic to name a version on their own ("images.tar.gz").
_GENERIC_STEMS = {"images", "data", "archive", "download", "dataset", "files"}


def cache_name(image_size: int) -> str:
    """File name of the packed cache at `image_size` px, relative to a version folder."""
    return f"images_{image_size}.npy"


def default_data_dir() -> Path:
    """`$TRAIN_CATS_DATA_DIR` if set, else `./artifacts/data` (absolute)."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser().resolve()


class DatasetSpec(BaseModel):
    """What to build. Every field is part of the version id.

    Raises pydantic's `ValidationError` (a `ValueError`) with the field at fault for bad input,
    before any download starts.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str = Field(
        OFFICIAL_OXFORD_URL,
        min_length=1,
        description=(
            "Archive to read: an http(s):// URL, a file:// URL or a plain path to a .tar(.gz) or "
            ".zip. Either the Oxford-IIIT Pet layout (images/<Breed>_<n>.jpg) or one folder per "
            "class (PetImages/Cat/*.jpg, PetImages/Dog/*.jpg)."
        ),
    )
    checksum: str | None = Field(
        None,
        description=(
            "Expected archive digest as ALGO:HEX (md5, sha1, sha256 or sha512), checked before "
            "anything is extracted. Built in for the official Oxford URL; if empty for another "
            "source, the computed sha256 is recorded in the manifest instead."
        ),
        examples=["md5:5c4f3ee8e5d25df40f4fd59a7f44e54c"],
    )
    labels: Literal["breed", "species"] = Field(
        "breed",
        description=(
            "breed: the 12 Oxford cat breeds (plus 'other' for non-cats, see max_other); a folder "
            "archive uses its folder names as classes. species: two classes, 'cat' and 'other'."
        ),
    )
    image_sizes: list[Annotated[int, Field(ge=8, le=1024)]] = Field(
        [64],
        min_length=1,
        max_length=8,
        description="Side in pixels of each packed square cache (images_<size>.npy), 8-1024.",
    )
    max_other: int | None = Field(
        None,
        ge=0,
        description=(
            "Cap on the number of 'other' (non-cat) images, a seeded random subset; empty keeps "
            "all of them. 0 drops the class (breed mode only: species needs it)."
        ),
    )
    val_fraction: float = Field(
        0.1,
        gt=0.0,
        le=0.5,
        description="Fraction of each class held out for validation (stratified, seeded).",
    )
    seed: int = Field(0, ge=0, description="Seed of the 'other' subset and the train/val split.")

    @field_validator("source")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        scheme = urlparse(value).scheme.lower()
        # A one-letter scheme is a Windows drive ("C:\\..."), i.e. a plain path.
        if scheme and len(scheme) > 1 and scheme not in ("http", "https", "file"):
            raise ValueError(
                f"unsupported source scheme {scheme!r} in {value!r}; pass an http(s):// URL, "
                "a file:// URL or a plain path"
            )
        return value

    @field_validator("checksum")
    @classmethod
    def _checksum_format(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        match = _CHECKSUM_RE.match(value.strip())
        if not match:
            raise ValueError(
                f"checksum {value!r} is not ALGO:HEX with ALGO one of md5, sha1, sha256, sha512 "
                "(e.g. md5:5c4f3ee8e5d25df40f4fd59a7f44e54c)"
            )
        algo, hexdigest = match["algo"].lower(), match["hex"].lower()
        if len(hexdigest) != _DIGEST_HEX_LEN[algo]:
            raise ValueError(
                f"a {algo} digest has {_DIGEST_HEX_LEN[algo]} hex digits, {value!r} has {len(hexdigest)}"
            )
        return f"{algo}:{hexdigest}"

    @field_validator("image_sizes")
    @classmethod
    def _sorted_unique(cls, value: list[int]) -> list[int]:
        # [64, 32] and [32, 64, 64] describe the same output, hence the same version.
        return sorted(set(value))

    @model_validator(mode="after")
    def _species_needs_other(self) -> DatasetSpec:
        if self.labels == "species" and self.max_other == 0:
            raise ValueError(
                "labels='species' needs the 'other' class; set max_other to empty (no cap) or > 0"
            )
        return self

    @property
    def expected_checksum(self) -> str | None:
        """The digest to verify, ALGO:HEX: the given one, else the built-in one, else None."""
        return self.checksum or KNOWN_CHECKSUMS.get(self.source)

    def source_identity(self) -> str:
        """The source as a canonical string: URLs as given, paths as absolute file:// URLs."""
        parsed = urlparse(self.source)
        if parsed.scheme in ("http", "https"):
            return self.source
        return local_path(self.source).as_uri()

    def slug(self) -> str:
        """A readable name for the source, e.g. 'oxford-pets' or 'petimages-kagglecatsanddogs'."""
        if self.source in KNOWN_SLUGS:
            return KNOWN_SLUGS[self.source]
        path = Path(unquote(urlparse(self.source_identity()).path))
        stem = path.name
        for suffix in (".gz", ".bz2", ".xz", ".tgz", ".tar", ".zip"):
            stem = stem.removesuffix(suffix)
        if stem.lower() in _GENERIC_STEMS and path.parent.name:
            stem = f"{path.parent.name}-{stem}"
        return re.sub(r"[^a-z0-9]+", "-", stem.lower()).strip("-")[:48] or "dataset"

    def version_id(self) -> str:
        """'<slug>-<labels>-<8 hex>', the hash covering every field that changes the output."""
        identity = {
            "tool": TOOL_VERSION,
            "source": self.source_identity(),
            "checksum": self.expected_checksum,
            "labels": self.labels,
            "image_sizes": self.image_sizes,
            "max_other": self.max_other,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return f"{self.slug()}-{self.labels}-{digest[:8]}"


def local_path(source: str) -> Path:
    """The absolute path named by a file:// URL or a plain path."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    return Path(source).expanduser().resolve()


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
    skipped: list[dict[str, str]] = Field(description="[{'member', 'reason'}] for every skip.")
    skipped_counts: dict[str, int]
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


def load_ref(value: str | Path | DatasetRef) -> DatasetRef:
    """Accept a DatasetRef, its JSON, or a path to a version folder, reference.json or manifest.json.

    A path's `root` is set to where the folder actually is, so a version copied or mounted
    elsewhere (a Modal volume at /data) still resolves.

    Raises:
        PermanentError: the path (or the reference's root) is not a published version (missing or
            invalid manifest), or the JSON is not a DatasetRef.
    """
    if isinstance(value, DatasetRef):
        return _published(value)
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
