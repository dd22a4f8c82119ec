"""Small real archives for the data tests: generated images in the Oxford-IIIT Pet layout or one
folder per class, as tar(.gz) or zip, plus the awkward members real archives hold and the hostile
ones (huge zero-filled members, headers that lie)."""

from __future__ import annotations

import hashlib
import io
import struct
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


def png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims `width` x `height` pixels: a decompression bomb's
    header, which Pillow reads before any pixel."""
    data = bytearray(image_bytes(0, fmt="PNG", size=(1, 1)))
    # After the 8-byte signature comes IHDR: length, b"IHDR", width, height, 5 more bytes, CRC.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


class _Zeros(io.RawIOBase):
    """`size` zero bytes, made as they are read: a huge member never held in memory or on disk."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


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
    zeros: dict[str, int] | None = None,
) -> Path:
    """A tar, gzip- or bzip2-compressed if `path` ends in .gz or .bz2.

    `zeros` maps a name to a size in bytes: a zero-filled member streamed into the archive (300 MB
    of zeros take 0.3 MB gzipped). They follow the regular members.

    `symlinks` and `hardlinks` map link name -> target; `specials` maps a name to a tarfile member
    type such as `tarfile.CHRTYPE` (a character device, 1:3 like /dev/null) or `tarfile.FIFOTYPE`.
    Links and specials follow the regular members, as a hostile archive would order them.
    """
    mode = {".gz": "w:gz", ".bz2": "w:bz2"}.get(path.suffix, "w")
    with tarfile.open(path, mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, size in (zeros or {}).items():
            info = tarfile.TarInfo(name)
            info.size = size
            archive.addfile(info, _Zeros(size))
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


def write_zip(path: Path, members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def understate_zip_size(path: Path, name: str, declared: int) -> None:
    """Make the zip's headers (central directory and local) claim `name` holds `declared` bytes,
    leaving its data as it is: a member that lies about its size."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    # (signature, offset of the uncompressed size, of the name's length, of the name)
    for signature, size_at, length_at, name_at in (
        (b"PK\x01\x02", 24, 28, 46),  # central directory entry
        (b"PK\x03\x04", 22, 26, 30),  # local header
    ):
        start = data.find(signature)
        while start != -1:
            (length,) = struct.unpack_from("<H", data, start + length_at)
            if data[start + name_at : start + name_at + length] == encoded:
                struct.pack_into("<I", data, start + size_at, declared)
                break
            start = data.find(signature, start + 4)
        else:
            raise ValueError(f"{name!r} not found in {path}")
    path.write_bytes(bytes(data))


def sha256(path: Path) -> str:
    """`sha256:<hex>` of a file, as a DatasetSpec checksum."""
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def published(data_dir: Path) -> list[str]:
    """The published version folders under `data_dir` (not the hidden working folders)."""
    return sorted(p.name for p in data_dir.iterdir() if not p.name.startswith("."))
