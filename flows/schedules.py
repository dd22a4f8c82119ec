"""A `prefect deploy` build step: new schedules start paused, deployed ones keep their state.

Prefect 3.9 updates a deployment's schedules by slug on every `prefect deploy`: each field given
in prefect.yaml is written over the server's, each field left out is kept. So `active: false` in
prefect.yaml pauses a schedule again at every deploy, and a schedule without `active` is created
active. prefect.yaml therefore takes each schedule's `active` from this step:

    build:
      - flows.schedules.new_schedules_paused:
          id: schedules
          flow: train-cats
    ...
    schedules:
      - {cron: "0 1 * * 1", slug: weekly-classifier, active: "{{ schedules.weekly-classifier }}"}

The step answers `False` for a slug that the server does not have yet, and leaves out a slug it
has: Prefect then drops the unresolved `active` and the schedule stays on or off as a user left it.
"""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect import get_client
from prefect.exceptions import ObjectNotFound


def deployed_slugs(prefect_file: str | Path = "prefect.yaml") -> dict[str, dict[str, str | None]]:
    """`{deployment: {slug: the slug it replaces, or None}}` for the schedules in `prefect_file`,
    checked to be usable as keys: every schedule has a slug, and no slug is used twice."""
    config = yaml.safe_load(Path(prefect_file).read_text())
    slugs: dict[str, dict[str, str | None]] = {}
    seen: set[str] = set()
    for deployment in config.get("deployments") or []:
        for schedule in deployment.get("schedules") or []:
            slug = schedule.get("slug")
            if not slug:
                raise ValueError(
                    f"deployment {deployment['name']!r}: every schedule needs a `slug`, or a "
                    "redeploy replaces it and forgets whether it was on"
                )
            if slug in seen:
                raise ValueError(f"schedule slug {slug!r} is used twice in {prefect_file}")
            seen.add(slug)
            slugs.setdefault(deployment["name"], {})[slug] = schedule.get("replaces")
    return slugs


def new_schedules_paused(flow: str, prefect_file: str = "prefect.yaml") -> dict[str, bool]:
    """`{slug: False}` for each schedule in `prefect_file` that the server does not have yet,
    under its slug or under the slug it `replaces` (a rename keeps the state too)."""
    new: dict[str, bool] = {}
    with get_client(sync_client=True) as client:
        for name, slugs in deployed_slugs(prefect_file).items():
            try:
                deployment = client.read_deployment_by_name(f"{flow}/{name}")
            except ObjectNotFound:
                existing: set[str | None] = set()
            else:
                existing = {schedule.slug for schedule in deployment.schedules}
            for slug, replaces in slugs.items():
                if slug not in existing and (replaces is None or replaces not in existing):
                    new[slug] = False
    return new
