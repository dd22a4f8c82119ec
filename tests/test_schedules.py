"""Schedules keep their state across redeploys (issue #19 §2), against a real Prefect server:
`prefect deploy --all` creates them paused, a user resumes one, `prefect deploy --all` again leaves
it on (same schedule, same cron, runs scheduled again) and the others off."""

from __future__ import annotations

import time
from datetime import datetime

import pytest
import yaml
from conftest import REPO
from prefect_server import PrefectServer, wait_for

from flows.schedules import deployed_slugs

POOL = "train-cats-local"
NAMES = ("dit", "classifier", "all")


def _deployment(server: PrefectServer, name: str) -> dict:
    return server.get(f"deployments/name/train-cats/{name}")


def _scheduled_runs(server: PrefectServer, deployment: dict) -> list[dict]:
    return server.post(
        "flow_runs/filter",
        {
            "flow_runs": {
                "deployment_id": {"any_": [deployment["id"]]},
                "state": {"type": {"any_": ["SCHEDULED"]}},
            }
        },
    )


def _expected_starts(runs: list[dict]) -> set[tuple[int, int, int]]:
    """(weekday, hour, minute) in UTC of each run's expected start."""
    starts = (datetime.fromisoformat(r["expected_start_time"]) for r in runs)
    return {(s.weekday(), s.hour, s.minute) for s in starts}


@pytest.mark.e2e
def test_a_redeploy_keeps_each_schedule_on_or_off(tmp_path):
    prefect_yaml = (REPO / "prefect.yaml").read_bytes()
    # The scheduler service fills in scheduled runs every second instead of every minute.
    env = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1"}
    t0 = time.monotonic()
    with PrefectServer(tmp_path, env) as server:
        server.cli("work-pool", "create", POOL, "--type", "process")
        server.cli("--no-prompt", "deploy", "--all")
        print(f"server up and first deploy: {time.monotonic() - t0:.1f} s")

        first = {name: _deployment(server, name) for name in NAMES}
        schedules = {}
        for name, deployment in first.items():
            (schedule,) = deployment["schedules"]
            assert schedule["slug"] == f"weekly-{name}"
            assert schedule["active"] is False, f"{name}: a new schedule must start paused"
            assert schedule["schedule"]["timezone"] == "UTC"
            schedules[name] = schedule
        crons = {name: s["schedule"]["cron"] for name, s in schedules.items()}
        assert crons == {"classifier": "0 1 * * 1", "dit": "0 3 * * 1", "all": "0 3 * * 0"}
        assert len(set(crons.values())) == 3, crons

        # A user turns the main job's retraining on, as the docs say.
        server.cli("deployment", "schedule", "resume", "train-cats/dit", schedules["dit"]["id"])
        assert _deployment(server, "dit")["schedules"][0]["active"] is True
        runs = wait_for(lambda: _scheduled_runs(server, first["dit"]), 60, what="scheduled runs")
        assert _expected_starts(runs) == {(0, 3, 0)}  # Mondays 03:00 UTC

        t1 = time.monotonic()
        server.cli("--no-prompt", "deploy", "--all")
        print(f"redeploy: {time.monotonic() - t1:.1f} s")

        for name in NAMES:
            deployment = _deployment(server, name)
            (schedule,) = deployment["schedules"]
            before = schedules[name]
            # The same schedule, patched by slug, not replaced: its id, cron and time zone stay.
            assert schedule["id"] == before["id"], name
            assert schedule["schedule"] == before["schedule"], name
            assert schedule["active"] is (name == "dit"), f"{name}: redeploy changed its state"
            assert deployment["paused"] is False, name
        # Prefect deletes a deployment's auto-scheduled runs on every update; the scheduler
        # makes them again, still on Mondays at 03:00, and only for the schedule that is on.
        runs = wait_for(lambda: _scheduled_runs(server, first["dit"]), 60, what="runs again")
        assert _expected_starts(runs) == {(0, 3, 0)}
        time.sleep(3)  # three more scheduler loops: nothing for the paused schedules
        assert not _scheduled_runs(server, first["classifier"])
        assert not _scheduled_runs(server, first["all"])
    # Deploying never writes the templated `active` values back into prefect.yaml.
    assert (REPO / "prefect.yaml").read_bytes() == prefect_yaml
    print(f"whole test: {time.monotonic() - t0:.1f} s")


def test_prefect_yaml_schedules_have_unique_slugs_and_a_templated_active():
    config = yaml.safe_load((REPO / "prefect.yaml").read_text())
    steps = [next(iter(step)) for step in config["build"]]
    assert "flows.schedules.new_schedules_paused" in steps
    for deployment in config["deployments"]:
        for schedule in deployment["schedules"]:
            # Never a literal true/false: it would be written over the user's choice each deploy.
            assert schedule["active"] == f"{{{{ schedules.{schedule['slug']} }}}}"
    assert deployed_slugs(REPO / "prefect.yaml") == {
        "dit": {"weekly-dit": None},
        "classifier": {"weekly-classifier": None},
        "all": {"weekly-all": None},
    }


@pytest.mark.parametrize(
    "schedules, error",
    [
        ([{"cron": "0 1 * * 1"}], "every schedule needs a `slug`"),
        ([{"cron": "0 1 * * 1", "slug": "a"}, {"cron": "0 2 * * 1", "slug": "a"}], "used twice"),
    ],
)
def test_a_schedule_without_a_unique_slug_is_refused(tmp_path, schedules, error):
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump({"deployments": [{"name": "dit", "schedules": schedules}]}))
    with pytest.raises(ValueError, match=error):
        deployed_slugs(path)
