"""The Modal path's wiring, with a double for Modal's remote calls (tests/modal_double.py) that runs
the real Modal function bodies locally: arguments, volume paths, commit/reload order, call-id
artifacts, concurrency of the two trainings, cancellation, and the no-credentials error.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import warnings
from pathlib import Path

import pytest
from conftest import OXFORD_MINI
from modal_double import ModalDouble, wire_volumes
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterType,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort
from prefect.exceptions import TerminationSignal

from flows.train_cats import train_cats
from tasks.adapters import limits, modal_app
from tasks.adapters import modal_calls as backend


@pytest.fixture
def volumes(tmp_path, monkeypatch):
    """Two folders standing in for the volumes, wired as the image wires /data and /runs."""
    return wire_volumes(tmp_path, monkeypatch)


def _artifacts(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def test_functions_declare_volumes_gpu_no_retries_and_single_use_containers():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        infos = {n: getattr(modal_app, n).info() for n in ("ensure_dataset", "train_classifier",
                                                         "train_dit", "evaluate")}  # fmt: skip
    assert {k: v.name for k, v in infos["ensure_dataset"].volumes.items()} == {
        "/data": "train-cats-data"
    }
    for name in ("train_classifier", "train_dit", "evaluate"):
        info = infos[name]
        assert {k: v.name for k, v in info.volumes.items()} == {
            "/data": "train-cats-data",
            "/runs": "train-cats-runs",
        }
        assert info.gpus == [(modal_app.DEFAULT_GPU, 1)]
        assert info.single_use_containers
        # No Modal-side retries: they would re-run a deterministic failure (tasks/adapters/
        # modal_app.py says why); the flow sets each call's timeout from its budget.
        assert not info.max_retries
        assert info.timeout < 3 * 3600
    # The image's storage roots are the mount points, so the plain functions write to volumes.
    assert str(modal_app.DATA_MOUNT) in infos["ensure_dataset"].volumes


class _ProgressWatcher:
    """Reads the progress artifacts through the Prefect API while the flow runs. Each remote
    training is held at its first metrics row (with a timeout) until a progress artifact showing
    that row from the volume has been seen, so the check does not race the tiny trainings."""

    def __init__(self, models: tuple[str, ...]):
        self.seen: dict[str, tuple[float, str]] = {}
        self.released = {m: threading.Event() for m in models}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        with get_client(sync_client=True) as client:
            while not self.stop.is_set():
                for artifact in client.read_artifacts(
                    artifact_filter=ArtifactFilter(type=ArtifactFilterType(any_=["progress"]))
                ):
                    text, value = artifact.description or "", float(artifact.data)
                    model = text.split(" ", 1)[0]
                    if model in self.released and "(Modal): step" in text and 0 < value < 100:
                        self.seen.setdefault(model, (value, text))
                        self.released[model].set()
                time.sleep(0.1)

    def gated_commit(self) -> type:
        """A `_PeriodicCommit` that holds its training (the double's thread is named after the
        function) until the watcher has seen that training's progress from the volume."""
        released = self.released

        class GatedCommit(modal_app._PeriodicCommit):
            def __call__(self, progress: dict) -> None:
                super().__call__(progress)
                released[threading.current_thread().name.removeprefix("train_")].wait(60)

        return GatedCommit


