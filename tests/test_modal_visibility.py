"""Modal runs as visible as local ones (issue #19 §6), with the Modal double of
tests/modal_double.py running the real function bodies: the evaluation's pictures read back from
the runs volume, training progress through the progress Dict, one dataset build per version across
containers (a lease in a Dict), the DatasetRef on stdout and the downloader's lines on stderr.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import OXFORD_MINI
from modal_double import FakeCall, ModalDouble, wire_volumes
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

import data.download
from data.dataset import DatasetRef, DatasetSpec
from tasks.adapters import modal_app
from tasks.adapters import modal_calls as backend
from tasks.adapters.prefect_tasks import evaluate_task
from tasks.evaluation.options import EvalOptions
from tasks.paths import BUILDS_DICT, PROGRESS_DICT
from tasks.train import TRAINERS, build_config


@pytest.fixture
def modal(tmp_path, monkeypatch):
    """The double wired in (volumes, Dicts, remote calls), polled every 0.2 s."""
    volumes = wire_volumes(tmp_path, monkeypatch)
    double = ModalDouble(volumes["env"])
    monkeypatch.setattr(backend, "lookup", double.resolve)
    monkeypatch.setattr(backend, "read_volume_file", double.read_file)
    monkeypatch.setattr(backend, "POLL_S", 0.2)
    double.volumes = volumes
    return double


def _artifacts(flow_run_id) -> list:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


# ---- dataset builds: one container builds, the others wait and reuse ------------------------


@pytest.fixture
def builds(monkeypatch, http_server):
    """A served archive, its spec, and a count of the builds started. Each build takes 3 s more,
    so concurrent calls overlap; the version's file lock is a no-op in every call, as between two
    containers (flock does not reach across machines)."""
    http_server.add("/pets.tar.gz", OXFORD_MINI)
    spec = DatasetSpec(source=http_server.url("/pets.tar.gz"), labels="species",
                       image_sizes=[32], max_other=40)  # fmt: skip
    started: list[float] = []
    real_build = data.download._build

    def slow_counted_build(*args, **kwargs):
        started.append(time.monotonic())
        time.sleep(3.0)
        return real_build(*args, **kwargs)

    class NoLock:
        def acquire(self, timeout=None):
            pass

        def release(self):
            pass

    monkeypatch.setattr(data.download, "_build", slow_counted_build)
    monkeypatch.setattr(data.download, "version_lock", lambda *a: NoLock())
    monkeypatch.setattr(modal_app, "LEASE_POLL_S", 0.05)
    return spec, started


def test_two_containers_ensuring_one_version_build_it_once(modal, builds, monkeypatch):
    spec, started = builds
    # Shorter than the build: only a renewed lease keeps the second container waiting.
    monkeypatch.setattr(modal_app, "LEASE_S", 1.5)
    ensure = modal.resolve("ensure_dataset")
    calls = [ensure.spawn(spec=spec.model_dump_json()) for _ in range(2)]
    refs = [DatasetRef.model_validate(call.get(timeout=120)) for call in calls]

    assert len(started) == 1, f"{len(started)} builds"
    assert refs[0] == refs[1] and refs[0].version == spec.version_id()
    leases = modal.volumes["dicts"][BUILDS_DICT]
    lease = leases.get(f"{spec.version_id()}#0")
    assert lease["expires"] == 0.0  # released once published
    assert leases.puts[f"{spec.version_id()}#0"] >= 3  # taken, renewed, released
    assert not leases.contains(f"{spec.version_id()}#1")  # never taken over
    # The builder committed the data volume once; the waiter reloaded it after that commit and
    # found the published version there.
    data_events = [(op, files) for op, vol, _, files in modal.volumes["log"] if vol == "data"]
    commits = [i for i, (op, _) in enumerate(data_events) if op == "commit"]
    assert len(commits) == 1
    manifest = f"{spec.version_id()}/manifest.json"
    assert any(op == "reload" and manifest in files for op, files in data_events[commits[0] :])


def test_a_dead_containers_lease_expires_and_another_builds(modal, builds):
    spec, started = builds
    leases = modal.volumes["dicts"][BUILDS_DICT]
    # A container that took the lease and died: nobody renews it, it runs out in 1.5 s.
    leases.put(f"{spec.version_id()}#0", {"owner": "crashed", "expires": time.time() + 1.5})
    t0 = time.monotonic()
    ref = modal.resolve("ensure_dataset").spawn(spec=spec.model_dump_json()).get(timeout=120)

    assert len(started) == 1 and started[0] - t0 >= 1.4  # waited for the lease to run out
    assert ref["version"] == spec.version_id()
    assert leases.get(f"{spec.version_id()}#0")["owner"] == "crashed"  # superseded, not rewritten
    taken = leases.get(f"{spec.version_id()}#1")
    assert taken["owner"] != "crashed" and taken["expires"] == 0.0


def test_ensure_dataset_prints_the_ref_and_logs_the_downloader(modal, builds, capsys):
    spec, _ = builds
    ensure = modal.resolve("ensure_dataset")
    ref = ensure.spawn(spec=spec.model_dump_json()).get(timeout=120)
    again = ensure.spawn(spec=spec.model_dump_json()).get(timeout=120)
    out, err = capsys.readouterr()

    # `modal run ...::ensure_dataset` shows the container's stdout: the ref is its last line.
    printed = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert printed == [ref, again] and ref == again
    # The downloader's INFO lines reach stderr (Modal's logs), each once.
    assert err.count(f"INFO data.download: published {ref['root']}") == 1, err
    assert f"data set {spec.version_id()} is published on the volume; reusing it" in err


# ---- training progress through the Dict --------------------------------------------------


def test_training_progress_reaches_the_ui_from_the_dict(
    modal, monkeypatch, oxford_mini_species_ref
):
    run_name = "progress/dit"
    progress = modal.volumes["dicts"][PROGRESS_DICT]
    stale = {"step": 999, "total_steps": 1000, "loss": 1.0, "lr": 1e-4, "images_per_s": 1.0}
    progress.put(run_name, stale)  # left by an earlier call with the same run name

    def nothing_committed(volume, path):  # progress can only come from the Dict
        raise FileNotFoundError(path)

    monkeypatch.setattr(backend, "read_volume_file", nothing_committed)
    seen: list[str] = []
    shown, rows = threading.Event(), []

    class HeldAtFirstRow(modal_app._PeriodicCommit):
        """Holds the training at its first row until the UI showed it (at most 60 s)."""

        def __call__(self, row: dict) -> None:
            super().__call__(row)
            if not rows:
                rows.append((row["step"], time.monotonic()))
                shown.wait(60)

    monkeypatch.setattr(modal_app, "_PeriodicCommit", HeldAtFirstRow)

    def watch_ui(flow_run_id, stop):
        while not stop.is_set():
            for artifact in _artifacts(flow_run_id):
                if artifact.type == "progress" and artifact.description not in seen:
                    seen.append(artifact.description)
                    if len(rows) == 1 and f"step {rows[0][0]}/" in artifact.description:
                        rows.append(time.monotonic())
                        shown.set()
            time.sleep(0.1)

    @flow(name="remote-progress")
    def remote_training() -> dict:
        from prefect.runtime import flow_run

        stop = threading.Event()
        watcher = threading.Thread(target=watch_ui, args=(flow_run.id, stop), daemon=True)
        watcher.start()
        try:
            watch = backend.RemoteTrainingProgress("dit · cpu-tiny", run_name, None)
            result = backend.run_on_modal(
                "train_dit", watch=watch, dataset=oxford_mini_species_ref.model_dump_json(),
                run_name=run_name, preset="cpu-tiny",
                overrides=json.dumps({"steps": 6, "log_every": 2, "warmup_steps": 1}),
            )  # fmt: skip
            watch.finished()
            return result
        finally:
            stop.set()
            watcher.join()

    remote_training()
    assert shown.is_set(), seen
    step, put_at = rows[0]
    assert rows[1] - put_at < 5.0  # polled every 0.2 s here; every 10 s by default
    assert any(f"dit · cpu-tiny (Modal): step {step}/6" in text for text in seen), seen
    assert not any("step 999" in text for text in seen), seen  # the stale row was dropped
    assert progress.puts[run_name] >= 3 and not progress.contains(run_name)  # cleared at the end


class _Stop(Exception):
    pass


def test_a_watched_call_is_polled_often_enough(modal, monkeypatch):
    """With the default poll interval (30 s), a watched call is still polled every 10 s, so that
    with the container's writes every 5 s the UI trails a step by 15 s at most."""
    monkeypatch.setattr(backend, "POLL_S", 30.0)
    modal.script = {"evaluate": ["hang"]}
    timeouts: list[float | None] = []
    real_get = FakeCall.get

    def recording_get(self, timeout=None):
        timeouts.append(timeout)
        return real_get(self, 0.01)

    monkeypatch.setattr(FakeCall, "get", recording_get)

    def watch() -> None:
        if len(timeouts) >= 2:
            raise _Stop  # stop waiting: the call is cancelled

    @flow(name="watched-poll")
    def watched() -> None:
        backend.run_on_modal("evaluate", watch=watch, dataset="", out="x")

    state = watched(return_state=True)
    assert state.is_failed() and modal.calls[0].cancels == 1
    assert timeouts == [backend.WATCH_POLL_S] * 2
    assert modal_app.PROGRESS_EVERY_S + backend.WATCH_POLL_S <= 30


