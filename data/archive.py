"""Read an image archive safely and work out its classes.

`iter_images` streams the regular-file members of a zip or tar (any compression), refusing the
whole archive if any member is unsafe (absolute path, `..`, symlink or hard link, device or
FIFO) and recording, with a reason, every member it skips (non-images such as `.mat`,
`Thumbs.db`, AppleDouble `._*` files, empty files, and files over the size limit). Members are
never written to disk under their archive names, so a hostile name cannot escape the staging
folder either way.

Memory: a member is read whole, so each one is bounded by `max_bytes` (the spec's
`max_member_mib`), checked on its declared size before reading and again while reading (no read
asks for more than `max_bytes` + 1 bytes, so a header that understates the size gains nothing).
Decompression is bounded too: a compressed tar is read through gzip/bz2/lzma file objects, whose
reads return at most what was asked (tarfile's own stream mode decompresses each 10 KB of input
whole, and 10 KB of bzip2 can hold gigabytes: a 13 KB .tar.bz2 made a build take 3 GiB), and a
zip member compressed with bzip2 or LZMA, which zipfile decompresses without a bound, is refused.
An over-large member is skipped ("too large"), not a reason to refuse the archive: the danger is
memory, which leaving it unread removes, and one stray file (a scan, a panorama, a video named
.jpg) should not make an otherwise good archive of thousands of photos unusable. Unsafe paths and
links are different: they mean the archive as a whole is hostile or broken.

`label_members` detects the layout from the names and maps each image to a class:

- Oxford-IIIT Pet: every image is `<dir>/<Breed>_<n>.<ext>` in one folder. The breed is the stem
  without its trailing `_<n>` (so `British_Shorthair` stays whole); cat breeds are capitalised,
  dog breeds lowercase (Parkhi et al., "Cats and Dogs", CVPR 2012, sec. 2).
- One folder per class (`PetImages/Cat/*.jpg`): the class is the image's parent folder.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Literal

from data.errors import InvalidArchiveError

# The Pillow format each image suffix promises (MPO: the multi-picture JPEG of phone cameras).
IMAGE_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".bmp": {"BMP"},
    ".gif": {"GIF"},
    ".webp": {"WEBP"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
}
IMAGE_SUFFIXES = set(IMAGE_FORMATS)
OTHER = "other"
CAT = "cat"
CAT_FOLDERS = {"cat", "cats"}
_OXFORD_STEM = re.compile(r"^(?P<breed>.+)_(?P<n>\d+)$")
# Zip methods whose reads zipfile bounds by the size asked (deflate via max_length, store by copy).
_BOUNDED_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED}


@dataclass(frozen=True)
class Skip:
    """A member left out of the data set: `reason` is the category counted in the manifest."""

    member: str
    # "not an image" | "empty file" | "too large" | "duplicate" | "undecodable" |
    # "too many pixels" | "unlabelled"
    reason: str
    detail: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"member": self.member, "reason": self.reason, "detail": self.detail}


@dataclass(frozen=True)
class Labelling:
    """The layout found and the class of every image member (None: not part of the data set)."""

    layout: Literal["oxford-pets", "folder"]
    label_mode: Literal["breed", "species", "folder"]
    classes: list[str]
    label_of: dict[str, str]  # member name -> class name, for labelled members only
    skipped: list[Skip]


def iter_images(path: Path, skipped: list[Skip], *, max_bytes: int) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) for each non-empty image-named member, in archive order.

    Members over `max_bytes` bytes (declared or read) are skipped unread or as soon as the read
    passes `max_bytes`, so no yielded value, and no read, exceeds `max_bytes` + 1 bytes. Skipped
    members are appended to `skipped` as they are met.

    Raises:
        InvalidArchiveError: not a zip or tar, corrupt, holding an unsafe member, or an image
            member zipped with bzip2 or LZMA (the message names the member and why).
    """
    try:
        if zipfile.is_zipfile(path):
            yield from _iter_zip(path, skipped, max_bytes)
        elif tarfile.is_tarfile(path):
            yield from _iter_tar(path, skipped, max_bytes)
        else:
            raise InvalidArchiveError(f"{path.name} is neither a zip nor a tar archive")
    except (
        zipfile.BadZipFile,
        tarfile.TarError,
        gzip.BadGzipFile,
        lzma.LZMAError,
        zlib.error,
        EOFError,
    ) as exc:
        raise InvalidArchiveError(f"{path.name} is corrupt: {exc}") from exc
    except OSError as exc:
        if exc.errno is not None:  # a real I/O error; bz2's "Invalid data stream" has no errno
            raise
        raise InvalidArchiveError(f"{path.name} is corrupt: {exc}") from exc


