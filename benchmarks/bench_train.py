"""Training throughput per preset: images/s, step time, peak RSS, DiT FLOP/s vs a matmul peak,
and the packed-cache loader against decoding JPEGs each step.

Every (preset, model, precision) triple trains for `--steps` steps through the real `train_dit` /
`train_classifier` in its own subprocess, so that each peak RSS (`ru_maxrss`) is that run's alone.
The DiT's FLOPs per step are counted once with `torch.utils.flop_counter.FlopCounterMode` over a
forward + backward pass; the matmul peak is the best of a few 2048x2048 `torch.mm` in the run's
precision (bf16 where autocast runs in bf16, else fp32) timed in the same process with the same
threads, before and after the training steps. The step time is the median over steps after the first three.

Targets (issue #3 §4): DiT cpu-small >= 35% of the matmul peak, packed loader >= 10x JPEG decoding,
cpu-small peak RSS < 3 GB.

    .venv/bin/python -m benchmarks.bench_train --presets cpu-tiny cpu-small --steps 20
    .venv/bin/python -m benchmarks.bench_train --presets cpu-small --precisions fp32 bf16

`--precisions` trains each pair once per autocast precision, side by side in one run: whether
bf16 pays depends on the CPU (AMX or AVX-512 BF16; see `tasks.training.runtime`).
"""

from __future__ import annotations

import argparse
import io
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
OXFORD_MINI = SHARED / "oxford-pets-mini" / "images.tar.gz"
PETIMAGES = SHARED / "petimages" / "kagglecatsanddogs-180px.zip"


