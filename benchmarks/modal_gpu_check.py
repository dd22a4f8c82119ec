"""Run `benchmarks/gpu_check.py` on a Modal GPU, in the trainings' own image and volumes.

    .venv/bin/modal run benchmarks/modal_gpu_check.py --dataset /data/<version> [--gpu L40S]

`--dataset` is a version folder on the `train-cats-data` volume with caches at 128 and 224 px
(the `all` deployment's run on Modal publishes one); the grid goes to
`/runs/gpu-check/<date>/dit-gpu-grid.png` on the `train-cats-runs` volume
(`modal volume get train-cats-runs gpu-check/<date>/dit-gpu-grid.png .`). The table is printed
here and returned. Nothing here is imported by the project; only Modal's CLI loads this file.
"""

from __future__ import annotations

import contextlib
import datetime
import io

import modal

from tasks.adapters.modal_app import DATA_MOUNT, RUNS_MOUNT, build_image, data_volume, runs_volume
from tasks.paths import DEFAULT_GPU

app = modal.App("train-cats-gpu-check")


@app.function(
    image=build_image().add_local_python_source("benchmarks"),
    gpu=DEFAULT_GPU,
    volumes={DATA_MOUNT: data_volume, RUNS_MOUNT: runs_volume},
    timeout=15 * 60,  # the check takes <= 8 minutes on one GPU; no retries: it is a measurement
)
def gpu_check(dataset: str) -> str:
    from benchmarks import gpu_check as check

    data_volume.reload()
    grid = f"{RUNS_MOUNT}/gpu-check/{datetime.date.today()}/dit-gpu-grid.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        check.main(["--dataset", dataset, "--grid", grid])
    runs_volume.commit()
    return out.getvalue()


@app.local_entrypoint()
def main(dataset: str, gpu: str = DEFAULT_GPU) -> None:
    print(gpu_check.with_options(gpu=gpu).remote(dataset))
