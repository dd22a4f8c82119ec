"""The flow's parameters, validation, command line and prefect.yaml, without training anything
(the end-to-end and dispatch tests run the flow for real)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import OXFORD_MINI, REPO
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.sorting import FlowRunSort

from flows import cli as module
from flows.cli import deployment_parameters, main
from flows.train_cats import train_cats
from tasks.adapters.prefect_tasks import train_dit_task

PREFECT_YAML = yaml.safe_load((REPO / "prefect.yaml").read_text())


def test_parameters_render_as_a_form_with_descriptions_and_bounds():
    schema = train_cats.parameters.model_dump()
    assert list(schema["properties"]) == [
        "dataset", "models", "classifier", "dit", "compute", "evaluation", "force"]  # fmt: skip
    definitions = schema["definitions"]
    for name in ("DatasetSpec", "TrainingParams", "ComputeParams", "EvaluationParams"):
        for field, spec in definitions[name]["properties"].items():
            assert spec.get("description"), f"{name}.{field} has no description"
    samples = definitions["EvaluationParams"]["properties"]["samples_per_class"]
    assert (samples["minimum"], samples["maximum"]) == (1, 1024)
    assert definitions["ComputeParams"]["properties"]["backend"]["enum"] == ["auto", "local", "modal"]


def _never_run(*_):
    pytest.fail("the flow ran despite invalid parameters")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--preset", "cpu-huge"], "unknown classifier preset 'cpu-huge'"),
        (["--params", '{"dit": {"overrides": {"stepz": 3}}}'], "unknown dit override field"),
        (["--params", '{"dit": {"overrides": {"steps": 0}}}'], "steps"),
        (["--params", '{"dit": {"overrides": {"patch_size": 5}}}'], "patch"),
        (["--params", '{"models": []}'], "models is empty"),
        (["--params", '{"evaluation": {"cfg": 2}}'], "unknown evaluation option"),
        (["--params", '{"dit": {"overides": {"steps": 3}}}'], "dit.overides: Extra inputs"),
        (["--gpu", "H100; rm -rf /"], "gpu"),
        (["--source", "ftp://example.org/x.tar"], "unsupported source scheme"),
        (["--source", "/nonexistent/images.tar.gz"], "--source '/nonexistent/images"),
        (["--source", "http://train-cats-no-such-host.invalid/x.tar.gz"], "does not resolve"),
        (["--params", "[1, 2]"], "--params must be a JSON object"),
        (["--params", '{"bogus": 1}'], "--params must be a JSON object whose keys are flow"),
        (["--params", "{bad json"], "--params is not valid JSON"),
        (
            ["--params", '{"dit": {"overrides": {"image_size": 4096}}}'],
            "less than or equal to 1024",
        ),
        (["--deployment", "nightly"], "no deployment 'nightly'"),
        (["--backend", "modal"], "MODAL_TOKEN_ID"),
    ],
)
def test_bad_parameters_fail_before_any_work(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setattr(module, "_run", _never_run)
    started = time.monotonic()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    # Before any server starts: seconds, not the ~20 s of a temporary server and a flow run
    # (an order of magnitude, loose enough for a loaded machine).
    assert time.monotonic() - started < 10


def test_modal_backend_rejects_a_source_the_container_cannot_read(capsys, monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    assert main(["--backend", "modal", "--source", "/home/me/images.tar.gz", "--dry-run"]) == 2
    assert "modal volume put train-cats-data" in capsys.readouterr().err


def test_modal_backend_rejects_a_batch_that_does_not_split_over_its_gpus(capsys, monkeypatch):
    # With H100:3 a container trains with DDP on 3 ranks: the global batch must divide by 3.
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-x")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-x")
    url = ["--source", "https://example.org/images.tar.gz", "--dry-run", "--models", "dit"]
    assert main(["--backend", "modal", "--gpu", "H100:3", *url]) == 2
    err = capsys.readouterr().err
    assert "does not split over the 3 GPUs" in err and len(err.strip().splitlines()) == 1
    assert main(["--backend", "modal", "--gpu", "H100:2", *url]) == 0


def test_deployment_option_runs_exactly_that_deployments_parameters(capsys):
    assert main(["--deployment", "dit", "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    (dit,) = [d for d in PREFECT_YAML["deployments"] if d["name"] == "dit"]
    assert dit["parameters"] == deployment_parameters("dit")
    # Exactly those parameters, plus the deployment name that keys the report history.
    expected = json.loads(json.dumps(dit["parameters"]))
    expected["evaluation"]["deployment"] = "dit"
    assert printed["parameters"] == expected
    # What the run would resolve to: the local default preset and the image size it needs.
    assert printed["resolved"]["presets"] == {"dit": "cpu-small"}
    assert 32 in printed["resolved"]["dataset"]["image_sizes"]


def test_flags_and_params_merge_over_the_deployment(capsys):
    argv = ["--deployment", "all", "--params", '{"dit": {"overrides": {"steps": 7}}}',
            "--preset", "cpu-tiny", "--source", str(OXFORD_MINI), "--no-evaluate", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    params = json.loads(capsys.readouterr().out)["parameters"]
    assert params["dit"] == {"preset": "cpu-tiny", "overrides": {"steps": 7}}
    # The deployment's own override (its judge's seed) stays under the flag's preset.
    assert params["classifier"] == {"preset": "cpu-tiny", "overrides": {"seed": 1}}
    assert params["dataset"] == {"labels": "breed", "max_other": 1000, "source": str(OXFORD_MINI)}
    assert params["evaluation"]["enabled"] is False
    assert params["models"] == ["classifier", "dit"]


def test_help_lists_the_options(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for option in ("--deployment", "--params", "--models", "--preset", "--backend", "--gpu"):
        assert option in out


def test_prefect_yaml_deployments_schedules_pool_and_concurrency():
    assert [s for s in PREFECT_YAML["pull"]] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone.stdout }}"}}
    ]
    names = {d["name"]: d for d in PREFECT_YAML["deployments"]}
    assert sorted(names) == ["all", "classifier", "dit"]
    expected_models = {"all": ["classifier", "dit"], "classifier": ["classifier"], "dit": ["dit"]}
    for name, deployment in names.items():
        assert deployment["entrypoint"] == "flows/train_cats.py:train_cats"
        assert deployment["parameters"]["models"] == expected_models[name]
        assert "train-cats" in deployment["tags"]
        (schedule,) = deployment["schedules"]  # their times and state: tests/test_schedules.py
        assert schedule["timezone"] == "UTC"
        assert deployment["concurrency_limit"]["limit"] == 1
        assert deployment["work_pool"]["name"] == "train-cats-local"
        # Every deployment's parameters pass the flow's own validation.
        train_cats.validate_parameters(deployment["parameters"])


@flow(name="failing-training")
def _failing_training(dataset: dict) -> None:
    train_dit_task(dataset, "failing/dit", "cpu-tiny", {})


_SHOW_STARTUP_TIMEOUT = """
from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as STARTUP_TIMEOUT