def _iter_zip(path: Path, skipped: list[Skip], max_bytes: int) -> Iterator[tuple[str, bytes]]:
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        # The whole listing is at hand, so refuse an unsafe archive before reading any member.
        for info in infos:
            mode = info.external_attr >> 16
            if stat.S_ISLNK(mode):
                _refuse(info.filename, "it is a symbolic link")
            # Many writers store permission bits only (no file type): those are regular files.
            if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                _refuse(info.filename, "it is not a regular file")
            _check_name(info.filename)
        for info in infos:
            if info.is_dir() or not _wanted(info.filename, info.file_size, max_bytes, skipped):
                continue
            if info.compress_type not in _BOUNDED_ZIP_METHODS:
                method = zipfile.compressor_names.get(info.compress_type, info.compress_type)
                raise InvalidArchiveError(
                    f"zip member {info.filename!r} is compressed with {method}, which cannot be "
                    "read within a memory bound; repack the archive with deflate, or as a .tar.bz2"
                )
            # zipfile serves at most the declared size (checked above), then checks the CRC;
            # read_at_most keeps that bound whatever zipfile does.
            with archive.open(info) as handle:
                data = read_at_most(handle, min(info.file_size, max_bytes))
            if data is None:  # pragma: no cover - see above
                skipped.append(_longer_than_declared(info.filename, info.file_size))
                continue
            yield info.filename, data


def _iter_tar(path: Path, skipped: list[Skip], max_bytes: int) -> Iterator[tuple[str, bytes]]:
    # Stream mode ("r|") reads the tar in one sequential pass, with no seeking back.
    with _decompressed(path) as stream, tarfile.open(fileobj=stream, mode="r|") as archive:
        for member in archive:
            _check_name(member.name)
            if member.issym() or member.islnk():
                _refuse(member.name, f"it is a link to {member.linkname!r}")
            if member.isdir():
                continue
            if not member.isreg():
                _refuse(member.name, "it is a device, FIFO or other special file")
            if not _wanted(member.name, member.size, max_bytes, skipped):
                continue  # tarfile reads past it in 10 KB steps
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - isreg() members always have data
                continue
            data = read_at_most(handle, min(member.size, max_bytes))
            if data is None:  # pragma: no cover - tarfile serves exactly the declared size
                skipped.append(_longer_than_declared(member.name, member.size))
                continue
            yield member.name, data


def _decompressed(path: Path) -> BinaryIO:
    """`path` opened for reading, through its decompressor if it is gzip, bzip2 or xz/lzma.

    The magic numbers are those tarfile's own "r|*" mode checks.
    """
    with open(path, "rb") as handle:
        magic = handle.read(10)
    if magic.startswith(b"\x1f\x8b\x08"):
        return gzip.open(path, "rb")
    if magic[:3] == b"BZh" and magic[4:10] == b"1AY&SY":
        return bz2.open(path, "rb")
    if magic.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        return lzma.open(path, "rb")
    return open(path, "rb")


def read_at_most(handle: BinaryIO, max_bytes: int) -> bytes | None:
    """The rest of `handle` if it holds at most `max_bytes` bytes, else None.

    Reads no more than `max_bytes` + 1 bytes either way, whatever the stream's header claimed.
    """
    data = handle.read(max_bytes + 1)
    return None if len(data) > max_bytes else data


def _too_large(name: str, declared: int, max_bytes: int) -> Skip:
    limit = f"{max_bytes >> 20} MiB" if max_bytes % (1 << 20) == 0 else f"{max_bytes} bytes"
    return Skip(name, "too large", f"{declared} bytes; the limit is {limit} (max_member_mib)")


