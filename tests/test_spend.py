"""Bounded spend on Modal: timeouts derived from time budgets, the published cost bound, the
queue-time cancel, the Prefect timeout, retries only after infrastructure failures, and fail-fast
cancellation of the sibling training. The flow runs for real; Modal is the double of
tests/modal_double.py (real function bodies, injected infrastructure faults).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from conftest import OXFORD_MINI
from modal_double import ModalDouble, wire_volumes
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    ArtifactFilterKey,
)

import tasks.train_dit
from flows.train_cats import train_cats
from tasks.adapters import costs, limits
from tasks.adapters import modal_calls as backend
from tasks.train import build_config

# Slack for a loaded 2-core machine between a deadline and the moment the flow acts on it: the
# waiting loop polls every 0.2 s here, but a Prefect task can be starved for seconds.
SLACK_S = 20.0


def test_modal_timeouts_follow_the_time_budget_and_cap_a_config_without_one():
    for model in ("classifier", "dit"):
        budget = build_config(model, "gpu").time_budget_minutes
        step = limits.training_limits(model, budget, "H100", max_queue_minutes=30)
        assert step.modal_timeout_s == budget * 60 + limits.TIMEOUT_MARGIN_S
        assert step.task_timeout_s == 30 * 60 + step.modal_timeout_s + limits.WAIT_GRACE_S
        assert step.modal_timeout_s < 3 * 3600  # no longer 24 h
    longer = limits.training_limits("dit", 120, "H100", 30)
    assert longer.modal_timeout_s - step.modal_timeout_s == (120 - budget) * 60
    # No time budget: the stated cap, and a note saying how to choose instead.
    unbudgeted = limits.training_limits("dit", None, "T4", 30)
    assert unbudgeted.modal_timeout_s == limits.UNBUDGETED_MINUTES * 60 + limits.TIMEOUT_MARGIN_S
    assert "time_budget_minutes" in unbudgeted.note


def test_gpu_strings_parse_into_type_and_count_and_price_every_gpu():
    assert costs.parse_gpu("H100") == ("H100", 1)
    assert costs.parse_gpu("H100:2") == ("H100", 2)
    assert costs.parse_gpu("a100-80gb") == ("A100-80GB", 1)
    assert costs.parse_gpu("T4") == ("T4", 1)
    assert costs.parse_gpu("A100") == ("A100-40GB", 1)
    assert costs.usd_per_hour("H100:2") == pytest.approx(2 * costs.USD_PER_GPU_HOUR["H100"])
    step = limits.training_limits("dit", 60, "H100:2", 30)
    hours = step.attempts * (30 * 60 + 60 * 60 + limits.TIMEOUT_MARGIN_S + limits.WAIT_GRACE_S)
    assert step.max_cost_usd == pytest.approx(hours / 3600 * 2 * costs.USD_PER_GPU_HOUR["H100"])
    with pytest.raises(ValueError, match=r"'X9'.*tasks/adapters/costs.py"):
        costs.parse_gpu("X9")
    with pytest.raises(ValueError, match="1 or more"):
        costs.parse_gpu("H100:0")


@pytest.fixture
def modal(tmp_path, monkeypatch, http_server):
    """A Modal double wired into the flow, polled every 0.2 s, and a runner for a modal flow."""
    volumes = wire_volumes(tmp_path, monkeypatch)
    double = ModalDouble(volumes["env"])
    monkeypatch.setattr(backend, "lookup", double.resolve)
    monkeypatch.setattr(backend, "read_volume_file", double.read_file)
    monkeypatch.setattr(backend, "call_from_id", double.from_id)
    monkeypatch.setattr(backend, "POLL_S", 0.2)
    monkeypatch.setattr(limits, "INFRA_RETRY_DELAY_S", 0.0)
    http_server.add("/images.tar.gz", OXFORD_MINI)  # a Modal container reads sources by URL

    def run(models, compute, dit=None, classifier=None):
        return train_cats(
            dataset={"source": http_server.url("/images.tar.gz"), "labels": "species",
                     "image_sizes": [32], "max_other": 40},
            models=models,
            classifier={"preset": "cpu-tiny", **(classifier or {})},
            dit={"preset": "cpu-tiny", **(dit or {})},
            compute={"backend": "modal", **compute},
            evaluation={"enabled": False},
            return_state=True,
        )  # fmt: skip

    double.run = run
    return double


def _calls(double, name):
    return [c for c in double.calls if c.name == name]


def _max_cost_artifact(state) -> float:
    with get_client(sync_client=True) as client:
        (artifact,) = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id]),
                key=ArtifactFilterKey(any_=["modal-max-cost"]),
            )
        )
    return float(re.search(r"At most \$([0-9.]+)", artifact.data)[1])


def test_a_call_that_never_starts_is_cancelled_after_the_queue_time(modal):
    modal.script = {"train_dit": ["queued"]}  # e.g. no H100 free
    state = modal.run(["dit"], {"gpu": "H100:2", "max_queue_minutes": 0.05},
                      dit={"overrides": {"time_budget_minutes": 7}})  # fmt: skip
    assert state.is_failed()
    with pytest.raises(backend.QueueTimeoutError, match=r"did not start within 0.05 min.*queue"):
        state.result()
    (call,) = _calls(modal, "train_dit")  # a queue timeout is not retried
    assert call.cancelled_at is not None, "the queued call was left in Modal's queue"
    assert 3.0 <= call.cancelled_at - call.created < 3.0 + SLACK_S
    # The call's Modal options follow the budget: 7 min + the margin, on both GPUs, no retries.
    assert modal.options["train_dit"] == {
        "gpu": "H100:2", "timeout": 7 * 60 + limits.TIMEOUT_MARGIN_S, "retries": 0}  # fmt: skip
    # The cost bound was published before the call: every attempt for its whole Prefect timeout
    # (queue + Modal timeout + grace), on two H100s, rounded to cents.
    attempt_s = 0.05 * 60 + 7 * 60 + limits.TIMEOUT_MARGIN_S + limits.WAIT_GRACE_S
    expected = (1 + limits.INFRA_RETRIES) * attempt_s / 3600 * 2 * costs.USD_PER_GPU_HOUR["H100"]
    assert _max_cost_artifact(state) == pytest.approx(expected, abs=0.005)


def test_a_call_that_outlives_its_prefect_timeout_is_cancelled(modal, monkeypatch):
    monkeypatch.setattr(limits, "TIMEOUT_MARGIN_S", 1)
    monkeypatch.setattr(limits, "WAIT_GRACE_S", 1)
    modal.script = {"train_dit": ["hang"]}  # started, then never returns (a hung training)
    # Modal timeout ceil(0.02 * 60 + 1) = 3 s; Prefect timeout 3 s queue + 3 s + 1 s = 7 s.
    state = modal.run(["dit"], {"gpu": "T4", "max_queue_minutes": 0.05},
                      dit={"overrides": {"time_budget_minutes": 0.02}})  # fmt: skip
    assert state.is_failed()
    with pytest.raises(TimeoutError, match=r"timed out after 7"):
        state.result()
    (call,) = _calls(modal, "train_dit")  # a timeout is not retried
    assert modal.options["train_dit"]["timeout"] == 3
    assert call.cancelled_at is not None and call.finished_at is None
    # Prefect's clock starts with the task, a moment before the spawn.
    assert 6.0 <= call.cancelled_at - call.created < 7.0 + SLACK_S


def test_a_nan_loss_is_not_retried_and_cancels_the_sibling_at_once(modal, monkeypatch):
    real_loss = tasks.train_dit.flow_matching_loss
    monkeypatch.setattr(  # the DiT diverges; the real trainer detects it and raises
        tasks.train_dit, "flow_matching_loss", lambda *a, **k: real_loss(*a, **k) * float("nan")
    )
    modal.script = {"train_classifier": ["hang"]}  # still training when the DiT fails
    t0 = time.monotonic()
    state = modal.run(["classifier", "dit"], {"gpu": "L40S"})
    assert state.is_failed()
    with pytest.raises(FloatingPointError, match="loss is nan"):
        state.result()
    (dit,) = _calls(modal, "train_dit")  # not retried by Prefect ...
    assert modal.options["train_dit"]["retries"] == 0  # ... nor by Modal
    (classifier,) = _calls(modal, "train_classifier")
    assert dit.finished_at is not None and classifier.finished_at is None
    assert classifier.cancelled_at is not None, "the sibling training was left running"
    assert classifier.cancelled_at - dit.finished_at < SLACK_S
    assert time.monotonic() - t0 < 240.0  # not the double's 300 s wait for a cancel


def test_an_infrastructure_failure_is_retried_and_resumes_in_the_same_run_dir(modal):
    modal.script = {"train_dit": ["internal_failure", "run"]}
    state = modal.run(["dit"], {"gpu": "L40S"})
    assert state.is_completed(), state.message
    first, second = _calls(modal, "train_dit")
    assert first.kwargs == second.kwargs  # same run name: the retry resumes there
    run_dir = Path(state.result()["run_dirs"]["dit"])
    assert run_dir.as_posix().endswith(second.kwargs["run_name"])
    assert (run_dir / "model.safetensors").is_file()