from flows.cli import _patient_temporary_server
with _patient_temporary_server():
    print(STARTUP_TIMEOUT.value())
"""


@pytest.mark.parametrize("set_in, expected", [(None, 120), ("environment", 7), ("profile", 7)])
def test_cli_waits_longer_for_the_temporary_server_unless_told(tmp_path, set_in, expected):
    # A fresh interpreter: Prefect reads the environment and the active profile when imported.
    name = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(tmp_path), "PREFECT_PROFILES_PATH": str(tmp_path / "p.toml")}
    profile = f'{name} = "7"' if set_in == "profile" else ""
    (tmp_path / "p.toml").write_text(f'active = "mine"\n[profiles.mine]\n{profile}\n')
    if set_in == "environment":
        env[name] = "7"
    shown = subprocess.run(
        [sys.executable, "-c", _SHOW_STARTUP_TIMEOUT],
        cwd=REPO, env=env, capture_output=True, text=True, check=True, timeout=120,
    ).stdout  # fmt: skip
    assert shown.split() == [str(expected)]


def _artifacts_of(state) -> list:
    """The artifacts recorded for the flow run behind `state`."""
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])
            )
        )


def test_a_failed_training_leaves_a_failure_artifact(tmp_path):
    bogus = {"root": str(tmp_path / "absent"), "version": "absent-1", "label_mode": "breed",
             "classes": ["a", "b"], "counts": {"a": 1, "b": 1}, "caches": {32: "images_32.npy"}}  # fmt: skip
    state = _failing_training(bogus, return_state=True)
    assert state.is_failed()
    artifacts = _artifacts_of(state)
    (failure,) = [a for a in artifacts if a.key == "failure-train-dit"]
    assert "train_dit failed" in failure.data and "absent" in failure.data


def test_a_run_that_fails_validation_leaves_a_failure_artifact(tmp_path):
    """A deployment run validates inside the flow: its failure must show in the UI too, in the
    words of the flow's parameters."""
    missing = str(tmp_path / "absent.tar.gz")
    state = train_cats(dataset={"source": missing}, models=["dit"], return_state=True)
    assert state.is_failed()
    artifacts = _artifacts_of(state)
    (failure,) = [a for a in artifacts if a.key == "failure-train-cats"]
    assert "train-cats failed" in failure.data and "dataset.source" in failure.data
    assert missing in failure.data


def test_cli_runs_all_in_process_one_training_after_the_other(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path / "runs"))
    # Evaluation of both models is covered by the dispatch test (same function, Modal path).
    params = {"dataset": {"image_sizes": [32], "max_other": 24}, "evaluation": {"enabled": False}}
    argv = ["--deployment", "all", "--preset", "cpu-tiny", "--source", str(OXFORD_MINI),
            "--params", json.dumps(params)]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sorted(summary["run_dirs"]) == ["classifier", "dit"]
    dirs = {m: Path(d) for m, d in summary["run_dirs"].items()}
    assert dirs["classifier"].parent == dirs["dit"].parent
    assert all((d / "model.safetensors").is_file() for d in dirs.values())
    assert summary["report"] is None
    # Local trainings take turns.
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        tasks = {
            t.name.split(" ")[0]: t
            for t in client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run.id]))
            )
        }
    assert run.state.is_completed()
    assert tasks["train_classifier"].end_time <= tasks["train_dit"].start_time


def test_a_failed_flow_run_ends_on_one_clear_line(tmp_path, capsys):
    bogus = tmp_path / "images.tar.gz"
    bogus.write_text("<html>not an archive</html>")
    assert main(["--deployment", "dit", "--preset", "cpu-tiny", "--source", str(bogus)]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("train-cats: the flow run failed: InvalidArchiveError")
