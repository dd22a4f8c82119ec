"""Download, verify and publish a versioned cat data set, idempotently.

Command line (either form; the last stdout line is the DatasetRef as JSON, logs go to stderr):

    python data/download.py --source URL_OR_PATH [--labels breed|species] [--image-size 64 ...]
    python -m data.download --help

From code, `ensure(spec, data_dir)` is the one entry point (the Prefect task and the Modal
function call exactly this).

A version is published as `<data_dir>/<version id>/` by building it in
`<data_dir>/.staging/<version>.*` and renaming it into place once its manifest, written last,
is complete. The version id hashes the whole spec, so a different spec publishes a sibling
folder. A ready version is recognised from its manifest alone, before any network access; a
file lock per version makes concurrent callers wait for, then reuse, a single build. Every call
first sweeps away the staging folders of dead builds of any version (`data.staging`).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python data/download.py`: make the repository root importable, so that the script
    # finds its own package wherever the checkout (or a container's copy of it) lives.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import hashlib
import logging
import shutil
import time
from collections import Counter
from datetime import datetime, timezone

import filelock
from pydantic import ValidationError

from data.archive import Labelling, Skip, iter_images, label_members
from data.dataset import (
    DATA_DIR_ENV,
    LABELS_NAME,
    MANIFEST_NAME,
    OFFICIAL_OXFORD_URL,
    REFERENCE_NAME,
    SPLIT_NAME,
    TOOL_VERSION,
    ArchiveInfo,
    DatasetRef,
    DatasetSpec,
    FileInfo,
    Manifest,
    default_data_dir,
    read_manifest,
    sha256_file,
)
from data.errors import DATASET_FLAGS, DatasetError, OneLineParser, TransientError, in_flags
from data.fetch import Archive, fetch
from data.pack import MAX_PIXELS, RESIZE_METHOD, Packed, decode_all, default_workers, pack
from data.staging import LOCKS_DIR, TRASH_DIR, new_staging, sweep, version_lock

log = logging.getLogger("data.download")

# Converted and skipped members named one per log line, each list; the manifest has them all.
_LOGGED_ENTRIES = 50


def ensure(
    spec: DatasetSpec, data_dir: Path | str | None = None, *, workers: int | None = None
) -> DatasetRef:
    """Return the published version for `spec`, building it first if needed.

    Args:
        spec: what to build; its `version_id()` names the folder.
        data_dir: where versions live; default `$TRAIN_CATS_DATA_DIR`, else `./artifacts/data`.
        workers: decoding threads; default one per available CPU, 1 decodes in the calling thread.

    Returns:
        The DatasetRef of `<data_dir>/<version>`. If that folder already holds a valid manifest,
        it returns at once with no network request. Either way, the staging folders of dead
        builds of any version are deleted first (`data.staging.sweep`).

    Raises:
        TransientError (SourceUnreachableError, ServerError, TruncatedDownloadError): worth
            retrying later.
        PermanentError (HostNotFoundError, SourceNotFoundError, ChecksumMismatchError,
            InvalidArchiveError): not.
        Nothing is published when any error is raised.
    """
    data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    version = spec.version_id()
    root = data_dir / version
    sweep(data_dir)  # a killed build of any version leaves its scratch files behind otherwise
    manifest = read_manifest(root)
    if manifest is not None:
        log.info("data set %s is ready at %s", version, root)
        return manifest.to_ref(root)

    lock = version_lock(data_dir, version)
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        log.info("another process is building %s; waiting for it", version)
        lock.acquire()
    try:
        manifest = read_manifest(root)
        if manifest is not None:
            log.info("data set %s was published by another process; reusing it", version)
            return manifest.to_ref(root)
        return _build(spec, data_dir, root, workers or default_workers())
    finally:
        lock.release()


def _build(spec: DatasetSpec, data_dir: Path, root: Path, workers: int) -> DatasetRef:
    """Fetch, verify, decode and pack into a staging folder, then rename it to `root`.

    Must run under the version's lock.
    """
    version = root.name
    staging = new_staging(data_dir, version)
    try:
        started = time.perf_counter()
        archive = fetch(spec, data_dir / ".downloads", locks_dir=data_dir / LOCKS_DIR)
        fetched = time.perf_counter()
        skipped: list[Skip] = []
        cap = spec.max_member_bytes
        members = iter_images(archive.path, skipped, max_bytes=cap)
        decoded = decode_all(members, spec.image_sizes, staging, workers, max_member_bytes=cap)
        skipped += decoded.skipped
        decoded_at = time.perf_counter()
        labelling = label_members(decoded.names, spec.labels)
        skipped += labelling.skipped
        packed = pack(
            decoded,
            labelling,
            spec.image_sizes,
            staging,
            max_other=spec.max_other,
            val_fraction=spec.val_fraction,
            seed=spec.seed,
        )
        manifest = _describe(spec, version, archive, labelling, packed, skipped, staging)
        ref = manifest.to_ref(root)
        (staging / REFERENCE_NAME).write_text(ref.model_dump_json(indent=2) + "\n")
        (staging / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
        _log_summary(manifest, len(decoded.names), fetched - started, decoded_at - fetched)
        _publish(staging, root, data_dir)
        log.info("published %s in %.1f s", root, time.perf_counter() - started)
        return ref
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _describe(
    spec: DatasetSpec,
    version: str,
    archive: Archive,
    labelling: Labelling,
    packed: Packed,
    skipped: list[Skip],
    staging: Path,
) -> Manifest:
    """The manifest of a finished build in `staging` (hashes every packed file)."""
    files = {
        name: FileInfo(bytes=(staging / name).stat().st_size, sha256=sha256_file(staging / name))
        for name in [LABELS_NAME, SPLIT_NAME, *packed.caches.values()]
    }
    listing = "".join(f"{name} {files[name].sha256}\n" for name in sorted(files))
    return Manifest(
        tool_version=TOOL_VERSION,
        version=version,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        spec=spec,
        source=spec.source,
        archive=ArchiveInfo(
            name=archive.path.name,
            bytes=archive.bytes,
            sha256=archive.sha256,
            checksum=archive.checksum,
            checksum_verified=archive.checksum_verified,
        ),
        layout=labelling.layout,
        label_mode=labelling.label_mode,
        classes=packed.classes,
        counts=packed.counts,
        split_counts=packed.split_counts,
        other_available=packed.other_available,
        skipped=[skip.as_dict() for skip in skipped],
        skipped_counts=dict(Counter(skip.reason for skip in skipped)),
        converted=[conversion.as_dict() for conversion in packed.converted],
        converted_counts=dict(Counter(f"{c.format} {c.mode}" for c in packed.converted)),
        limits={"max_member_bytes": spec.max_member_bytes, "max_pixels": MAX_PIXELS},
        resize=RESIZE_METHOD,
        caches=packed.caches,
        files=files,
        content_hash=hashlib.sha256(listing.encode()).hexdigest(),
    )


def _publish(staging: Path, root: Path, data_dir: Path) -> None:
    if root.exists():
        # Only reachable for a folder without a valid manifest (ready ones return early): an
        # interrupted copy or an older tool's output. Move it out of the way, never trust it.
        trash = data_dir / TRASH_DIR / f"{root.name}-{time.time_ns()}"
        trash.parent.mkdir(exist_ok=True)
        log.warning("replacing %s, which has no valid %s", root, MANIFEST_NAME)
        root.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    # mkdtemp creates 0700 folders; a published version is read by other users and workers.
    staging.chmod(0o755)
    staging.rename(root)


def _log_summary(manifest: Manifest, decoded: int, fetch_s: float, decode_s: float) -> None:
    log.info(
        "%s: %d images decoded in %.1f s (%.0f img/s; archive ready in %.1f s); classes %s",
        manifest.version,
        decoded,
        decode_s,
        decoded / max(decode_s, 1e-9),
        fetch_s,
        manifest.counts,
    )
    if manifest.other_available != manifest.counts.get("other", 0):
        log.info(
            "'other' capped: %d of %d kept",
            manifest.counts.get("other", 0),
            manifest.other_available,
        )
    log.info(
        "kept %d images, converted %d to RGB%s, skipped %d members%s",
        sum(manifest.counts.values()),
        len(manifest.converted),
        f" {manifest.converted_counts}" if manifest.converted else "",
        len(manifest.skipped),
        f" {manifest.skipped_counts}" if manifest.skipped else "",
    )
    for kind, entries in (("converted", manifest.converted), ("skipped", manifest.skipped)):
        for entry in entries[:_LOGGED_ENTRIES]:
            what = (
                f"{entry['format']} {entry['mode']} -> RGB"
                if kind == "converted"
                else entry["reason"] + (f" ({entry['detail']})" if entry["detail"] else "")
            )
            log.info("%s %s: %s", kind, entry["member"], what)
        if len(entries) > _LOGGED_ENTRIES:
            more = len(entries) - _LOGGED_ENTRIES
            log.info("... and %d more %s, listed in %s", more, kind, MANIFEST_NAME)


def _parser() -> argparse.ArgumentParser:
    fields = DatasetSpec.model_fields
    parser = OneLineParser(
        prog="python data/download.py",
        description=__doc__.split("\n\n")[0],
        epilog=(
            f"Data lives in --data-dir, else ${DATA_DIR_ENV}, else ./artifacts/data. The last "
            "stdout line is the DatasetRef JSON. Exit status: 0 ok, 1 permanent error, "
            "75 transient error (retry later), 2 bad arguments."
        ),
    )
    parser.add_argument("--source", default=OFFICIAL_OXFORD_URL, help=fields["source"].description)
    parser.add_argument("--checksum", help=fields["checksum"].description)
    parser.add_argument(
        "--labels", choices=["breed", "species"], default="breed", help=fields["labels"].description
    )
    parser.add_argument(
        "--image-size",
        dest="image_sizes",
        type=int,
        action="append",
        help=f"{fields['image_sizes'].description} Repeatable; default 64.",
    )
    parser.add_argument("--max-other", type=int, help=fields["max_other"].description)
    parser.add_argument(
        "--val-fraction", type=float, default=0.1, help=fields["val_fraction"].description
    )
    parser.add_argument("--seed", type=int, default=0, help=fields["seed"].description)
    parser.add_argument(
        "--max-member-mib",
        type=int,
        default=fields["max_member_mib"].default,
        help=f"{fields['max_member_mib'].description} Default %(default)s.",
    )
    parser.add_argument(
        "--data-dir", type=Path, help=f"Where versions live (default ${DATA_DIR_ENV})."
    )
    parser.add_argument("--workers", type=int, help="Decoding threads (default: one per CPU).")
    parser.add_argument("--verbose", action="store_true", help="Log a failure's full traceback.")
    return parser


def _option_error(error: dict) -> str:
    """A pydantic error as '--option: message' (image_sizes is --image-size on the command line)."""
    if not error["loc"]:
        return error["msg"]
    field = str(error["loc"][0])
    return (
        f"--{'image-size' if field == 'image_sizes' else field.replace('_', '-')}: {error['msg']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    options = {
        "source": args.source,
        "checksum": args.checksum,
        "labels": args.labels,
        "max_other": args.max_other,
        "val_fraction": args.val_fraction,
        "seed": args.seed,
        "max_member_mib": args.max_member_mib,
    }
    if args.image_sizes:
        options["image_sizes"] = args.image_sizes
    try:
        spec = DatasetSpec(**options)
    except ValidationError as exc:
        parser.error("; ".join(_option_error(error) for error in exc.errors()))
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")
    try:
        ref = ensure(spec, args.data_dir, workers=args.workers)
    except DatasetError as exc:  # one line in this command line's words; --verbose: traceback
        message = in_flags(str(exc), DATASET_FLAGS)
        log.error("%s: %s", type(exc).__name__, message, exc_info=exc if args.verbose else None)
        return 75 if isinstance(exc, TransientError) else 1
    print(ref.model_dump_json())
    return 0


if __name__ == "__main__":
    sys.exit(main())