def _longer_than_declared(name: str, declared: int) -> Skip:
    return Skip(name, "too large", f"holds more than the {declared} bytes its header declares")


def _check_name(name: str) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        _refuse(name, "its path is absolute")
    if ".." in pure.parts:
        _refuse(name, "its path contains '..'")


def _refuse(name: str, why: str) -> None:
    raise InvalidArchiveError(
        f"unsafe archive member {name!r}: {why}; refusing to extract this archive. "
        "Use a trusted copy of the data set as dataset.source"
    )


def _wanted(name: str, size: int, max_bytes: int, skipped: list[Skip]) -> bool:
    base = PurePosixPath(name).name
    suffix = PurePosixPath(base).suffix.lower()
    if base.startswith("._") or base.startswith(".") or suffix not in IMAGE_SUFFIXES:
        skipped.append(Skip(name, "not an image", base))
        return False
    if size == 0:
        skipped.append(Skip(name, "empty file"))
        return False
    if size > max_bytes:
        skipped.append(_too_large(name, size, max_bytes))
        return False
    return True


def label_members(names: list[str], labels: Literal["breed", "species"]) -> Labelling:
    """Detect the layout from the decodable image `names` and give each its class.

    In breed mode an Oxford archive yields its cat breeds (sorted) plus `other` for the dogs; a
    folder archive yields its folder names (label mode "folder"). In species mode both yield
    `cat` and `other`. The "other" cap is applied later, by the packer.

    Raises:
        InvalidArchiveError: fewer than two classes, or species mode without a cat folder.
    """
    parents = {PurePosixPath(name).parent for name in names}
    if len(parents) == 1 and any(_OXFORD_STEM.match(PurePosixPath(n).stem) for n in names):
        return _label_oxford(names, labels)
    return _label_folders(names, labels)


def _label_oxford(names: list[str], labels: str) -> Labelling:
    label_of, skipped = {}, []
    for name in names:
        match = _OXFORD_STEM.match(PurePosixPath(name).stem)
        if match is None:
            skipped.append(Skip(name, "unlabelled", "name is not <Breed>_<n>"))
            continue
        breed = match["breed"]
        is_cat = breed[0].isupper()
        if labels == "species":
            label_of[name] = CAT if is_cat else OTHER
        else:
            label_of[name] = breed if is_cat else OTHER
    breeds = sorted({c for c in label_of.values() if c != OTHER})
    has_other = OTHER in label_of.values()
    classes = [CAT, OTHER] if labels == "species" else breeds + ([OTHER] if has_other else [])
    return _checked(Labelling("oxford-pets", labels, classes, label_of, skipped))


def _label_folders(names: list[str], labels: str) -> Labelling:
    label_of, skipped = {}, []
    for name in names:
        parent = PurePosixPath(name).parent.name
        if not parent:
            skipped.append(Skip(name, "unlabelled", "not inside a class folder"))
            continue
        label_of[name] = parent
    if labels == "species":
        folders = sorted(set(label_of.values()))
        if not any(f.lower() in CAT_FOLDERS for f in folders):
            raise InvalidArchiveError(
                f"labels=species needs a folder named Cat or cats; this archive's class folders "
                f"are {folders}. Set dataset.labels to breed to keep the folders as classes"
            )
        label_of = {n: CAT if f.lower() in CAT_FOLDERS else OTHER for n, f in label_of.items()}
        return _checked(Labelling("folder", "species", [CAT, OTHER], label_of, skipped))
    classes = sorted(set(label_of.values()))
    return _checked(Labelling("folder", "folder", classes, label_of, skipped))


def _checked(labelling: Labelling) -> Labelling:
    present = [c for c in labelling.classes if c in set(labelling.label_of.values())]
    if len(present) < 2:
        raise InvalidArchiveError(
            f"found {len(present)} class(es) with decodable images ({present}); a data set needs "
            "at least two. Expected images/<Breed>_<n>.jpg (Oxford-IIIT Pet) or one folder per class"
        )
    return labelling
