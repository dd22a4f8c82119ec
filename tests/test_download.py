"""The downloader on generated archives: file sources, safe extraction, bad images, idempotency,
versions, concurrency and the command line (HTTP behaviour: tests/test_fetch.py)."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
import tarfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from archive_factory import image_bytes, oxford_members, published, sha256, write_tar, write_zip
from conftest import CATS, DOGS

from data.dataset import DatasetSpec, open_split, read_manifest
from data.download import ensure
from data.errors import (
    ChecksumMismatchError,
    InvalidArchiveError,
    SourceNotFoundError,
)

REPO = Path(__file__).resolve().parents[1]
def test_a_file_url_source_is_read_in_place_and_verified(oxford_tar, tmp_path):
    data_dir = tmp_path / "data"
    spec = DatasetSpec(source=oxford_tar.as_uri(), checksum=sha256(oxford_tar), image_sizes=[8])
    ref = ensure(spec, data_dir, workers=1)
    assert ref.counts == {"Abyssinian": 4, "British_Shorthair": 4, "other": 6}
    manifest = read_manifest(Path(ref.root))
    assert manifest.source == oxford_tar.as_uri()
    assert manifest.archive.checksum_verified
    assert not (data_dir / ".downloads").exists()  # read where it lies, never copied
    with pytest.raises(ChecksumMismatchError):  # and still verified before extraction
        ensure(spec.model_copy(update={"checksum": "md5:" + "0" * 32}), data_dir, workers=1)


def test_missing_local_file_is_permanent(tmp_path):
    with pytest.raises(SourceNotFoundError, match=r"does not exist .*dataset\.source"):
        ensure(DatasetSpec(source=str(tmp_path / "nope.tar.gz")), tmp_path / "data", workers=1)
    with pytest.raises(SourceNotFoundError, match="is a directory, not an archive file"):
        ensure(DatasetSpec(source=str(tmp_path)), tmp_path / "data", workers=1)


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("dotdot", "contains '..'"),
        ("absolute", "is absolute"),
        ("symlink", "link to '/etc/passwd'"),
        ("hardlink", "link to 'images/Abyssinian_1.jpg'"),
        ("device", "device, FIFO"),
        ("fifo", "device, FIFO"),
        ("zip-dotdot", "contains '..'"),
        ("zip-symlink", "link"),
    ],
)
def test_unsafe_members_reject_the_archive(tmp_path, kind, why):
    members = oxford_members(CATS, DOGS)
    if kind == "dotdot":
        archive = write_tar(
            tmp_path / "a.tar", {**members, "images/../../evil.jpg": image_bytes(1)}
        )
    elif kind == "absolute":
        archive = write_tar(tmp_path / "a.tar", {**members, "/tmp/evil.jpg": image_bytes(1)})
    elif kind == "symlink":
        archive = write_tar(
            tmp_path / "a.tar.gz", members, symlinks={"images/Bengal_1.jpg": "/etc/passwd"}
        )
    elif kind == "hardlink":
        archive = write_tar(
            tmp_path / "a.tar",
            members,
            hardlinks={"images/Bengal_1.jpg": "images/Abyssinian_1.jpg"},
        )
    elif kind in ("device", "fifo"):
        # Zero-sized like a real device member: without the type check it would merely be
        # skipped as an empty file, so only the refusal makes this test pass.
        special = tarfile.CHRTYPE if kind == "device" else tarfile.FIFOTYPE
        archive = write_tar(tmp_path / "a.tar", members, specials={"images/Bengal_1.jpg": special})
    elif kind == "zip-dotdot":
        archive = write_zip(tmp_path / "a.zip", {"../evil.jpg": image_bytes(1), **members})
    else:
        archive = write_zip(tmp_path / "a.zip", members)
        with zipfile.ZipFile(archive, "a") as handle:
            link = zipfile.ZipInfo("images/Bengal_1.jpg")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            handle.writestr(link, "/etc/passwd")
    data_dir = tmp_path / "data"
    with pytest.raises(InvalidArchiveError, match="unsafe archive member") as caught:
        ensure(DatasetSpec(source=str(archive)), data_dir, workers=1)
    assert why in str(caught.value)
    assert published(data_dir) == []
    assert list((data_dir / ".staging").iterdir()) == []
    assert not (tmp_path / "evil.jpg").exists()


def test_a_cut_off_compressed_archive_is_invalid(oxford_tar, tmp_path):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(oxford_tar.read_bytes()[: oxford_tar.stat().st_size // 2])
    data_dir = tmp_path / "data"
    with pytest.raises(InvalidArchiveError, match="corrupt"):
        ensure(DatasetSpec(source=str(cut)), data_dir, workers=1)
    assert published(data_dir) == []


def test_not_an_archive_is_invalid(tmp_path):
    bogus = tmp_path / "images.tar.gz"
    bogus.write_bytes(b"<html>login page</html>")
    with pytest.raises(InvalidArchiveError, match="neither a zip nor a tar"):
        ensure(DatasetSpec(source=str(bogus)), tmp_path / "data", workers=1)


def test_awkward_members_are_converted_or_skipped_and_counted(tmp_path):
    good = oxford_members({"Bombay": 3, "Persian": 3}, {"pug": 3})
    jpeg = image_bytes(7)
    awkward = {
        "images/Bombay_10.jpg": image_bytes(10, mode="L"),  # grayscale
        "images/Bombay_11.jpg": image_bytes(11, mode="CMYK"),  # CMYK JPEG
        "images/Persian_10.jpg": image_bytes(12, fmt="PNG"),  # a PNG named .jpg
        "images/Persian_11.jpg": image_bytes(13, mode="RGBA", fmt="PNG"),
        "images/Persian_12.jpg": image_bytes(14, mode="P", fmt="GIF"),  # palette
        "images/Bombay_12.jpg": b"",  # empty
        "images/Bombay_13.jpg": jpeg[: len(jpeg) // 2],  # truncated
        "images/Persian_13.jpg": b"not an image at all",
        "images/Abyssinian.mat": b"MATLAB 5.0",
        "images/Thumbs.db": b"\x00" * 64,
        "images/._Bombay_1.jpg": b"\x00\x05\x16\x07",  # macOS AppleDouble
    }
    archive = write_tar(tmp_path / "images.tar.gz", {**good, **awkward})
    ref = ensure(DatasetSpec(source=str(archive), image_sizes=[8, 24]), tmp_path / "d", workers=2)
    manifest = read_manifest(Path(ref.root))
    assert ref.counts == {"Bombay": 5, "Persian": 6, "other": 3}
    assert manifest.skipped_counts == {"not an image": 3, "empty file": 1, "undecodable": 2}
    skipped = {s["member"]: s["reason"] for s in manifest.skipped}
    assert skipped["images/Bombay_13.jpg"] == skipped["images/Persian_13.jpg"] == "undecodable"
    assert skipped["images/Bombay_12.jpg"] == "empty file"
    for size in (8, 24):
        split = open_split(ref, size, "train")
        assert split.images.shape == (14, size, size, 3) and split.images.dtype == np.uint8
    # The grayscale image stays gray after RGB conversion: its three channels are equal.
    kept = sorted(n for n in {**good, **awkward} if n not in skipped)
    gray = np.asarray(open_split(ref, 24, "train").images[kept.index("images/Bombay_10.jpg")])
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 1], gray[..., 2])


def test_folder_archive_in_species_and_folder_modes(tmp_path):
    members = {f"PetImages/Cat/{i}.jpg": image_bytes(i) for i in range(6)}
    members |= {f"PetImages/Dog/{i}.jpg": image_bytes(100 + i) for i in range(4)}
    members |= {"PetImages/Cat/Thumbs.db": b"\x00" * 16, "PetImages/Dog/7.jpg": b""}
    archive = write_zip(tmp_path / "pets.zip", members)
    species = ensure(
        DatasetSpec(source=str(archive), labels="species", image_sizes=[8]),
        tmp_path / "d",
        workers=1,
    )
    assert (species.label_mode, species.classes, species.counts) == (
        "species",
        ["cat", "other"],
        {"cat": 6, "other": 4},
    )
    folders = ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "d", workers=1)
    assert (folders.label_mode, folders.classes, folders.counts) == (
        "folder",
        ["Cat", "Dog"],
        {"Cat": 6, "Dog": 4},
    )
    capped = ensure(
        DatasetSpec(source=str(archive), labels="species", image_sizes=[8], max_other=2),
        tmp_path / "d",
        workers=1,
    )
    assert capped.counts == {"cat": 6, "other": 2}
    assert read_manifest(Path(capped.root)).other_available == 4


def test_species_needs_a_cat_folder(tmp_path):
    members = {f"x/Dog/{i}.jpg": image_bytes(i) for i in range(2)}
    members |= {f"x/Fox/{i}.jpg": image_bytes(9 + i) for i in range(2)}
    archive = write_zip(tmp_path / "pets.zip", members)
    with pytest.raises(InvalidArchiveError, match="Cat or cats"):
        ensure(DatasetSpec(source=str(archive), labels="species"), tmp_path / "d", workers=1)


def test_a_different_spec_publishes_a_sibling_and_reuses_the_download(
    http_server, oxford_tar, tmp_path
):
    data_dir = tmp_path / "data"
    url = http_server.url("images.tar.gz")
    first = ensure(DatasetSpec(source=url, image_sizes=[16]), data_dir, workers=1)
    second = ensure(DatasetSpec(source=url, image_sizes=[16, 32]), data_dir, workers=1)
    third = ensure(DatasetSpec(source=url, image_sizes=[16], labels="species"), data_dir, workers=1)
    assert len({first.version, second.version, third.version}) == 3
    assert published(data_dir) == sorted([first.version, second.version, third.version])
    assert read_manifest(Path(first.root)) is not None  # untouched by its siblings
    assert http_server.count() == 1  # the verified archive was reused


def test_two_specs_of_one_source_download_it_once(http_server, oxford_tar, tmp_path):
    http_server.stall("images.tar.gz", seconds=1.0)
    url = http_server.url("images.tar.gz")
    specs = [DatasetSpec(source=url, image_sizes=[8]), DatasetSpec(source=url, labels="species")]
    with ThreadPoolExecutor(2) as pool:
        refs = list(pool.map(lambda spec: ensure(spec, tmp_path / "data", workers=1), specs))
    assert refs[0].version != refs[1].version
    assert http_server.count() == 1


def test_a_kept_download_that_no_longer_matches_is_fetched_again(http_server, oxford_tar, tmp_path):
    url = http_server.url("images.tar.gz")
    ensure(DatasetSpec(source=url, image_sizes=[8]), tmp_path / "data", workers=1)
    write_tar(oxford_tar, oxford_members(CATS, {"pug": 2}))  # the server's file changes
    spec = DatasetSpec(source=url, checksum=sha256(oxford_tar), image_sizes=[8])
    assert ensure(spec, tmp_path / "data", workers=1).counts["other"] == 2
    assert http_server.count() == 2


def test_a_folder_without_a_valid_manifest_is_rebuilt(oxford_tar, tmp_path):
    data_dir = tmp_path / "data"
    spec = DatasetSpec(source=str(oxford_tar), image_sizes=[8])
    half = data_dir / spec.version_id()
    half.mkdir(parents=True)
    (half / "images_8.npy").write_bytes(b"half-written")
    ref = ensure(spec, data_dir, workers=1)
    assert read_manifest(half) is not None and Path(ref.root) == half
    # A cache that no longer matches its manifest makes the version not ready again.
    (half / "images_8.npy").write_bytes(b"truncated")
    assert read_manifest(half) is None
    assert ensure(spec, data_dir, workers=1).counts == ref.counts


def _cli(*args: str, cwd: Path = REPO) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "data/download.py", *args],
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_two_concurrent_processes_build_once(http_server, oxford_tar, tmp_path):
    http_server.stall("images.tar.gz", seconds=1.5)  # keeps the first builder busy
    args = ["--source", http_server.url("images.tar.gz"), "--image-size", "16"]
    args += ["--data-dir", str(tmp_path / "data"), "--workers", "1"]
    procs = [_cli(*args) for _ in range(2)]
    results = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], results
    refs = [json.loads(out.strip().splitlines()[-1]) for out, _ in results]
    assert refs[0] == refs[1]
    assert http_server.count("images.tar.gz") == 1
    assert any("waiting" in err for _, err in results)
    assert published(tmp_path / "data") == [refs[0]["version"]]


@pytest.mark.parametrize("form", [["data/download.py"], ["-m", "data.download"]])
def test_cli_help_runs_in_both_forms_from_anywhere(form, tmp_path):
    script = [str(REPO / form[0])] if form[0].endswith(".py") else form
    cwd = tmp_path if form[0].endswith(".py") else REPO
    done = subprocess.run(
        [sys.executable, *script, "--help"], cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert "--source" in done.stdout and "--image-size" in done.stdout


def test_cli_exit_codes_and_messages(tmp_path):
    bad = subprocess.run(
        [sys.executable, "data/download.py", "--checksum", "md5:xyz"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "ALGO:HEX" in bad.stderr
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    source = f"http://127.0.0.1:{port}/x.zip"
    offline = subprocess.run(
        [sys.executable, "data/download.py", "--source", source, "--data-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert offline.returncode == 75
    assert f"127.0.0.1:{port}" in offline.stderr and "--source" in offline.stderr
    assert offline.stdout == ""