def test_modal_backend_runs_each_step_remotely_with_volume_discipline(
    volumes, monkeypatch, http_server
):
    double = ModalDouble(volumes["env"])
    monkeypatch.setattr(backend, "lookup", double.resolve)
    monkeypatch.setattr(backend, "read_volume_file", double.read_file)
    monkeypatch.setattr(backend, "POLL_S", 0.2)
    watcher = _ProgressWatcher(("classifier", "dit"))
    monkeypatch.setattr(modal_app, "_PeriodicCommit", watcher.gated_commit())
    http_server.add("/images.tar.gz", OXFORD_MINI)  # a Modal container reads sources by URL
    state = train_cats(
        dataset={"source": http_server.url("/images.tar.gz"), "labels": "species", "image_sizes": [32],
                 "max_other": 40},
        models=["classifier", "dit"],
        classifier={"preset": "cpu-tiny"},
        dit={"preset": "cpu-tiny"},
        compute={"backend": "modal", "gpu": "H100"},
        evaluation={"samples_per_class": 2},
        return_state=True,
    )  # fmt: skip
    watcher.stop.set()
    watcher.thread.join()
    assert state.is_completed(), state.message
    summary = state.result()

    # Progress: while each training ran, its artifact showed a step read from metrics.jsonl on
    # the runs volume; once the call returned, it reads 100.
    assert sorted(watcher.seen) == ["classifier", "dit"], watcher.seen
    for model, (value, text) in watcher.seen.items():
        assert 0 < value < 100 and f"{model} · cpu-tiny (Modal): step " in text, text
    progress = [a for a in _artifacts(state.state_details.flow_run_id) if a.type == "progress"]
    assert sorted(float(a.data) for a in progress) == [100.0, 100.0], progress

    # Arguments: every step ran on Modal, on the requested GPU, with JSON-able arguments.
    by_name = {c.name: c for c in double.calls}
    assert sorted(by_name) == [
        "ensure_dataset", "evaluate", "promote", "train_classifier", "train_dit"]  # fmt: skip
    assert double.gpus["train_dit"] == double.gpus["train_classifier"] == "H100"
    # Bounded spend: a GPU call's timeout follows its config (cpu-tiny has no time budget: the
    # stated cap), and Modal retries nothing; the CPU-only ensure_dataset keeps its declaration.
    cap = limits.training_timeout_s(None)
    assert double.options["train_dit"] == {"gpu": "H100", "timeout": cap, "retries": 0}
    assert double.options["evaluate"]["timeout"] == limits.EVALUATION_TIMEOUT_S
    assert double.options["ensure_dataset"] == {}
    spec = json.loads(by_name["ensure_dataset"].kwargs["spec"])
    assert spec["labels"] == "species" and spec["image_sizes"] == [32]
    dit = by_name["train_dit"].kwargs
    assert dit["preset"] == "cpu-tiny" and json.loads(dit["overrides"]) == {}
    ref = json.loads(dit["dataset"])
    # Volume paths: the dataset lives on the data volume, the runs on the runs volume.
    assert Path(ref["root"]).parent == volumes["data"]
    assert dit["run_name"].endswith("/dit")
    prefix = dit["run_name"].rsplit("/", 1)[0]
    assert by_name["train_classifier"].kwargs["run_name"] == f"{prefix}/classifier"
    ev = by_name["evaluate"].kwargs
    assert (ev["classifier"], ev["dit"], ev["out"]) == (
        f"{prefix}/classifier", f"{prefix}/dit", f"{prefix}/report")  # fmt: skip
    assert (volumes["runs"] / prefix / "dit" / "model.safetensors").is_file()
    assert (volumes["runs"] / prefix / "report" / "report.json").is_file()
    assert summary["run_dirs"]["dit"] == str(volumes["runs"] / prefix / "dit")
    assert summary["dataset_version"] == ref["version"]

    # Commit/reload order, per function (thread): read what others committed, commit what we wrote.
    def events(fn):
        return [(op, vol, files) for op, vol, thread, files in volumes["log"] if thread == fn]

    ensure = events("ensure_dataset")
    assert [e[:2] for e in ensure] == [("reload", "data"), ("commit", "data")]
    assert not ensure[0][2] and any(f.endswith("manifest.json") for f in ensure[1][2])
    for model in ("classifier", "dit"):
        steps = events(f"train_{model}")
        assert [e[:2] for e in steps[:2]] == [("reload", "data"), ("reload", "runs")]
        assert not any(f.startswith(f"{prefix}/{model}/") for f in steps[1][2])
        assert steps[-1][:2] == ("commit", "runs")
        assert f"{prefix}/{model}/model.safetensors" in steps[-1][2]
    # The two trainings overlapped: each started before the other finished.
    threads = [thread for _, _, thread, _ in volumes["log"]]
    first = {m: threads.index(f"train_{m}") for m in ("classifier", "dit")}
    last = {m: len(threads) - 1 - threads[::-1].index(f"train_{m}") for m in first}
    assert first["dit"] < last["classifier"] and first["classifier"] < last["dit"]
    evaluation = events("evaluate")
    assert [e[:2] for e in evaluation[:2]] == [("reload", "data"), ("reload", "runs")]
    assert f"{prefix}/dit/model.safetensors" in evaluation[1][2]
    assert evaluation[-1][:2] == ("commit", "runs")
    assert f"{prefix}/report/report.json" in evaluation[-1][2]

    # Each call id is a table artifact of the flow run.
    recorded = {
        row["call_id"]
        for artifact in _artifacts(state.state_details.flow_run_id)
        if (artifact.key or "").startswith(backend.CALL_ARTIFACT_PREFIX)
        for row in json.loads(artifact.data)
    }
    assert recorded == {c.object_id for c in double.calls}


