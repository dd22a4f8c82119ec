"""benchmarks/gpu_check.py on the CPU (`--device cpu --smoke`), so that the GPU check cannot rot:
every row of its table is printed and the DiT's sample grid is written where `--grid` says."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
THROUGHPUT_ROWS = ("dit", "dit resident-off", "classifier", "classifier resident-off", "dit ddp-2")


def test_smoke_prints_every_row_and_saves_the_grid(shared_datasets: Path, tmp_path: Path):
    grid = tmp_path / "out" / "grid.png"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--smoke"]
    proc = subprocess.run(
        [*command, "--grid", str(grid), "--ddp", "2", "--x-pred"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,  # ~40 s on a quiet 2-core machine; minutes when other jobs share it
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    table = lines[lines.index(next(x for x in lines if x.startswith("row "))) :]
    rows = {re.split(r"\s{2,}", line, maxsplit=1)[0]: line for line in table[1:]}
    assert "float32 512^3" in rows["matmul peak"], rows
    for name in THROUGHPUT_ROWS:
        figures = rows[name][len(name) :].split()
        images_per_s, step_s, mfu = (
            float(figures[0].replace(",", "")),
            float(figures[1]),
            figures[3],
        )
        assert images_per_s > 0 and step_s > 0 and mfu.endswith("%"), rows[name]
    assert "scaling efficiency" in rows["dit ddp-2"]
    assert str(grid) in rows["dit 0.1-min"]
    x_grid = grid.with_name("grid-x-pred.png")
    assert str(x_grid) in rows["dit 0.1-min x-pred"]
    held_out = {}
    for name in ("dit 0.1-min", "dit 0.1-min x-pred"):
        held_out[name] = float(re.search(r"held-out (\d+\.\d+)", rows[name]).group(1))
    # Both are velocity MSEs on the same images, times and noise: finite, and not the same model
    assert all(0 < value < 10 for value in held_out.values()), held_out
    assert held_out["dit 0.1-min"] != held_out["dit 0.1-min x-pred"], held_out
    for path in (grid, x_grid):
        with Image.open(path) as image:
            assert image.width > 32 and image.height > 32  # two class rows of 32 px samples


def test_held_out_loss_is_paired_and_falls_with_training(oxford_mini_species_ref, tmp_path: Path):
    """The held-out loss draws the same (t, noise) for every export, so a second call on the same
    export gives the same number to the last bit, and a trained export scores below the same
    model after a single step."""
    from benchmarks.gpu_check import NEVER, SMOKE, held_out_loss
    from tasks.train import train

    losses = {}
    for steps in (1, 60):
        overrides = {
            **SMOKE["dit"],
            "steps": steps,
            "time_budget_minutes": None,
            "progress_bar": False,
            "device": "cpu",
            "world_size": 1,
            "sample_every": NEVER,
            "ckpt_every_steps": NEVER,
            "ema_decay": 0.0,  # the export is the last step's weights: what training reached
        }
        result = train("dit", "gpu", overrides, oxford_mini_species_ref, tmp_path / str(steps))
        first = held_out_loss(result["run_dir"], oxford_mini_species_ref, "cpu", repeats=2)
        assert held_out_loss(result["run_dir"], oxford_mini_species_ref, "cpu", repeats=2) == first
        losses[steps] = first
    assert losses[60] < losses[1], losses
