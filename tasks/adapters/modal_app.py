"""The Modal backend: one app, one image, two volumes, and a thin function per pipeline step.

Every function here only translates arguments and storage paths, then calls the same plain function
that runs in-process on the local backend (``data.download.ensure``, ``tasks.train_*``,
``tasks.evaluate``, ``tasks.promotion``). Storage follows one rule: a reader ``reload()``s a volume before reading it and
a writer ``commit()``s it after writing, so that the next container sees the result.

Layout of the volumes (the image sets ``TRAIN_CATS_DATA_DIR``/``TRAIN_CATS_RUNS_DIR`` to the mount
points, so the plain functions resolve the same paths as locally):

- ``train-cats-data`` at ``/data``: one folder per published dataset version.
- ``train-cats-runs`` at ``/runs``: ``<run name>/{classifier,dit,report}`` per flow run, and the
  champion records, ``champions/<deployment>/<kind>.json``.

Two Modal Dicts carry what must not wait for a volume commit: ``train-cats-progress`` holds each
training's newest progress row under its run name (the flow shows it within seconds), and
``train-cats-dataset-builds`` holds the leases that let one container build a dataset version
while the others wait for it (``BuildLease``). Every function logs the project's INFO lines
(downloader, trainers, evaluation) to stderr, which Modal keeps in the app's logs.

Deploy once with ``modal deploy tasks/adapters/modal_app.py``; the Prefect flow then calls the deployed
functions by name (``tasks/adapters/modal_calls.py``). For direct use without Prefect (the first
prints the DatasetRef as its last stdout line: its ``root`` is the ``--dataset`` to pass on)::

    modal run tasks/adapters/modal_app.py::ensure_dataset --spec '{"labels": "breed"}'
    modal run tasks/adapters/modal_app.py::train_dit --dataset /data/<version> --run-name demo/dit
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path, PurePosixPath

import modal

from data import download
from data.dataset import DatasetRef, DatasetSpec, default_data_dir, load_ref, read_manifest
from tasks.adapters import limits
from tasks.evaluate import evaluate_runs
from tasks.evaluation.options import EvalOptions
from tasks.paths import (
    APP_NAME,
    BUILDS_DICT,
    DATA_VOLUME,
    DEFAULT_GPU,
    PROGRESS_DICT,
    RUNS_VOLUME,
    run_path,
)
from tasks.promotion import promote_runs
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
# Promotion compares two report.json files, in seconds, so it needs no GPU. Only when the champion's
# report is not like for like (a new data revision, a new judge) does it evaluate the champion again,
# on this container's CPUs (minutes for the gpu presets' sample counts): rare, and billed at CPU
# prices (cents an hour), so the GPU spend bound (tasks/adapters/limits.py) stays exact. Bounded
# like the evaluation, and, like every function here, no `retries=`.
PROMOTE_CPUS = 8.0
PROMOTE_TIMEOUT_S = limits.EVALUATION_TIMEOUT_S
# A running training commits its checkpoints at most this often, so a restart finds them.
COMMIT_EVERY_S = 300.0
# A training puts its newest progress row in the progress Dict at most this often (and always
# its last): a Dict write takes a few dozen ms, the flow reads it every POLL_S (10 s) at most.
PROGRESS_EVERY_S = 5.0
# A dataset build's lease lasts this long unless renewed (every LEASE_S / 5 while it builds), so a
# crashed builder blocks the others for 5 minutes at most; waiters look again this often.
LEASE_S = 300.0
LEASE_POLL_S = 10.0
# Whose INFO lines reach the container's stderr: the downloader's and the trainers'.
LOGGERS = ("data", "tasks")

log = logging.getLogger(__name__)


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
progress_dict = modal.Dict.from_name(PROGRESS_DICT, create_if_missing=True)
build_leases = modal.Dict.from_name(BUILDS_DICT, create_if_missing=True)


class _StderrHandler(logging.StreamHandler):
    """A stream handler on whatever ``sys.stderr`` is when a line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def _configure_logging() -> None:
    """Send the ``data``/``tasks`` loggers' INFO lines to stderr; idempotent (one per container).

    A container's Python has no logging set up, so the downloader's progress lines were dropped;
    Modal keeps everything the container writes to stderr in the app's logs (and ``modal run``
    streams it).
    """
    for name in LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
            logger.addHandler(_StderrHandler())
        if logger.getEffectiveLevel() > logging.INFO:
            logger.setLevel(logging.INFO)


