"""Benchmark the data set publish: cold (download over HTTP from 127.0.0.1, verify, extract,
decode, pack) and warm (the manifest answers), plus the size on disk.

    .venv/bin/python benchmarks/bench_dataset.py                       # PetImages zip, 64 px
    .venv/bin/python benchmarks/bench_dataset.py --archive ../shared/datasets/oxford-pets-mini/images.tar.gz

Targets on the 2-core dev machine: cold >= 500 images/s for the 16k-image PetImages zip at one
size; warm call < 1 s. Prints one `name: value` line per figure.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.dataset import DatasetSpec, read_manifest  # noqa: E402
from data.download import ensure  # noqa: E402

PETIMAGES = REPO.parent / "shared" / "datasets" / "petimages" / "kagglecatsanddogs-180px.zip"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(directory: Path) -> ThreadingHTTPServer:
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archive", type=Path, default=PETIMAGES)
    parser.add_argument("--labels", choices=["breed", "species"], default="species")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=None, help="default: one per CPU")
    args = parser.parse_args()

    archive = args.archive.resolve()
    server = _serve(archive.parent)
    url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
    checksum = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    spec = DatasetSpec(
        source=url, checksum=checksum, labels=args.labels, image_sizes=[args.image_size]
    )
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        data_dir = Path(tmp)
        started = time.perf_counter()
        ref = ensure(spec, data_dir, workers=args.workers)
        cold_s = time.perf_counter() - started
        manifest = read_manifest(Path(ref.root))
        decoded = sum(manifest.counts.values()) + manifest.skipped_counts.get("undecodable", 0)

        started = time.perf_counter()
        ensure(spec, data_dir, workers=args.workers)
        warm_s = time.perf_counter() - started

        cli = [sys.executable, str(REPO / "data" / "download.py"), "--source", url]
        cli += ["--checksum", checksum, "--labels", args.labels]
        cli += ["--image-size", str(args.image_size)]
        started = time.perf_counter()
        subprocess.run([*cli, "--data-dir", tmp], check=True, capture_output=True)
        warm_cli_s = time.perf_counter() - started

        print(f"archive: {archive.name} ({archive.stat().st_size / 1e6:.1f} MB) via {url}")
        print(f"spec: labels={args.labels} image_size={args.image_size} version={ref.version}")
        print(f"counts: {ref.counts}")
        print(f"skipped: {manifest.skipped_counts}")
        print(f"cold_publish_s: {cold_s:.2f}")
        print(f"cold_images_per_s: {decoded / cold_s:.0f}")
        print(f"warm_call_s: {warm_s:.4f}")
        print(f"warm_cli_process_s: {warm_cli_s:.2f}")
        print(f"cache_bytes: {_size(Path(ref.root))} ({_size(Path(ref.root)) / 1e6:.1f} MB)")
        print(f"download_cache_bytes: {_size(data_dir / '.downloads')}")
    server.shutdown()


if __name__ == "__main__":
    main()