class _Terminated(Exception):
    pass


@flow(
    name="one-remote-training",
    on_crashed=[backend.cancel_recorded_calls],
    on_cancellation=[backend.cancel_recorded_calls],
)
def _one_remote_training(dataset: str, run_name: str) -> dict:
    return backend.run_on_modal(
        "train_dit",
        poll_s=0.2,
        dataset=dataset,
        run_name=run_name,
        preset="cpu-tiny",
        overrides=json.dumps({"steps": 1_000_000, "ckpt_every_steps": 5}),
    )


def test_sigterm_while_waiting_cancels_the_modal_call(
    volumes, monkeypatch, oxford_mini_species_ref
):
    double = ModalDouble(volumes["env"], in_process=False)
    monkeypatch.setattr(backend, "lookup", double.resolve)
    monkeypatch.setattr(backend, "call_from_id", double.from_id)
    run_dir = volumes["runs"] / "cancel" / "dit"

    def terminate_once_training_checkpoints():
        deadline = time.monotonic() + 120
        while not list(run_dir.glob("checkpoints/*")) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGTERM)  # what a worker sends to cancel a flow run

    def backstop(*_):  # only if Prefect had not installed its own SIGTERM handler
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, backstop)
    killer = threading.Thread(target=terminate_once_training_checkpoints, daemon=True)
    killer.start()
    try:
        # Prefect turns SIGTERM into TerminationSignal, crashes the run, then re-raises the
        # signal to the previous handler (the backstop).
        with pytest.raises((TerminationSignal, _Terminated)):
            _one_remote_training(oxford_mini_species_ref.model_dump_json(), "cancel/dit")
    finally:
        killer.join()
        signal.signal(signal.SIGTERM, previous)
    (call,) = double.calls
    # Cancelled twice: by the waiting loop, then by the flow's on_crashed hook from the artifact.
    assert call.cancels == 2 and not call.process.is_alive()
    assert list(run_dir.glob("checkpoints/*")), "the call was stopped before it started training"
    assert not (run_dir / "model.safetensors").exists()
    with get_client(sync_client=True) as client:
        (flow_run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["one-remote-training"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
    assert flow_run.state.is_crashed() or flow_run.state.is_cancelled(), flow_run.state
    recorded = [row["call_id"] for a in _artifacts(flow_run.id) for row in json.loads(a.data)]
    assert recorded == [call.object_id]


def test_modal_backend_without_credentials_fails_before_any_work(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "absent.toml"))
    monkeypatch.setattr(backend, "lookup", lambda *a, **k: pytest.fail("Modal was contacted"))
    state = train_cats(compute={"backend": "modal"}, return_state=True)
    assert state.is_failed()
    with pytest.raises(backend.ModalUnavailableError, match=r"MODAL_TOKEN_ID.*modal token new"):
        state.result()
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(state.state_details.flow_run_id)
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert tasks == []
