"""Read an image archive safely and work out its classes.

`iter_images` streams the regular-file members of a zip or tar (any compression), refusing the
whole archive if any member is unsafe (absolute path, `..`, symlink or hard link, device or
FIFO) and recording, with a reason, every member it skips (non-images such as `.mat`,
`Thumbs.db`, AppleDouble `._*` files, and empty files). Members are never written to disk under
their archive names, so a hostile name cannot escape the staging folder either way.

`label_members` detects the layout from the names and maps each image to a class:

- Oxford-IIIT Pet: every image is `<dir>/<Breed>_<n>.<ext>` in one folder. The breed is the stem
  without its trailing `_<n>` (so `British_Shorthair` stays whole); cat breeds are capitalised,
  dog breeds lowercase (Parkhi et al., "Cats and Dogs", CVPR 2012, sec. 2).
- One folder per class (`PetImages/Cat/*.jpg`): the class is the image's parent folder.
"""

from __future__ import annotations

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
from typing import Literal

from data.errors import InvalidArchiveError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
OTHER = "other"
CAT = "cat"
CAT_FOLDERS = {"cat", "cats"}
_OXFORD_STEM = re.compile(r"^(?P<breed>.+)_(?P<n>\d+)$")


@dataclass(frozen=True)
class Skip:
    """A member left out of the data set: `reason` is the category counted in the manifest."""

    member: str
    reason: str  # "not an image" | "empty file" | "duplicate" | "undecodable" | "unlabelled"
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


def iter_images(path: Path, skipped: list[Skip]) -> Iterator[tuple[str, bytes]]:
    """Yield (member name, bytes) for each non-empty image-named member, in archive order.

    Skipped members are appended to `skipped` as they are met.

    Raises:
        InvalidArchiveError: not a zip or tar, corrupt, or holding an unsafe member (the message
            names the member and why).
    """
    try:
        if zipfile.is_zipfile(path):
            yield from _iter_zip(path, skipped)
        elif tarfile.is_tarfile(path):
            yield from _iter_tar(path, skipped)
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


def _iter_zip(path: Path, skipped: list[Skip]) -> Iterator[tuple[str, bytes]]:
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
            if info.is_dir() or not _wanted(info.filename, info.file_size, skipped):
                continue
            yield info.filename, archive.read(info)


def _iter_tar(path: Path, skipped: list[Skip]) -> Iterator[tuple[str, bytes]]:
    # Stream mode ("r|*") reads a compressed tar in one sequential pass, with no seeking back.
    with tarfile.open(path, mode="r|*") as archive:
        for member in archive:
            _check_name(member.name)
            if member.issym() or member.islnk():
                _refuse(member.name, f"it is a link to {member.linkname!r}")
            if member.isdir():
                continue
            if not member.isreg():
                _refuse(member.name, "it is a device, FIFO or other special file")
            if not _wanted(member.name, member.size, skipped):
                continue
            handle = archive.extractfile(member)
            if handle is None:  # pragma: no cover - isreg() members always have data
                continue
            yield member.name, handle.read()


def _check_name(name: str) -> None:
    pure = PurePosixPath(name.replace("\\", "/"))
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", name):
        _refuse(name, "its path is absolute")
    if ".." in pure.parts:
        _refuse(name, "its path contains '..'")


def _refuse(name: str, why: str) -> None:
    raise InvalidArchiveError(
        f"unsafe archive member {name!r}: {why}; refusing to extract this archive. "
        "Use a trusted copy of the data set with --source"
    )


def _wanted(name: str, size: int, skipped: list[Skip]) -> bool:
    base = PurePosixPath(name).name
    suffix = PurePosixPath(base).suffix.lower()
    if base.startswith("._") or base.startswith(".") or suffix not in IMAGE_SUFFIXES:
        skipped.append(Skip(name, "not an image", base))
        return False
    if size == 0:
        skipped.append(Skip(name, "empty file"))
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
                f"are {folders}. Use --labels breed to keep the folders as classes"
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
