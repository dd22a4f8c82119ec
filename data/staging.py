"""Where a version is built, who may build it, and clearing what dead builds left behind.

A build of version V holds `<data_dir>/.locks/V.lock`, a `filelock` (flock(2) on Linux: the kernel
drops it when its holder dies, even by SIGKILL), for as long as its staging folder
`<data_dir>/.staging/V.<random>` exists: the folder is made after the lock is taken, and renamed
into place or deleted before the lock is released. So a staging folder whose version lock can be
taken at once belongs to a dead build, and `sweep` deletes it while holding that lock, so that no
build of V can start meanwhile. A lock that cannot be taken at once means a live build, whose
folder is left alone. Lock files are never deleted: a process still waiting on a deleted lock
file would hold a lock that the next process, creating the file anew, would not see.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import filelock

log = logging.getLogger(__name__)

LOCKS_DIR = ".locks"
STAGING_DIR = ".staging"
# Folders moved aside to be deleted (an invalid version being replaced); nothing reads them.
TRASH_DIR = ".trash"


def version_lock(data_dir: Path, version: str) -> filelock.FileLock:
    """The lock a build of `version` holds, not yet acquired (creates `.locks/` if needed).

    Raises:
        OSError: the data folder is not writable.
    """
    (data_dir / LOCKS_DIR).mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(data_dir / LOCKS_DIR / f"{version}.lock")


def new_staging(data_dir: Path, version: str) -> Path:
    """A new, empty staging folder for `version` (mode 0700), after deleting its leftovers.

    The caller must hold `version_lock(data_dir, version)`: any other staging folder of the
    version is then a dead build's.
    """
    parent = data_dir / STAGING_DIR
    parent.mkdir(exist_ok=True)
    for stale in _folders_of(parent, version):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{version}.", dir=parent))


def staging_version(name: str) -> str:
    """The version a staging folder's name belongs to.

    `V.<random>` from this tool (version ids hold no '.'), or `V-<random>` from the tool before
    it (mkdtemp's random part holds no '-'), whose leftovers are swept too.
    """
    return name.split(".", 1)[0] if "." in name else name.rsplit("-", 1)[0]


def sweep(data_dir: Path) -> list[Path]:
    """Delete the staging folders of dead builds, of any version, and whatever `.trash/` holds.

    Never deletes the staging folder of a live build (its version lock is held), never waits for
    a lock, and never raises: a missing or read-only data folder has nothing to sweep.

    Returns:
        The folders removed.
    """
    removed: list[Path] = []
    staging = data_dir / STAGING_DIR
    for version in sorted({staging_version(path.name) for path in _subfolders(staging)}):
        try:
            lock = version_lock(data_dir, version)
            lock.acquire(timeout=0)
        except (filelock.Timeout, OSError):
            continue  # a live build (or a folder we may not write): leave it
        try:
            # Listed again under the lock: only what is there now, with no build running.
            for stale in _folders_of(staging, version):
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        finally:
            lock.release()
    for leftover in _subfolders(data_dir / TRASH_DIR):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    removed = [path for path in removed if not path.exists()]
    if removed:
        log.info("removed %d leftover build folder(s): %s", len(removed), [p.name for p in removed])
    return removed


def _subfolders(parent: Path) -> list[Path]:
    try:
        return [path for path in parent.iterdir() if path.is_dir() and not path.is_symlink()]
    except OSError:
        return []


def _folders_of(staging: Path, version: str) -> list[Path]:
    return [path for path in _subfolders(staging) if staging_version(path.name) == version]
