"""The `ensure_dataset` retry policy, through real Prefect flow runs (ephemeral server) against
a real HTTP server on 127.0.0.1: transient failures are retried, permanent ones are not, and a
final failure leaves a failure artifact on its flow run."""

from __future__ import annotations

from pathlib import Path

import pytest
from archive_factory import oxford_members, write_tar
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
    FlowRunFilter,
    FlowRunFilterId,
)
from prefect.client.schemas.objects import Artifact, State
from prefect.tasks import exponential_backoff

from data.dataset import DatasetRef, DatasetSpec
from data.errors import HostNotFoundError
from tasks.adapters.prefect_tasks import RETRIES, ensure_dataset

# The production policy with millisecond delays, so that the test does not sleep.
fast_ensure = ensure_dataset.with_options(
    retry_delay_seconds=exponential_backoff(backoff_factor=0.01)
)


@flow(name="ensure-dataset-policy-test")
def ensure_flow(spec: DatasetSpec, data_dir: str) -> DatasetRef:
    return fast_ensure(spec, data_dir)


@pytest.fixture
def served(http_server, tmp_path: Path) -> str:
    write_tar(
        tmp_path / "www" / "images.tar.gz", oxford_members({"Bengal": 3, "Sphynx": 3}, {"pug": 2})
    )
    return http_server.url("images.tar.gz")


def test_policy_keeps_the_production_settings():
    assert fast_ensure.retries == ensure_dataset.retries == RETRIES > 2
    assert fast_ensure.retry_jitter_factor == ensure_dataset.retry_jitter_factor > 0
    assert ensure_dataset.retry_delay_seconds[:3] == [10.0, 20.0, 40.0]  # exponential


def failure_artifacts(state: State) -> list[Artifact]:
    """The `failure_artifact` hook's artifacts recorded for the flow run behind `state`."""
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                key=ArtifactFilterKey(any_=["failure-ensure-dataset"]),
            )
        )


def test_two_503s_then_success_completes(http_server, served, tmp_path):
    http_server.fail("images.tar.gz", 503, times=2)
    spec = DatasetSpec(source=served, image_sizes=[8])
    state = ensure_flow(spec, str(tmp_path / "data"), return_state=True)
    assert state.is_completed(), state
    ref = state.result()
    assert isinstance(ref, DatasetRef) and ref.counts == {"Bengal": 3, "Sphynx": 3, "other": 2}
    assert [r.status for r in http_server.requests] == [503, 503, 200]
    assert failure_artifacts(state) == []  # retried attempts are not failures


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        ("404", "HTTP 404"),
        ("checksum", "checksum mismatch"),
        ("invalid", "neither a zip nor a tar"),
    ],
)
def test_permanent_errors_fail_after_one_request(http_server, served, tmp_path, fault, error):
    checksum = None
    if fault == "404":
        http_server.fail("images.tar.gz", 404, times=None)
    elif fault == "checksum":
        checksum = "sha256:" + "0" * 64
    else:  # a login page served in place of the archive, as a captive portal would
        (tmp_path / "www" / "images.tar.gz").write_bytes(b"<html><body>Sign in</body></html>")
    spec = DatasetSpec(source=served, checksum=checksum, image_sizes=[8])
    state = ensure_flow(spec, str(tmp_path / "data"), return_state=True)
    assert state.is_failed()
    assert error in state.message
    assert http_server.count("images.tar.gz") == 1
    assert not (tmp_path / "data" / spec.version_id()).exists()
    [artifact] = failure_artifacts(state)
    assert artifact.type == "markdown" and artifact.task_run_id is not None
    assert "ensure_dataset failed" in artifact.data and error in artifact.data


@flow(name="ensure-dataset-offline-test")
def ensure_flow_production_delays(spec: DatasetSpec, data_dir: str) -> DatasetRef:
    return ensure_dataset(spec, data_dir)


def test_an_unknown_host_fails_at_once_without_retries(tmp_path):
    """Offline (or a typo): DNS says the name does not exist, so the production policy, whose
    first retry would wait about 10 s, must not retry; the error names the host and the fix."""
    spec = DatasetSpec(source="http://train-cats-no-such-host.invalid/images.tar.gz")
    state = ensure_flow_production_delays(spec, str(tmp_path / "data"), return_state=True)
    assert state.is_failed()
    # Behaviour, not wall time (which a loaded machine stretches): one attempt, no retry.
    with get_client(sync_client=True) as client:
        [task_run] = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    assert task_run.run_count == 1 and task_run.state.is_failed()
    with pytest.raises(HostNotFoundError) as caught:
        state.result()
    message = str(caught.value)
    assert "train-cats-no-such-host.invalid" in message and "dataset.source" in message
