"""Small real archives for the data tests: generated images in the Oxford-IIIT Pet layout or one
folder per class, as tar(.gz) or zip, plus the awkward members real archives hold."""

from __future__ import annotations

import io
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def image_bytes(
    seed: int, *, mode: str = "RGB", fmt: str = "JPEG", size: tuple[int, int] = (48, 36)
) -> bytes:
    """A random-noise photo of `size` (W, H) in `mode`, encoded as `fmt`."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def oxford_members(cats: dict[str, int], dogs: dict[str, int]) -> dict[str, bytes]:
    """`images/<Breed>_<n>.jpg` members: capitalised cat breeds, lowercase dog breeds."""
    members = {}
    for breed, n in {**cats, **dogs}.items():
        for i in range(1, n + 1):
            members[f"images/{breed}_{i}.jpg"] = image_bytes(zlib.crc32(f"{breed}_{i}".encode()))
    return members


def write_tar(
    path: Path,
    members: dict[str, bytes],
    *,
    symlinks: dict[str, str] | None = None,
    hardlinks: dict[str, str] | None = None,
    specials: dict[str, bytes] | None = None,
) -> Path:
    """A tar, gzip-compressed if `path` ends in .gz.

    `symlinks` and `hardlinks` map link name -> target; `specials` maps a name to a tarfile member
    type such as `tarfile.CHRTYPE` (a character device, 1:3 like /dev/null) or `tarfile.FIFOTYPE`.
    Links and specials follow the regular members, as a hostile archive would order them.
    """
    with tarfile.open(path, "w:gz" if path.suffix == ".gz" else "w") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for kind, links in ((tarfile.SYMTYPE, symlinks), (tarfile.LNKTYPE, hardlinks)):
            for name, target in (links or {}).items():
                info = tarfile.TarInfo(name)
                info.type = kind
                info.linkname = target
                archive.addfile(info)
        for name, kind in (specials or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
                info.devmajor, info.devminor = 1, 3
            archive.addfile(info)
    return path


def write_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path
