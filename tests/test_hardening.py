"""Hostile and interrupted builds (issue #22): memory bounded on huge members and decompression
bombs, a complete audit of the conversions to RGB, and no debris after a killed build or a failed
download.

Archives are built here; the builds run in real subprocesses (whose peak RSS the kernel reports
through wait4) or in-process, against a real HTTP server on 127.0.0.1; the crash is a SIGKILL.
"""

from __future__ import annotations

import gzip
import logging
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from archive_factory import (
    image_bytes,
    oxford_members,
    png_claiming,
    understate_zip_size,
    write_tar,
    write_zip,
)
from conftest import OXFORD_MINI

from data.archive import Skip, read_at_most
from data.dataset import DatasetSpec, read_manifest
from data.download import ensure
from data.errors import InvalidArchiveError, SourceNotFoundError, SourceUnreachableError
from data.fetch import fetch
from data.pack import decode_stream

REPO = Path(__file__).resolve().parents[1]
MiB = 1 << 20
CATS = {"Abyssinian": 3, "Bengal": 3}
DOGS = {"pug": 3}
COUNTS = {"Abyssinian": 3, "Bengal": 3, "other": 3}


def _cli(*args: str, **popen: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "data/download.py", *args], cwd=REPO, **popen)


# Runs the downloader's CLI and, at exit, writes its own VmHWM (peak RSS of the process image
# after exec, in KiB) to the file named by the first argument. Not ru_maxrss: Linux carries the
# forking parent's resident set (here the whole test session, torch included) into it.
_MEASURED_CLI = (
    "import atexit, runpy, sys\n"
    "out = sys.argv.pop(1)\n"
    "def report():\n"
    "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
    "    open(out, 'w').write(hwm)\n"
    "atexit.register(report)\n"
    "sys.argv[0] = 'data/download.py'\n"
    "runpy.run_path('data/download.py', run_name='__main__')\n"
)


def _peak_rss(args: list[str], log: Path, timeout_s: float = 300) -> tuple[int, int]:
    """Run the CLI with `args`: (exit status, peak resident memory of that process, bytes)."""
    peak = log.with_suffix(".peak")
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-c", _MEASURED_CLI, str(peak), *args],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    return proc.returncode, int(peak.read_text()) * 1024


