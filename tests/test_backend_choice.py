"""compute.backend="auto" (the deployments' value, issue #19 §1): Modal GPUs when this process has
Modal credentials and the app is deployed, the local default otherwise, and the run says which and
why. Modal's one API call (the app lookup, ``modal_access.hydrate_function``) is stood in for here;
the real Modal client is used only to show that an unreachable API fails in bounded time.
tests/test_backend_secrets.py runs the same choice in a real worker's flow run, with the
credentials from Secret blocks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO
from modal.exception import NotFoundError
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogWorker

from flows.cli import main
from flows.parameters import ComputeParams, resolve_backend
from flows.train_cats import train_cats
from tasks.adapters import modal_access
from tasks.adapters.modal_calls import ModalUnavailableError
from tasks.paths import APP_NAME


class AppDouble:
    """Stands in for ``modal_access.hydrate_function``: the app is deployed or not; counts calls."""

    def __init__(self, deployed: bool):
        self.deployed, self.calls = deployed, []

    def __call__(self, function_name: str) -> None:
        self.calls.append(function_name)
        if not self.deployed:
            raise NotFoundError(f"Lookup failed for Function '{function_name}' from the "
                                f"'{APP_NAME}' app: App '{APP_NAME}' not found in environment")  # fmt: skip


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("MODAL_TOKEN_ID", "ak-choice")
    monkeypatch.setenv("MODAL_TOKEN_SECRET", "as-choice")


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("MODAL_TOKEN_ID", raising=False)
    monkeypatch.delenv("MODAL_TOKEN_SECRET", raising=False)
    monkeypatch.setenv("MODAL_CONFIG_PATH", str(tmp_path / "absent.toml"))


def _app(monkeypatch, deployed: bool) -> AppDouble:
    double = AppDouble(deployed)
    monkeypatch.setattr(modal_access, "hydrate_function", double)
    return double


def _run(tmp_path, **compute):
    """A flow run that stops in the plan, right after the backend choice: its source is a local
    archive path, which a Modal container cannot read and which does not exist here."""
    source = str(tmp_path / "absent.tar.gz")
    started = time.monotonic()
    state = train_cats(dataset={"source": source}, models=["dit"], compute=compute,
                       return_state=True)  # fmt: skip
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    APILogWorker.drain_all(timeout=10)
    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
        tasks = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
        )
    lines = [log.message for log in logs]
    by_key = {a.key: a.data for a in artifacts if a.key}
    assert tasks == [], "work started before the plan was checked"
    return state, by_key, lines, time.monotonic() - started


def test_auto_with_credentials_and_the_app_deployed_runs_on_modal(
    credentials, monkeypatch, tmp_path
):
    app = _app(monkeypatch, deployed=True)
    state, artifacts, lines, _ = _run(tmp_path, backend="auto")
    assert app.calls == ["train_dit"]
    why = (
        "credentials from the environment (MODAL_TOKEN_ID=ak-choice, MODAL_TOKEN_SECRET) and "
        f"app '{APP_NAME}' deployed"
    )
    assert f"backend modal: {why}" in lines
    assert artifacts["backend"] == f"**Backend: modal**: {why}"
    # Downstream saw modal: the plan refused the local archive as a Modal container would.
    with pytest.raises(ValueError, match="not reachable from a Modal container"):
        state.result()


def test_auto_without_credentials_runs_locally_and_says_how_to_give_them(
    no_credentials, monkeypatch, tmp_path
):
    app = _app(monkeypatch, deployed=True)
    state, artifacts, lines, _ = _run(tmp_path, backend="auto")
    assert app.calls == []  # Modal is never asked
    expected = "local: no Modal credentials (set MODAL_TOKEN_ID and MODAL_TOKEN_SECRET"
    assert any(line.startswith(f"backend {expected}") for line in lines), lines
    assert artifacts["backend"].startswith("**Backend: local**: no Modal credentials")
    assert "Secret blocks: see README" in artifacts["backend"]
    with pytest.raises(ValueError, match="is not a file"):  # the local backend's own check
        state.result()
    # The preset default follows the chosen backend: cpu-small here, gpu on Modal.
    compute, _ = resolve_backend(ComputeParams(backend="auto"))
    assert compute.backend == "local"


def test_auto_with_credentials_but_no_deployed_app_fails_at_once_naming_modal_deploy(
    credentials, monkeypatch, tmp_path
):
    _app(monkeypatch, deployed=False)
    state, artifacts, _, seconds = _run(tmp_path, backend="auto")
    with pytest.raises(ModalUnavailableError) as failure:
        state.result()
    message = str(failure.value)
    assert "modal deploy tasks/adapters/modal_app.py" in message and "\n" not in message
    assert "credentials from the environment (MODAL_TOKEN_ID=ak-choice" in message
    assert "backend" not in artifacts  # nothing was chosen
    assert "modal deploy tasks/adapters/modal_app.py" in artifacts["failure-train-cats"]
    print(f"failed after {seconds:.1f} s (flow run on the temporary server included)")


@pytest.mark.parametrize("explicit", ["local", "modal"])
def test_an_explicit_backend_always_wins(explicit, credentials, monkeypatch, tmp_path):
    _app(monkeypatch, deployed=False)  # auto would fail; an explicit backend never asks
    compute, why = resolve_backend(ComputeParams(backend=explicit))
    assert (compute.backend, why) == (explicit, f"compute.backend={explicit!r} was given")
    _, artifacts, _, _ = _run(tmp_path, backend=explicit)
    assert (
        artifacts["backend"] == f"**Backend: {explicit}**: compute.backend={explicit!r} was given"
    )


def test_a_hanging_modal_api_fails_in_bounded_time(monkeypatch):
    monkeypatch.setattr(modal_access, "hydrate_function", lambda name: time.sleep(30))
    started = time.monotonic()
    with pytest.raises(ModalUnavailableError, match=r"did not answer within 0.5 s \(offline"):
        modal_access.require_app_deployed("the environment", timeout_s=0.5)
    assert time.monotonic() - started < 5


def test_an_unreachable_modal_api_is_one_line_in_bounded_time_with_the_real_client():
    """The real Modal client against a closed port (what offline looks like: it retries for about
    a minute), through the command line: exit 2, one line, within the check's bound."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MODAL_")},
        "MODAL_TOKEN_ID": "ak-offline", "MODAL_TOKEN_SECRET": "as-offline",
        "MODAL_SERVER_URL": f"http://127.0.0.1:{port}",
    }  # fmt: skip
    code = (
        "import sys; from tasks.adapters import modal_access as m; m.APP_CHECK_TIMEOUT_S = 3; "
        "from flows.cli import main; sys.exit(main(['--deployment', 'dit']))"
    )
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    seconds = time.monotonic() - started
    print(f"offline: exit {done.returncode} after {seconds:.1f} s: {done.stderr.strip()}")
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "the Modal API did not answer within 3 s (offline?)" in line
    assert "MODAL_TOKEN_ID=ak-offline" in line and "as-offline" not in line
    assert seconds < 60  # imports (~10 s on a loaded machine) + 3 s, not Modal's minute of retries


def test_the_command_line_resolves_auto_before_the_presets(credentials, capsys, monkeypatch):
    app = _app(monkeypatch, deployed=True)
    assert main(["--deployment", "dit", "--dry-run"]) == 0
    assert json.loads(capsys.readouterr().out)["resolved"]["presets"] == {"dit": "gpu"}
    assert app.calls == []  # a dry run asks Modal nothing
    assert main(["--deployment", "dit", "--dry-run", "--backend", "local"]) == 0
    assert json.loads(capsys.readouterr().out)["resolved"]["presets"] == {"dit": "cpu-small"}


def test_every_deployment_chooses_its_backend():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {d["name"]: d["parameters"]["compute"] for d in deployments} == {
        name: {"backend": "auto"} for name in ("dit", "classifier", "all")
    }