# ---- the evaluation's pictures, read back from the runs volume ----------------------------


def test_modal_evaluation_publishes_grid_and_confusion_matrix(modal, oxford_mini_species_ref):
    torch.set_num_threads(2)
    runs = modal.volumes["runs"]
    for name in ("classifier", "dit"):
        overrides = {"steps": 4, "warmup_steps": 1, "log_every": 2, "image_size": 32}
        config = build_config(name, "cpu-tiny", overrides)
        TRAINERS[name].train(config, oxford_mini_species_ref, runs / "r" / name)

    @flow(name="remote-evaluation")
    def remote_evaluation() -> tuple:
        from prefect.runtime import flow_run

        options = EvalOptions(samples_per_class=5, steps=3, kid_subsets=10, deployment="remote",
                              inception_download=False)  # fmt: skip
        result = evaluate_task(
            dataset=oxford_mini_species_ref.model_dump(mode="json"), out="r/report",
            classifier="r/classifier", dit="r/dit", options=options, backend_name="modal",
        )  # fmt: skip
        return flow_run.id, result

    run_id, result = remote_evaluation()
    assert [c.name for c in modal.calls] == ["evaluate"]
    by_key = {a.key: a for a in _artifacts(run_id)}
    markdown = by_key["remote-eval-report"].data
    # The grid, confusion matrix and both memorisation pictures inline, as the local path does;
    # nothing links to the container's paths.
    assert markdown.count("data:image/png;base64,") == 4, markdown[:500]
    assert "](samples_grid.png)" not in markdown
    rows = json.loads(by_key["remote-eval-metrics"].data)
    assert {r["metric"] for r in rows} >= set(result["metrics"])
    assert "modal volume get train-cats-runs r/report" in by_key["eval-report-location"].data