def _wait_for(found: Callable[[], list], proc: subprocess.Popen, what: str, timeout_s=120.0):
    """Poll `found()` until it returns something, failing if `proc` ends first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := found():
                return result
        except OSError:  # a file that vanished between listing and stat
            pass
        if proc.poll() is not None:
            pytest.fail(f"the build ended (status {proc.returncode}) before {what}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"no {what} after {timeout_s} s")


# --- 1. bounded memory ----------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".tar.gz", ".tar.bz2"])
def test_a_huge_member_is_skipped_unread_with_flat_memory(tmp_path, suffix):
    members = oxford_members(CATS, DOGS)
    huge = 300 * MiB
    control = write_tar(tmp_path / f"control{suffix}", members)
    hostile = write_tar(tmp_path / f"hostile{suffix}", members, zeros={"images/Bengal_9.jpg": huge})
    # Small on disk, like the real attack (bzip2 packs the 300 MB into a few KB).
    assert hostile.stat().st_size < MiB
    data, peaks = tmp_path / "data", {}
    for archive in (control, hostile):
        args = ["--source", str(archive), "--image-size", "16", "--max-member-mib", "16"]
        args += ["--workers", "2", "--data-dir", str(data)]
        status, peaks[archive] = _peak_rss(args, tmp_path / f"{archive.name}.log")
        assert status == 0, (tmp_path / f"{archive.name}.log").read_text()
    print(
        f"peak RSS: control {peaks[control] / MiB:.0f} MiB, hostile {peaks[hostile] / MiB:.0f} MiB"
    )
    # Flat: the 300 MB member costs no more than run-to-run noise. Reading it whole cost 675 MiB;
    # tarfile's own decompression of the .bz2 (one call per 10 KB of input) took minutes and GiBs.
    assert peaks[hostile] < peaks[control] + 24 * MiB
    assert peaks[hostile] < huge / 2
    spec = DatasetSpec(source=str(hostile), image_sizes=[16], max_member_mib=16)
    manifest = read_manifest(data / spec.version_id())
    detail = f"{huge} bytes; the limit is 16 MiB (max_member_mib)"
    assert manifest.skipped == [
        {"member": "images/Bengal_9.jpg", "reason": "too large", "detail": detail}
    ]
    assert manifest.counts == COUNTS and manifest.limits["max_member_bytes"] == 16 * MiB


def test_the_cap_is_part_of_the_spec_and_checked_on_the_declared_size(tmp_path):
    jpeg = image_bytes(5)
    padded = jpeg + bytes(2 * MiB - len(jpeg))  # a real JPEG; Pillow ignores what follows it
    archive = write_zip(
        tmp_path / "pets.zip", {**oxford_members(CATS, DOGS), "images/Bengal_9.jpg": padded}
    )
    data = tmp_path / "data"
    capped = ensure(
        DatasetSpec(source=str(archive), image_sizes=[8], max_member_mib=1), data, workers=1
    )
    assert capped.counts == COUNTS
    detail = f"{2 * MiB} bytes; the limit is 1 MiB (max_member_mib)"
    assert read_manifest(Path(capped.root)).skipped == [
        {"member": "images/Bengal_9.jpg", "reason": "too large", "detail": detail}
    ]
    default = ensure(DatasetSpec(source=str(archive), image_sizes=[8]), data, workers=1)
    assert default.version != capped.version and default.counts["Bengal"] == 4


def test_the_cli_names_a_bad_cap_in_one_line():
    bad = subprocess.run(
        [sys.executable, "data/download.py", "--max-member-mib", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--max-member-mib: Input should be greater than or equal to 1" in bad.stderr


def test_a_member_that_understates_its_size_is_not_read_past_the_cap(tmp_path):
    members = {**oxford_members(CATS, DOGS), "images/Bengal_9.jpg": bytes(40 * MiB)}
    archive = write_zip(tmp_path / "lying.zip", members, zipfile.ZIP_DEFLATED)
    understate_zip_size(archive, "images/Bengal_9.jpg", 1000)
    # zipfile stops at the claimed size and the checksum exposes the lie: the archive is refused.
    with pytest.raises(
        InvalidArchiveError, match=r"lying\.zip is corrupt: .*'images/Bengal_9\.jpg'"
    ):
        ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "data", workers=1)
    # A stream with no size at all (gzip) is read one byte past the cap, never further.
    stream = tmp_path / "zeros.gz"
    with gzip.open(stream, "wb") as handle:
        handle.write(bytes(3 * MiB))
    with gzip.open(stream, "rb") as handle:
        assert read_at_most(handle, MiB) is None
        assert handle.tell() == MiB + 1
    with gzip.open(stream, "rb") as handle:
        assert read_at_most(handle, 3 * MiB) == bytes(3 * MiB)


def test_a_zip_member_that_zipfile_cannot_bound_is_refused(tmp_path):
    archive = write_zip(tmp_path / "bz.zip", oxford_members(CATS, DOGS), zipfile.ZIP_BZIP2)
    with pytest.raises(InvalidArchiveError, match=r"compressed with bzip2, .*repack the archive"):
        ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "data", workers=1)
    # The same members stored or deflated are read.
    archive = write_zip(tmp_path / "ok.zip", oxford_members(CATS, DOGS), zipfile.ZIP_DEFLATED)
    ok = ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "data", workers=1)
    assert ok.counts == COUNTS


def test_a_damaged_bzip2_tar_is_refused_as_corrupt(tmp_path):
    noise = np.random.default_rng(0).bytes(2 * MiB)  # incompressible: three bzip2 blocks
    archive = write_tar(
        tmp_path / "pets.tar.bz2", {"images/noise.mat": noise, **oxford_members(CATS, DOGS)}
    )
    damaged = bytearray(archive.read_bytes())
    damaged[-3000:-2000] = bytes(1000)  # in the last block: the first header still reads
    archive.write_bytes(bytes(damaged))
    with pytest.raises(InvalidArchiveError, match=r"pets\.tar\.bz2 is corrupt: Invalid data"):
        ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "data", workers=1)


def test_parallel_decoding_holds_at_most_its_byte_budget():
    workers, member, n = 2, MiB, 24
    budget = workers * member
    flow = {"taken": 0, "returned": 0, "peak": 0}

    def members():
        for i in range(n):
            jpeg = image_bytes(i)
            flow["taken"] += member
            flow["peak"] = max(flow["peak"], flow["taken"] - flow["returned"])
            yield f"images/x_{i}.jpg", jpeg + bytes(member - len(jpeg))

    names = []
    for name, arrays, _ in decode_stream(members(), (8,), workers, budget):
        flow["returned"] += member
        assert not isinstance(arrays, Skip), arrays
        names.append(name)
    assert names == [f"images/x_{i}.jpg" for i in range(n)]  # archive order, none lost
    # Held: the budget in the threads plus the member just read. By count alone (8 per worker)
    # 16 of them would be.
    assert flow["peak"] <= budget + member


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_an_image_claiming_too_many_pixels_is_skipped_from_its_header(tmp_path):
    bombs = {
        "images/Bengal_8.jpg": png_claiming(10_000, 10_000),  # 1e8 px: Pillow alone only warns
        "images/Bengal_9.jpg": png_claiming(40_000, 40_000),  # 1.6e9 px: Pillow refuses too
    }
    archive = write_tar(tmp_path / "bombs.tar", {**oxford_members(CATS, DOGS), **bombs})
    ref = ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "d", workers=2)
    manifest = read_manifest(Path(ref.root))
    assert ref.counts == COUNTS
    assert manifest.skipped_counts == {"too many pixels": 2}
    detail = {skip["member"]: skip["detail"] for skip in manifest.skipped}
    assert (
        "10000 x 10000 = 100000000 pixels, over the 89478485 limit" in detail["images/Bengal_8.jpg"]
    )
    assert "1600000000 pixels" in detail["images/Bengal_9.jpg"]


# --- 2. a complete audit --------------------------------------------------------------------------


def test_every_conversion_is_listed_and_counted(tmp_path, caplog):
    odd = {
        "images/Bombay_10.jpg": image_bytes(10, fmt="PNG"),
        "images/Bombay_11.jpg": image_bytes(11, mode="L"),
        "images/Bombay_12.jpg": image_bytes(12, mode="CMYK"),
        "images/Persian_10.jpg": image_bytes(13, mode="P", fmt="GIF"),
        "images/Persian_11.jpg": image_bytes(14, mode="RGBA", fmt="PNG"),
        "images/Persian_12.png": image_bytes(15, fmt="PNG"),  # what its name says: not listed
        "images/pug_10.jpg": image_bytes(16, mode="L"),
        "images/Bombay_13.jpg": b"not an image",
    }
    members = {**oxford_members({"Bombay": 2, "Persian": 2}, {"pug": 2}), **odd}
    archive = write_tar(tmp_path / "odd.tar.gz", members)
    caplog.set_level(logging.INFO, logger="data.download")
    ref = ensure(DatasetSpec(source=str(archive), image_sizes=[8]), tmp_path / "d", workers=2)
    manifest = read_manifest(Path(ref.root))
    expected = [
        ("images/Bombay_10.jpg", "PNG", "RGB"),
        ("images/Bombay_11.jpg", "JPEG", "L"),
        ("images/Bombay_12.jpg", "JPEG", "CMYK"),
        ("images/Persian_10.jpg", "GIF", "P"),
        ("images/Persian_11.jpg", "PNG", "RGBA"),
        ("images/pug_10.jpg", "JPEG", "L"),
    ]
    assert manifest.converted == [
        {"member": member, "format": fmt, "mode": mode, "to": "RGB"}
        for member, fmt, mode in expected
    ]
    assert manifest.converted_counts == {
        "PNG RGB": 1,
        "JPEG L": 2,
        "JPEG CMYK": 1,
        "GIF P": 1,
        "PNG RGBA": 1,
    }
    assert sum(ref.counts.values()) == 13 and manifest.skipped_counts == {"undecodable": 1}
    assert "kept 13 images, converted 6 to RGB" in caplog.text
    assert "skipped 1 members {'undecodable': 1}" in caplog.text
    # Only kept images are listed: without the 'other' class, the grayscale pug is not.
    spec = DatasetSpec(source=str(archive), image_sizes=[8], max_other=0)
    no_other = read_manifest(Path(ensure(spec, tmp_path / "d", workers=1).root))
    assert [c["member"] for c in no_other.converted] == [m for m, _, _ in expected[:-1]]


# --- 3. no debris ---------------------------------------------------------------------------------


def test_a_killed_builds_staging_is_swept_by_another_specs_call(tmp_path):
    data = tmp_path / "data"
    args = ["--source", str(OXFORD_MINI), "--image-size", "128", "--workers", "1"]
    proc = _cli(*args, "--data-dir", str(data), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    scratch = _wait_for(
        lambda: [p for p in data.glob(".staging/*/scratch_128.raw") if p.stat().st_size > 0],
        proc,
        "it started decoding",
    )
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert scratch[0].is_file()  # the debris of the issue
    # A dead build of the previous tool, whose folders were named <version>-<random>.
    legacy = data / ".staging" / "old-source-breed-0123abcd-k2j4h6_8"
    legacy.mkdir()
    (legacy / "scratch_64.raw").write_bytes(b"\0" * 1024)
    other = write_tar(tmp_path / "other.tar", oxford_members(CATS, DOGS))
    assert ensure(DatasetSpec(source=str(other), image_sizes=[8]), data, workers=1).counts == COUNTS
    assert list((data / ".staging").iterdir()) == []


def test_a_live_builds_staging_survives_another_specs_sweep(http_server, tmp_path):
    data = tmp_path / "data"
    write_tar(tmp_path / "www" / "images.tar.gz", oxford_members(CATS, DOGS))
    http_server.stall("images.tar.gz", seconds=8)  # the live build waits in its download
    url = http_server.url("images.tar.gz")
    version = DatasetSpec(source=url, image_sizes=[8]).version_id()
    proc = _cli(
        *["--source", url, "--image-size", "8", "--workers", "1", "--data-dir", str(data)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    staging = _wait_for(lambda: list(data.glob(f".staging/{version}.*")), proc, "its staging")
    other = write_tar(tmp_path / "other.tar", oxford_members({"Bombay": 2, "Persian": 2}, {}))
    ensure(DatasetSpec(source=str(other), image_sizes=[8]), data, workers=1)
    assert proc.poll() is None, "the live build ended before the sweep could be checked"
    assert staging[0].is_dir()  # its lock is held, so it was left alone
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert read_manifest(data / version) is not None
    assert list((data / ".staging").iterdir()) == []


@pytest.mark.parametrize("failure", ["404", "refused"])
def test_a_failed_download_leaves_no_folder(http_server, tmp_path, failure):
    if failure == "404":
        source, error = http_server.url("missing.tar.gz"), SourceNotFoundError
    else:
        with socket.socket() as probe:  # a port nobody listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        source, error = f"http://127.0.0.1:{port}/images.tar.gz", SourceUnreachableError
    data = tmp_path / "data"
    with pytest.raises(error):
        ensure(DatasetSpec(source=source), data, workers=1)
    assert list((data / ".downloads").iterdir()) == []
    assert list((data / ".staging").iterdir()) == []
    # The download's lock file stays, outside .downloads: deleting a lock file that another
    # caller waits on would let a third one lock a new file of the same name.
    assert len(list((data / ".locks").glob("download-*.lock"))) == 1


def test_downloaders_of_one_url_take_turns_across_a_failure(http_server, tmp_path):
    write_tar(tmp_path / "www" / "images.tar.gz", oxford_members(CATS, DOGS))
    http_server.fail("images.tar.gz", 404)  # the first request fails ...
    http_server.stall("images.tar.gz", seconds=1.5)  # ... the second is slow, then succeeds
    spec = DatasetSpec(source=http_server.url("images.tar.gz"))
    data = tmp_path / "data"

    def call():
        try:
            return fetch(spec, data / ".downloads", locks_dir=data / ".locks")
        except SourceNotFoundError as exc:
            return exc

    with ThreadPoolExecutor(3) as pool:
        first = [pool.submit(call) for _ in range(2)]
        deadline = time.monotonic() + 30
        while http_server.count("images.tar.gz") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.5)  # the other first caller now holds the lock, its request stalled
        late = pool.submit(call)
        results = [future.result(timeout=60) for future in (*first, late)]
    failed = [r for r in results if isinstance(r, SourceNotFoundError)]
    archives = [r for r in results if not isinstance(r, Exception)]
    assert len(failed) == 1 and len(archives) == 2 and archives[0] == archives[1]
    # The late caller waited for the download in progress and reused it: no GET of its own.
    assert http_server.count("images.tar.gz") == 2
    assert sorted(p.name for p in archives[0].path.parent.iterdir()) == [
        "images.tar.gz",
        "images.tar.gz.json",
    ]
