"""Where runs and reports live: the storage roots and names every step agrees on (no torch, no
Prefect).

Locally ``$TRAIN_CATS_RUNS_DIR`` or ``./artifacts/runs``; on Modal the image sets
``TRAIN_CATS_RUNS_DIR=/runs``, the mount point of the runs volume, so the same run names resolve to
the same places on both backends.
"""

from __future__ import annotations

import os
from pathlib import Path

# Inside a run dir: the training's rows (one JSON object a line) and its sample grids; inside a
# report folder the same SAMPLES_DIR holds the single generated images.
METRICS = "metrics.jsonl"
SAMPLES_DIR = "samples"

# On Modal: the deployed app, its volumes (mounted at /data and /runs) and the default GPU (48 GB,
# the best price per DiT-S step of Modal's mid-range cards; any Modal GPU string works). Named
# here, not in the Prefect-side adapter, so that the container never imports Prefect for them.
APP_NAME = "train-cats"
DATA_VOLUME = "train-cats-data"
RUNS_VOLUME = "train-cats-runs"
# Modal Dicts: each training's newest progress row by run name (the flow reads it between polls),
# and the dataset-build leases (one container builds a version, the others wait and reuse it).
PROGRESS_DICT = "train-cats-progress"
BUILDS_DICT = "train-cats-dataset-builds"
DEFAULT_GPU = "L40S"


def runs_root() -> Path:
    """The folder holding run dirs and reports: ``$TRAIN_CATS_RUNS_DIR`` or ``./artifacts/runs``."""
    return Path(os.environ.get("TRAIN_CATS_RUNS_DIR", "artifacts/runs")).resolve()


def run_path(run_name: str) -> Path:
    """Absolute path of ``run_name`` (a relative name such as ``"2026-11-29/dit-cpu-tiny-ab12"``).

    Raises:
        ValueError: ``run_name`` is absolute or climbs out of the runs root with ``..``.
    """
    relative = Path(run_name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"run name {run_name!r} must be a relative path inside the runs root")
    return runs_root() / relative

