"""The GPU check: what the `gpu` presets really do on a GPU, in one run of at most 8 minutes.

Prints one table:
- a bf16 matmul peak (a large `torch.matmul`, best of several) measured in this run;
- images/s, step time, peak memory and MFU (the preset's FLOPs per image, counted as in
  `benchmarks/gpu_presets.py`, times images/s, over that peak) of both `gpu` presets;
- the same with the GPU-resident data path off (`device_cache_fraction=0`: host memmap, pinned,
  prefetched), to show its gain;
- with two or more GPUs (or `--ddp N`), the DiT at world size N and its scaling efficiency
  (images/s at N over N times images/s at 1, the same global batch);
- a budgeted `gpu`-preset DiT run (`--dit-minutes`, 5) whose final sample grid is copied to `--grid`,
  with the held-out loss of its EMA export (`held_out_loss`); with `--x-pred`, a second budgeted run
  with `prediction="x"` (issue 21: does x-prediction pay at the `gpu` preset's patch 4?), its grid
  beside the first (`<grid>-x-pred.png`). The two held-out losses are the same velocity MSE on the
  same validation images, times and noise, so they compare directly.

Every training goes through `tasks.train.train(model, preset, overrides, dataset, run_dir)` with
config overrides only. The throughput rows run `--steps` steps each, unbudgeted, with no
checkpoints or grids along the way; their images/s is the median of the progress rows' own
images/s (each over its log window) after the first `--warmup` steps, which torch.compile takes.
The classifier rows train from random weights (`pretrained=False`): the speed is the same, and
the box needs no download.

    .venv/bin/python -m benchmarks.gpu_check                      # on a CUDA machine, ~8 min
    .venv/bin/python -m benchmarks.gpu_check --device cpu --smoke  # tiny configs, CI (~1 min)

`--dataset` takes a published DatasetRef (JSON, reference.json or version folder) with caches at
both presets' image sizes; by default the shared oxford-pets-mini archive (`--source`) is
published with species labels at those sizes. How to run it on Modal: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.gpu_presets import flops_per_image

REPO = Path(__file__).resolve().parents[1]
OXFORD_MINI = REPO.parent / "shared" / "datasets" / "oxford-pets-mini" / "images.tar.gz"
DEFAULT_GRID = REPO / "artifacts" / "gpu_check" / "dit-gpu-grid.png"
NEVER = 10**9  # a cadence no throughput row reaches: no checkpoints, grids or validations

# Scaled-down configs for `--smoke`: the presets' code paths on CPU-sized shapes.
SMOKE = {
    "dit": {
        "image_size": 32,
        "hidden_size": 64,
        "depth": 2,
        "num_heads": 4,
        "stem_channels": 8,
        "batch_size": 16,
        "compile": False,
        "samples_per_class": 2,
        "sample_steps": 4,
    },
    "classifier": {
        "backbone": "resnet8",
        "image_size": 32,
        "batch_size": 16,
        "compile": False,
        "eval_batch_size": 64,
    },
}


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n x n `torch.matmul` (2 n^3 FLOPs) in `dtype` on `device`."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):  # the first call warms up (cuBLAS heuristics, clocks)
        _sync(device)
        t0 = time.perf_counter()
        torch.matmul(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_gb(device: torch.device) -> float:
    """This process's peak: CUDA memory allocated since the last reset, else the RSS high-water
    mark (which never resets, so on the CPU it covers every earlier row too)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def overrides_for(model: str, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The `gpu` preset's overrides for one throughput row (plus `extra`)."""
    values: dict[str, Any] = {
        "steps": args.steps,
        "time_budget_minutes": None,
        "log_every": args.log_every,
        "ckpt_every_steps": NEVER,
        "ckpt_every_minutes": 10.0**6,
        "progress_bar": False,
        "device": args.device,
        "world_size": 1,
    }
    if model == "dit":
        values["sample_every"] = NEVER
    else:
        values.update(pretrained=False, eval_every_epochs=NEVER)
    if args.smoke:
        values.update(SMOKE[model])
    return {**values, **extra}


def throughput(
    model: str, overrides: dict[str, Any], dataset: Any, work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Train `model`'s `gpu` preset with `overrides`; images/s, step time and peak memory."""
    from tasks.train import build_config, train

    config = build_config(model, "gpu", overrides)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rows: list[dict[str, Any]] = []
    run_dir = Path(tempfile.mkdtemp(prefix=f"{model}-", dir=work))
    train(model, "gpu", overrides, dataset, run_dir, rows.append)
    # Each progress row carries the images/s of its own log window (measured by rank 0 between
    # two synchronising loss reads), so DDP rows, forwarded in bursts, are timed the same way.
    timed = [r["images_per_s"] for r in rows if r["step"] - args.log_every >= args.warmup]
    if not timed:
        raise RuntimeError(f"{model}: no progress row after step {args.warmup}; raise --steps")
    images_per_s = statistics.median(timed)
    return {
        "images_per_s": images_per_s,
        "step_s": config.batch_size / images_per_s,
        "peak_gb": _peak_memory_gb(device) if overrides.get("world_size", 1) == 1 else None,
        "config": config,
    }


@torch.no_grad()
def held_out_loss(export: str | Path, dataset: Any, device: str, repeats: int = 4) -> float:
    """The flow-matching loss (velocity MSE, `models.flow_matching.flow_matching_loss`) of the DiT
    export in `export` on every validation image of `dataset`, `repeats` times each, with times
    and noise drawn from a generator seeded with 0: two exports of one preset see the very same
    (x0, t, noise) triples, so their losses compare pairwise, whatever each model predicts
    internally (x-prediction is converted to a velocity inside the model). Unitless, float.

    Raises ValueError when the data set has no cache at the export's image size.
    """
    from data.dataset import open_split
    from models.flow_matching import flow_matching_loss
    from tasks.exported import load_dit

    model = load_dit(export, device)
    split = open_split(dataset, model.input_size, "val")
    generator = torch.Generator(device).manual_seed(0)
    total, count = 0.0, 0
    for _ in range(repeats):
        for start in range(0, len(split), 128):
            rows = split.indices[start : start + 128]
            images = torch.from_numpy(split.images[rows]).to(device).permute(0, 3, 1, 2)
            x0 = (images.float() / 255 - 0.5) / 0.5  # the training pixels' [-1, 1]
            y = torch.from_numpy(split.labels[rows]).to(device)
            loss = flow_matching_loss(model, x0, y, generator=generator)
            total, count = total + loss.item() * len(rows), count + len(rows)
    return total / count


def budgeted_dit(
    dataset: Any, work: Path, args: argparse.Namespace, **extra: Any
) -> dict[str, Any]:
    """The `gpu` DiT (plus `extra` overrides) for `--dit-minutes` (the budget includes compile,
    grids and exports); its final sample grid copied to `--grid` (suffixed by the overrides'
    values when there are any), and the held-out loss of its export."""
    from tasks.train import build_config, train

    overrides: dict[str, Any] = {
        "time_budget_minutes": args.dit_minutes,
        "progress_bar": False,
        "device": args.device,
        "world_size": 1,
    }
    if args.smoke:
        overrides.update(SMOKE["dit"])
    overrides.update(extra)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    suffix = "".join(f"-{value}-pred" for value in extra.values())
    result = train("dit", "gpu", overrides, dataset, work / f"dit-budgeted{suffix}")
    grid = Path(args.grid)
    grid = grid.with_name(f"{grid.stem}{suffix}{grid.suffix}")
    grid.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(result["files"]["samples"], grid)
    metrics = result["metrics"]
    config = build_config("dit", "gpu", overrides)
    return {
        **metrics,
        "step_s": config.batch_size / metrics["images_per_s"],
        "peak_gb": _peak_memory_gb(device),
        "config": config,
        "grid": str(grid),
        "held_out_loss": held_out_loss(result["run_dir"], dataset, args.device),
    }


def publish_dataset(args: argparse.Namespace) -> Any:
    """`--dataset` as a DatasetRef, or `--source` published with species labels at the image
    sizes both rows need (`data.download.ensure`: `$TRAIN_CATS_DATA_DIR`, else artifacts/data)."""
    from data.dataset import DatasetSpec, load_ref
    from data.download import ensure
    from tasks.train import build_config

    if args.dataset:
        return load_ref(args.dataset)
    sizes = sorted(
        {build_config(m, "gpu", overrides_for(m, args)).image_size for m in ("dit", "classifier")}
    )
    return ensure(DatasetSpec(source=str(args.source), labels="species", image_sizes=sizes))


def _mfu(row: dict[str, Any], model: str, classes: int, peak: float) -> float:
    return flops_per_image(model, row["config"], classes) * row["images_per_s"] / peak


def run_check(args: argparse.Namespace) -> list[tuple[str, dict[str, Any] | str]]:
    """Every row of the table, in order: (name, figures) or (name, why it was skipped)."""
    device = torch.device(args.device)
    dataset = publish_dataset(args)
    classes = len(dataset.classes)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 512 if args.smoke else 8192
    peak = matmul_peak(device, dtype, n)
    rows: list[tuple[str, dict[str, Any] | str]] = []
    rows.append(("matmul peak", {"note": f"{str(dtype)[6:]} {n}^3: {peak / 1e12:.2f} TFLOP/s"}))
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        single: dict[str, float] = {}
        for model in ("dit", "classifier"):
            for name, extra in ((model, {}), (f"{model} resident-off", {"device_cache_fraction": 0.0})):  # fmt: skip
                row = throughput(model, overrides_for(model, args, **extra), dataset, work, args)
                row["mfu"] = _mfu(row, model, classes, peak)
                rows.append((name, row))
            single[model] = rows[-2][1]["images_per_s"]
        gpus = torch.cuda.device_count() if device.type == "cuda" else 1
        world = args.ddp or (gpus if gpus >= 2 else 0)
        if world >= 2:
            row = throughput("dit", overrides_for("dit", args, world_size=world), dataset, work, args)  # fmt: skip
            row["mfu"] = _mfu(row, "dit", classes, peak * world)
            row["note"] = f"scaling efficiency {row['images_per_s'] / (world * single['dit']):.0%}"
            rows.append((f"dit ddp-{world}", row))
        else:
            rows.append(("dit ddp", f"skipped: {gpus} {device.type} device (needs 2+, or --ddp N)"))
        if args.dit_minutes > 0:
            variants = [("", {}), (" x-pred", {"prediction": "x"})][: 2 if args.x_pred else 1]
            for label, extra in variants:
                run = budgeted_dit(dataset, work, args, **extra)
                run["mfu"] = _mfu(run, "dit", classes, peak)  # average: compile, grids included
                loss = "-" if run["final_loss"] is None else f"{run['final_loss']:.4f}"
                note = (
                    f"{run['steps']} steps, loss {loss}, held-out {run['held_out_loss']:.4f},"
                    f" grid {run['grid']}"
                )
                rows.append((f"dit {args.dit_minutes:g}-min{label}", {**run, "note": note}))
        else:
            rows.append(("dit budgeted", "skipped: --dit-minutes 0"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def format_table(rows: list[tuple[str, dict[str, Any] | str]]) -> str:
    """The rows as a fixed-width table: row, img/s, step s, peak GB, MFU, note."""

    def cell(value: float | None, fmt: str) -> str:
        return format(value, fmt) if value is not None else "-"

    lines = [f"{'row':<24} {'img/s':>9} {'step s':>8} {'peak GB':>8} {'MFU':>6}  note"]
    for name, row in rows:
        if isinstance(row, str):
            lines.append(f"{name:<24} {row}")
            continue
        lines.append(
            f"{name:<24} {cell(row.get('images_per_s'), ',.1f'):>9} "
            f"{cell(row.get('step_s'), '.4f'):>8} {cell(row.get('peak_gb'), '.2f'):>8} "
            f"{cell(row.get('mfu'), '.1%'):>6}  {row.get('note', '')}"
        )
    return "\n".join(lines)


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return f"{torch.cuda.device_count()} x {name}, torch {torch.__version__}"
    return f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny configs and few steps (CI)")
    parser.add_argument("--dataset", help="DatasetRef JSON or path, with caches at both sizes")
    parser.add_argument("--source", default=str(OXFORD_MINI), help="archive used without --dataset")
    parser.add_argument("--grid", default=str(DEFAULT_GRID), help="where the DiT's grid goes")
    parser.add_argument("--steps", type=int, help="steps per throughput row (60; smoke 6)")
    parser.add_argument("--warmup", type=int, help="untimed first steps (20; smoke 2)")
    parser.add_argument("--log-every", type=int, help="steps between progress rows (5; smoke 1)")
    parser.add_argument("--dit-minutes", type=float, help="budget of the DiT run (5; smoke 0.1)")
    parser.add_argument("--ddp", type=int, default=0, help="world size of the DDP row (0: auto)")
    parser.add_argument(
        "--x-pred", action="store_true", help="a second budgeted DiT with prediction='x'"
    )
    args = parser.parse_args(argv)
    defaults = (6, 2, 1, 0.1) if args.smoke else (60, 20, 5, 5.0)
    for name, value in zip(("steps", "warmup", "log_every", "dit_minutes"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --device cpu --smoke")

    started = time.monotonic()
    rows = run_check(args)
    device = torch.device(args.device)
    print(f"GPU check, {datetime.date.today()}, {describe_machine(device)}")
    print(format_table(rows))
    print(f"total {time.monotonic() - started:.0f} s")
    if device.type == "cuda" and not args.smoke:
        print(
            "\nRecord in docs/benchmarks.md#gpu-check: the date, the GPU line above, this table,"
            " the data set, and the grid (copy it to docs/gpu/ and link it); compare img/s and MFU"
            " with docs/gpu_presets.md's expected figures."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