class _PeriodicCommit:
    """A training ``progress`` callback that commits the runs volume every ``every_s`` seconds."""

    def __init__(self, every_s: float = COMMIT_EVERY_S):
        self.every_s = every_s
        self.last = time.monotonic()

    def __call__(self, _progress: dict) -> None:
        if time.monotonic() - self.last >= self.every_s:
            runs_volume.commit()
            self.last = time.monotonic()


class _ProgressRelay:
    """A training ``progress`` callback that puts the newest row, stamped ``at`` (epoch seconds),
    in the progress Dict under ``key``, at most every ``PROGRESS_EVERY_S`` and always the last.

    Progress is a convenience: a failed write is logged once and never fails the training.
    """

    def __init__(self, key: str):
        self.key, self.last, self.failed = key, float("-inf"), False

    def __call__(self, progress: dict) -> None:
        now = time.monotonic()
        if now - self.last < PROGRESS_EVERY_S and progress["step"] < progress["total_steps"]:
            return
        self.last = now
        try:
            progress_dict.put(self.key, {**progress, "at": time.time()})
        except Exception as exc:
            if not self.failed:
                log.warning("could not write progress to the %s Dict: %s", PROGRESS_DICT, exc)
            self.failed = True


def _container_progress(run_name: str):
    """The callback a training gets: the row to the progress Dict, then the periodic commit."""
    relay, commit = _ProgressRelay(run_name), _PeriodicCommit()

    def progress(row: dict) -> None:
        relay(row)
        commit(row)

    return progress


class BuildLease:
    """A lease on building one dataset version, shared by every container through a Modal Dict.

    The Dict offers an atomic put-if-absent (``put(key, value, skip_if_exists=True)`` returns
    whether it added the key) but no compare-and-swap, so a lease is never overwritten by another
    container: it is superseded. The leases of version V live at ``V#0``, ``V#1``, ...; the
    newest is the current one. ``try_acquire`` put-if-absents each generation in turn, skipping
    released or expired ones (only one container can add the next), and stops at a live one held
    by someone else. The holder renews its lease in a thread, every ``lease_s / 5``, until
    released or superseded. Keys are never deleted, so the scan sees every generation (Modal drops
    an entry only after 7 days without reads or writes, far beyond any build).
    """

    def __init__(self, leases, version: str, lease_s: float | None = None):
        self.leases, self.version = leases, version
        self.lease_s = LEASE_S if lease_s is None else lease_s
        self.owner = f"{os.environ.get('MODAL_TASK_ID') or socket.gethostname()}:{os.getpid()}:" \
            f"{uuid.uuid4().hex[:8]}"  # fmt: skip
        self.key: str | None = None
        self.holder: dict | None = None  # the live lease that stopped the last try
        self._stop = threading.Event()

    def _lease(self, expires: float) -> dict:
        return {"owner": self.owner, "expires": expires}

    def try_acquire(self) -> bool:
        """Take the lease unless another container holds a live one (then ``holder`` is it)."""
        generation = 0
        while True:
            key = f"{self.version}#{generation}"
            if self.leases.put(key, self._lease(time.time() + self.lease_s), skip_if_exists=True):
                self.key = key
                threading.Thread(target=self._renew, args=(generation,), daemon=True).start()
                return True
            held = self.leases.get(key)
            if held is not None and held["expires"] > time.time():
                self.holder = held
                return False
            generation += held is not None  # absent: it just expired in Modal; try it again

    def _renew(self, generation: int) -> None:
        successor = f"{self.version}#{generation + 1}"
        while not self._stop.wait(self.lease_s / 5):
            if self.leases.get(successor) is not None:
                log.warning("lease %s expired and was taken over; still building", self.key)
                return
            self.leases.put(self.key, self._lease(time.time() + self.lease_s))

    def release(self) -> None:
        """End the lease at once (expired), so that a waiter may take the next one."""
        self._stop.set()
        if self.key is not None:
            self.leases.put(self.key, self._lease(0.0))