def matmul_peak_flops(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    """Best FLOP/s of an n x n matmul (2 n^3 FLOPs) in `dtype` on this process's threads."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def dit_flops_per_step(config, num_classes: int) -> float:
    """FLOPs of one DiT training step's forward + backward at the config's batch size."""
    from torch.utils.flop_counter import FlopCounterMode

    from models.dit import DiT
    from models.flow_matching import flow_matching_loss

    model = DiT(**config.architecture(num_classes))
    x0 = torch.randn(config.batch_size, 3, config.image_size, config.image_size)
    y = torch.randint(0, num_classes, (config.batch_size,))
    with FlopCounterMode(display=False) as counter:
        flow_matching_loss(model, x0, y, config.time_schedule).backward()
    return float(counter.get_total_flops())


def run_one(
    model: str, preset: str, steps: int, dataset: str, run_dir: str, precision: str = "auto"
) -> dict:
    """Train `model` with `preset` for `steps` steps in `precision` (auto, fp32 or bf16) in this
    process; return its figures."""
    from tasks import train_classifier, train_dit
    from tasks.training.runtime import resolve_precision

    module = train_dit if model == "dit" else train_classifier
    base = module.PRESETS[preset].model_dump()
    base.update(
        steps=steps,
        time_budget_minutes=None,
        log_every=1,
        ckpt_every_steps=10**9,
        ckpt_every_minutes=10**6,
        progress_bar=False,
        precision=precision,
    )
    if model == "dit":
        base.update(sample_every=10**9)
    config = type(module.PRESETS[preset]).model_validate(base)
    # The peak is measured before and after training and the higher one kept: on a shared
    # machine a single measurement can land in a busy moment and flatter the ratio.
    # The peak in the precision the run computes in: bf16 on AMX is ~6x the fp32 peak.
    precision = resolve_precision(torch.device("cpu"), config.precision)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    peak = matmul_peak_flops(dtype) if model == "dit" else 0.0
    stamps: list[float] = []
    train = module.train_dit if model == "dit" else module.train_classifier
    train(config, dataset, run_dir, progress=lambda row: stamps.append(time.perf_counter()))
    step_s = statistics.median(np.diff(stamps[2:])) if len(stamps) > 4 else float("nan")
    figures = {
        "model": model,
        "preset": preset,
        "steps": steps,
        "batch_size": config.batch_size,
        # The resolution the step computes on: a classifier may train on crops smaller than
        # the images it is validated on.
        "image_size": getattr(config, "train_size", config.image_size),
        "step_s": step_s,
        "images_per_s": config.batch_size / step_s,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
        "precision": precision,
        "requested": config.precision,
    }
    if model == "dit":
        flops = dit_flops_per_step(config, len(_classes(dataset)))
        peak = max(peak, matmul_peak_flops(dtype))
        figures.update(
            flops_per_step=flops,
            achieved_gflops=flops / step_s / 1e9,
            matmul_peak_gflops=peak / 1e9,
            peak_fraction=flops / step_s / peak,
        )
    return figures


def _classes(dataset: str) -> list[str]:
    from data.dataset import load_ref

    return load_ref(dataset).classes


def loader_figures(dataset: str, image_size: int, batch_size: int, batches: int = 20) -> dict:
    """Images/s of `PackedBatches` against decoding + resizing PetImages JPEGs for each batch."""
    from data.dataset import open_split
    from data.loader import PackedBatches

    loader = PackedBatches(open_split(dataset, image_size, "train"), batch_size, seed=0)
    loader.next()
    t0 = time.perf_counter()
    for _ in range(batches):
        loader.next()
    packed = batches * batch_size / (time.perf_counter() - t0)

    # The JPEG bytes are read into memory first, so only decoding and resizing are timed.
    with zipfile.ZipFile(PETIMAGES) as archive:
        names = [n for n in archive.namelist() if n.endswith(".jpg")][: batch_size * batches]
        blobs = [archive.read(n) for n in names]
    t0 = time.perf_counter()
    decoded = 0
    for start in range(0, len(blobs), batch_size):
        batch = []
        for blob in blobs[start : start + batch_size]:
            try:
                image = Image.open(io.BytesIO(blob)).convert("RGB")
            except OSError:
                continue  # the public archive's few broken files
            batch.append(np.asarray(image.resize((image_size, image_size), Image.BICUBIC)))
        torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)
        decoded += len(batch)
    jpeg = decoded / (time.perf_counter() - t0)
    return {"packed_images_per_s": packed, "jpeg_images_per_s": jpeg, "speedup": packed / jpeg}


def default_dataset(folder: Path) -> str:
    """oxford-pets-mini published with species labels at 32 and 64 px (the tests' data set)."""
    from data.dataset import DatasetSpec
    from data.download import ensure

    spec = DatasetSpec(source=str(OXFORD_MINI), labels="species", image_sizes=[32, 64])
    return ensure(spec, folder).model_dump_json()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["cpu-tiny", "cpu-small"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dataset", help="DatasetRef JSON or path (default: oxford-pets-mini)")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads per run (default: torch's); 1 avoids OpenMP spin-waits when other "
        "processes share the cores",
    )
    parser.add_argument(
        "--precisions",
        nargs="+",
        choices=["auto", "fp32", "bf16"],
        default=["auto"],
        help="autocast precisions to train each pair in, one run each (default: auto)",
    )
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "PRESET"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        dataset = args.dataset or default_dataset(Path(tmp) / "data")
        if args.one:
            run_dir = str(Path(tmp) / "run")
            print(json.dumps(run_one(*args.one, args.steps, dataset, run_dir, args.precisions[0])))
            return 0
        rows = []
        # Precision innermost: each fp32/bf16 pair runs back to back, under the same load.
        pairs = [
            (p, m, x) for p in args.presets for m in ("dit", "classifier") for x in args.precisions
        ]
        for preset, model, precision in pairs:
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "benchmarks.bench_train",
                    "--one",
                    model,
                    preset,
                    "--steps",
                    str(args.steps),
                    "--dataset",
                    dataset,
                    "--precisions",
                    precision,
                    *(["--threads", str(args.threads)] if args.threads else []),
                ],
                cwd=REPO,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        _print(rows, dataset, args.presets)
    return 0


def _precision_words(row: dict) -> str:
    """The precision a run computed in; `auto:bf16` where it was asked for `auto`, so that
    `--precisions auto bf16` shows which row is which."""
    resolved, requested = row["precision"], row["requested"]
    return resolved if requested == resolved else f"{requested}:{resolved}"


def _print(rows: list[dict], dataset: str, presets: list[str]) -> None:
    from tasks import train_classifier, train_dit

    print(
        f"{'preset':<10} {'model':<11} {'precision':<9} {'batch':>5} {'px':>4} {'step s':>8} "
        f"{'img/s':>8} {'peak RSS GB':>11}  DiT FLOP/s"
    )
    for r in rows:
        extra = ""
        if r["model"] == "dit":
            extra = (
                f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['peak_fraction']:.0f}% of "
                f"{r['precision']} matmul peak {r['matmul_peak_gflops']:.0f} GFLOP/s"
            )
        print(
            f"{r['preset']:<10} {r['model']:<11} {_precision_words(r):<9} {r['batch_size']:>5} "
            f"{r['image_size']:>4} {r['step_s']:>8.3f} {r['images_per_s']:>8.1f} "
            f"{r['peak_rss_gb']:>11.2f}  {extra}"
        )
    print()
    for preset in presets:
        for name, module in (("dit", train_dit), ("classifier", train_classifier)):
            config = module.PRESETS[preset]
            f = loader_figures(dataset, config.image_size, config.batch_size)
            print(
                f"loader {preset:<10} {name:<11} {config.image_size:>3} px batch "
                f"{config.batch_size:>3}: packed {f['packed_images_per_s']:>9.0f} img/s, "
                f"JPEG decode {f['jpeg_images_per_s']:>6.0f} img/s, {f['speedup']:.0f}x"
            )


if __name__ == "__main__":
    sys.exit(main())
