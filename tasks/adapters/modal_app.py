"""The Modal backend: one app, one image, two volumes, and a thin function per pipeline step.

Every function here only translates arguments and storage paths, then calls the same plain function
that runs in-process on the local backend (``data.download.ensure``, ``tasks.train_*``,
``tasks.evaluate``). Storage follows one rule: a reader ``reload()``s a volume before reading it and
a writer ``commit()``s it after writing, so that the next container sees the result.

Layout of the volumes (the image sets ``TRAIN_CATS_DATA_DIR``/``TRAIN_CATS_RUNS_DIR`` to the mount
points, so the plain functions resolve the same paths as locally):

- ``train-cats-data`` at ``/data``: one folder per published dataset version.
- ``train-cats-runs`` at ``/runs``: ``<run name>/{classifier,dit,report}`` per flow run.

Deploy once with ``modal deploy tasks/adapters/modal_app.py``; the Prefect flow then calls the deployed
functions by name (``tasks/adapters/modal_calls.py``). For direct use without Prefect::

    modal run tasks/adapters/modal_app.py::ensure_dataset --spec '{"labels": "breed"}'
    modal run tasks/adapters/modal_app.py::train_dit --dataset /data/<version> --run-name demo/dit
"""

from __future__ import annotations

import json
import time
from pathlib import Path, PurePosixPath

import modal

from data import download
from data.dataset import DatasetSpec, load_ref
from tasks.evaluate import evaluate_runs
from tasks.evaluation.options import EvalOptions
from tasks.paths import APP_NAME, DATA_VOLUME, DEFAULT_GPU, RUNS_VOLUME, run_path
from tasks.train import train

DATA_MOUNT = PurePosixPath("/data")
RUNS_MOUNT = PurePosixPath("/runs")

# The ONE list of what the container carries, shared with tests/test_modal_image.py. It carries
# only ``*.py`` files (``add_local_python_source``): nothing here reads other files at run time.
PYTHON_SOURCES = ("data", "models", "tasks")
# Every third-party package, at the exact version the test suite runs against: the same lock file
# that setup.sh installs (tests/test_modal_image.py checks both against it).
LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"

# Modal's ceiling is 24 h per attempt; the trainings' own time budget is the real cap on spend.
TRAIN_TIMEOUT_S = 24 * 60 * 60
# Preemption restarts the same call; training resumes from the newest checkpoint on the volume.
PREEMPTION_RETRIES = modal.Retries(max_retries=3, backoff_coefficient=2.0, initial_delay=10.0)
# A running training commits its checkpoints at most this often, so a restart finds them.
COMMIT_EVERY_S = 300.0


def build_image() -> modal.Image:
    """The container image: Debian slim, the locked wheels, the project's packages."""
    image = (
        modal.Image.debian_slim(python_version="3.11")
        # Read when the image is built (on `modal deploy`/`modal run`), not when a container
        # imports this module, so the file need not be in the image itself.
        .pip_install_from_requirements(str(LOCK_FILE))
        .env(
            {
                "TRAIN_CATS_DATA_DIR": str(DATA_MOUNT),
                "TRAIN_CATS_RUNS_DIR": str(RUNS_MOUNT),
                "PYTHONUNBUFFERED": "1",
            }
        )
        .add_local_python_source(*PYTHON_SOURCES)
    )
    return image


app = modal.App(APP_NAME)
image = build_image()
data_volume = modal.Volume.from_name(DATA_VOLUME, create_if_missing=True)
runs_volume = modal.Volume.from_name(RUNS_VOLUME, create_if_missing=True)


class _PeriodicCommit:
    """A training ``progress`` callback that commits the runs volume every ``every_s`` seconds."""

    def __init__(self, every_s: float = COMMIT_EVERY_S):
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, _progress: dict) -> None:
        if time.monotonic() - self.last >= self.every_s:
            runs_volume.commit()
            self.last = time.monotonic()


@app.function(image=image, volumes={DATA_MOUNT: data_volume}, cpu=4.0, timeout=4 * 60 * 60)
def ensure_dataset(spec: str = "{}") -> dict:
    """Publish the dataset described by ``spec`` (DatasetSpec JSON) on the data volume; idempotent.

    Returns the DatasetRef as a dict; its ``root`` is a path under ``/data``.
    """
    dataset_spec = DatasetSpec.model_validate_json(spec)
    data_volume.reload()  # see versions published by other containers: reuse, don't re-download
    ref = download.ensure(dataset_spec)
    data_volume.commit()
    return ref.model_dump(mode="json")


def _train(model: str, dataset: str, run_name: str, preset: str, overrides: str) -> dict:
    data_volume.reload()
    runs_volume.reload()  # a retried call resumes from the checkpoints its predecessor committed
    result = train(
        model, preset, json.loads(overrides), load_ref(dataset), run_path(run_name),
        _PeriodicCommit(),
    )  # fmt: skip
    runs_volume.commit()
    return result


_GPU_FUNCTION = dict(
    image=image,
    gpu=DEFAULT_GPU,
    volumes={DATA_MOUNT: data_volume, RUNS_MOUNT: runs_volume},
    timeout=TRAIN_TIMEOUT_S,
    retries=PREEMPTION_RETRIES,
    single_use_containers=True,
)


@app.function(**_GPU_FUNCTION)
def train_classifier(
    dataset: str, run_name: str, preset: str = "gpu", overrides: str = "{}"
) -> dict:
    """Train the classifier into ``/runs/<run_name>``; ``dataset`` is a DatasetRef JSON or path."""
    return _train("classifier", dataset, run_name, preset, overrides)


@app.function(**_GPU_FUNCTION)
def train_dit(dataset: str, run_name: str, preset: str = "gpu", overrides: str = "{}") -> dict:
    """Train the DiT into ``/runs/<run_name>``; ``dataset`` is a DatasetRef JSON or path."""
    return _train("dit", dataset, run_name, preset, overrides)


@app.function(
    image=image,
    gpu=DEFAULT_GPU,
    volumes={DATA_MOUNT: data_volume, RUNS_MOUNT: runs_volume},
    timeout=2 * 60 * 60,
    retries=PREEMPTION_RETRIES,
    single_use_containers=True,
)
def evaluate(
    dataset: str, out: str, classifier: str = "", dit: str = "", options: str = "{}"
) -> dict:
    """Evaluate the exported runs under ``/runs`` into ``/runs/<out>``; returns the report dict.

    ``classifier``/``dit`` are run names (empty: skip that model); ``options`` is the JSON of
    ``tasks.evaluation.options.EvalOptions`` (samples per class, sampler, CFG scale ...).
    """
    opts = EvalOptions.model_validate_json(options)
    data_volume.reload()
    runs_volume.reload()
    report = evaluate_runs(load_ref(dataset), out, classifier or None, dit or None, opts)
    runs_volume.commit()
    return report