def _published(version: str) -> DatasetRef | None:
    root = default_data_dir() / version
    manifest = read_manifest(root)
    return None if manifest is None else manifest.to_ref(root)


def _ensure_once(spec: DatasetSpec) -> DatasetRef:
    """``download.ensure`` by one container at a time per version; the others wait and reuse."""
    version = spec.version_id()
    lease = BuildLease(build_leases, version)
    while True:
        data_volume.reload()  # see versions published by other containers: reuse, don't re-download
        ref = _published(version)
        if ref is not None:
            log.info("data set %s is published on the volume; reusing it", version)
            return ref
        if lease.try_acquire():
            break
        log.info("%s is building %s (lease until %s); waiting", lease.holder["owner"], version,
                 time.strftime("%H:%M:%S", time.gmtime(lease.holder["expires"])))  # fmt: skip
        time.sleep(LEASE_POLL_S)
    try:
        ref = download.ensure(spec)
        data_volume.commit()  # before the release: a waiter that sees it released finds the data
    finally:
        lease.release()
    return ref


@app.function(image=image, volumes={DATA_MOUNT: data_volume}, cpu=4.0, timeout=4 * 60 * 60)
def ensure_dataset(spec: str = "{}") -> dict:
    """Publish the dataset described by ``spec`` (DatasetSpec JSON) on the data volume; idempotent.

    Returns the DatasetRef as a dict (its ``root`` is a path under ``/data``) and prints it as
    JSON, last on stdout, which ``modal run`` does not do with a return value.
    """
    _configure_logging()
    ref = _ensure_once(DatasetSpec.model_validate_json(spec))
    print(ref.model_dump_json(), flush=True)
    return ref.model_dump(mode="json")


def _train(model: str, dataset: str, run_name: str, preset: str, overrides: str) -> dict:
    _configure_logging()
    data_volume.reload()
    runs_volume.reload()  # a retried call resumes from the checkpoints its predecessor committed
    result = train(
        model, preset, json.loads(overrides), load_ref(dataset), run_path(run_name),
        _container_progress(run_name),
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
    _configure_logging()
    opts = EvalOptions.model_validate_json(options)
    data_volume.reload()
    runs_volume.reload()
    report = evaluate_runs(load_ref(dataset), out, classifier or None, dit or None, opts)
    runs_volume.commit()
    return report


@app.function(
    image=image,
    volumes={DATA_MOUNT: data_volume, RUNS_MOUNT: runs_volume},
    cpu=PROMOTE_CPUS,
    timeout=PROMOTE_TIMEOUT_S,
)
def promote(
    deployment: str,
    run_names: str,
    report_dir: str,
    dataset: str,
    options: str,
    fingerprint: str,
    judge: str = "",
    flow_run_id: str = "",
) -> dict:
    """Promote the runs of one flow run to ``deployment``'s champions (``champions/`` on
    ``/runs``) where their report (``report_dir``) shows no regression; returns the decisions.

    ``run_names``/``dataset``/``fingerprint`` are JSON (kind -> run name, the DatasetRef, the run's
    fingerprint), ``options`` the EvalOptions JSON; ``judge`` the classifier run that judged a DiT
    trained alone (empty: none). See ``tasks.promotion.promote_runs``.
    """
    _configure_logging()
    data_volume.reload()  # a champion re-evaluated like for like needs the data set
    runs_volume.reload()
    decisions = promote_runs(
        deployment, json.loads(run_names), report_dir, json.loads(dataset),
        EvalOptions.model_validate_json(options), json.loads(fingerprint), judge or None,
        flow_run_id or None,
    )  # fmt: skip
    runs_volume.commit()
    return decisions
