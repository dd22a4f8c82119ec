"""What to build: `DatasetSpec`, its validation and its version id.

A spec names a source archive and every choice that changes the packed output (labels, image
sizes, the "other" cap, the split, the member size limit). `version_id()` hashes all of them with
the tool version, so a different spec publishes a sibling version instead of overwriting one.
`data.dataset` re-exports `DatasetSpec`, `local_path` and the source constants, so imports from
either module work.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bump when the packed format or the build procedure changes: it is part of every version id.
TOOL_VERSION = "train-cats-data/2"

OFFICIAL_OXFORD_URL = "https://www.robots.ox.ac.uk/~vgg/data/pets/data/images.tar.gz"
# Published by the dataset's authors; other sources pass --checksum or get their sha256 recorded.
KNOWN_CHECKSUMS = {OFFICIAL_OXFORD_URL: "md5:5c4f3ee8e5d25df40f4fd59a7f44e54c"}
KNOWN_SLUGS = {OFFICIAL_OXFORD_URL: "oxford-pets"}

_CHECKSUM_RE = re.compile(r"^(?P<algo>md5|sha1|sha256|sha512):(?P<hex>[0-9a-f]+)$", re.IGNORECASE)
_DIGEST_HEX_LEN = {"md5": 32, "sha1": 40, "sha256": 64, "sha512": 128}
# Archive stems too generic to name a version on their own ("images.tar.gz").
_GENERIC_STEMS = {"images", "data", "archive", "download", "dataset", "files"}
# Largest archive member read, in MiB. A camera JPEG is 3-25 MB (12-50 megapixels) and a
# 12-megapixel photo saved as PNG about 20 MB, so real photos fit with room to spare; a build
# holds at most (decoding threads + 1) members, so 2 threads stay under 100 MiB of encoded bytes.
DEFAULT_MAX_MEMBER_MIB = 32


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
    max_member_mib: int = Field(
        DEFAULT_MAX_MEMBER_MIB,
        ge=1,
        le=1024,
        description=(
            "Largest archive member read, in MiB (1-1024): a bigger one is skipped unread and "
            "listed in the manifest, so a hostile archive cannot exhaust memory."
        ),
    )
    source_revision: str | None = Field(
        None,
        max_length=512,
        description=(
            "The source's revision (an http ETag or Last-Modified, or a file's sha256), set by a "
            "scheduled run's change check (tasks.fingerprint) so that a changed upstream archive "
            "publishes a new version; empty: the source as first downloaded."
        ),
    )

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
    def max_member_bytes(self) -> int:
        """`max_member_mib` in bytes."""
        return self.max_member_mib << 20

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
            "max_member_mib": self.max_member_mib,
        }
        if self.source_revision is not None:  # absent, old version ids stay as they were
            identity["source_revision"] = self.source_revision
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        return f"{self.slug()}-{self.labels}-{digest[:8]}"


def local_path(source: str) -> Path:
    """The absolute path named by a file:// URL or a plain path."""
    parsed = urlparse(source)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path)).resolve()
    return Path(source).expanduser().resolve()
