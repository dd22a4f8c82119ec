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
        [*command, "--grid", str(grid), "--ddp", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,  # ~30 s on a quiet 2-core machine; minutes when other jobs share it
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
    with Image.open(grid) as image:
        assert image.width > 32 and image.height > 32  # two class rows of 32 px samples
