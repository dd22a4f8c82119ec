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
from tasks.adapters import limits
from tasks.evaluate import evaluate_runs
from tasks.evaluation.options import EvalOptions
from tasks.paths import APP_NAME, DATA_VOLUME, DEFAULT_GPU, RUNS_VOLUME, run_path
from tasks.train import TRAINERS, build_config, train

DATA_MOUNT = PurePosixPath("/data")
RUNS_MOUNT = PurePosixPath("/runs")

# The ONE list of what the container carries, shared with tests/test_modal_image.py. It carries
# only ``*.py`` files (``add_local_python_source``): nothing here reads other files at run time.
PYTHON_SOURCES = ("data", "models", "tasks")
# Every third-party package, at the exact version the test suite runs against: the same lock file
# that setup.sh installs (tests/test_modal_image.py checks both against it).
LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"

# Static timeouts, for direct `modal run` use only: the flow sets each call's timeout from its
# config's time budget (`with_options`, tasks/adapters/limits.py). Here: the longest `gpu` preset.
TRAIN_TIMEOUT_S = max(
    limits.training_timeout_s(build_config(m, "gpu").time_budget_minutes) for m in TRAINERS
)
# No `retries=` on the GPU functions, on purpose. Modal's `retries` re-runs an input whose *code*
# failed or timed out (https://modal.com/docs/guide/retries), i.e. a bad config, a NaN loss
# (FloatingPointError) or a bug, which fails the same way again, each time for up to a whole
# timeout of GPU time (timeouts are per attempt: https://modal.com/docs/guide/timeouts).
# Preemption needs none: "Modal will gracefully terminate the Function and restart it on the same
# input" (https://modal.com/docs/guide/preemption), and a container that crashes after start-up is
# rescheduled by Modal too (guide/retries); training then resumes from the newest checkpoint
# committed to the runs volume. The flow retries a step once more only after an infrastructure
# failure that reached the client (`modal.exception.InternalFailure`, tasks/adapters/limits.py).
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
    timeout=limits.EVALUATION_TIMEOUT_S,
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
