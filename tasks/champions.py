"""Champions: per deployment and model kind, the model that users load and that later runs of the
deployment are compared with (no torch, no Prefect).

A champion is a small JSON pointer, `<runs root>/champions/<deployment>/<kind>.json`, naming the
run dir of an exported model, the evaluation report that got it promoted, and the fingerprint of
everything that determined it (data revision, code version, resolved config; see
`tasks.fingerprint`). It is replaced atomically (written beside, then renamed), so a reader sees the
old champion or the new one, never half of either. The run dirs themselves are never moved.

    from tasks.exported import load_dit
    model = load_dit("champion:dit")            # the `dit` deployment's DiT champion
    model = load_dit(champion_dir("dit", "dit"))  # the same, as a folder
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from tasks.paths import run_path, runs_root

Kind = Literal["classifier", "dit"]
CHAMPIONS_DIR = "champions"
PREFIX = "champion:"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class TeacherAsJudgeError(ValueError):
    """A classifier asked to judge a DiT that was aligned (REPA) to its features: its metrics
    would flatter that DiT (`tasks.evaluate`), so the pair is refused."""


class Champion(BaseModel):
    """The record of one deployment's champion for one model kind."""

    deployment: str
    kind: Kind
    run_name: str = Field(description="The run dir, relative to the runs root.")
    report: str = Field(description="The report folder that decided, relative to the runs root.")
    classes: list[str]
    dataset_version: str
    fingerprint: dict[str, Any] = Field(
        description="What determined the model (tasks.fingerprint)."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="The report's metrics.")
    promoted_at: str = Field(description="UTC, ISO 8601.")
    flow_run_id: str | None = None

    @property
    def run_dir(self) -> Path:
        return run_path(self.run_name)

    @property
    def report_dir(self) -> Path:
        return run_path(self.report)


def champion_path(deployment: str, kind: str) -> Path:
    """`<runs root>/champions/<deployment>/<kind>.json`.

    Raises:
        ValueError: a deployment or kind that is not a plain name (no '/', no '..').
    """
    for name in (deployment, kind):
        if not _NAME.match(name) or name in (".", ".."):
            raise ValueError(f"champion name {name!r} must be a plain name ([A-Za-z0-9_.-]+)")
    return runs_root() / CHAMPIONS_DIR / deployment / f"{kind}.json"


def read_champion(deployment: str, kind: str) -> Champion | None:
    """The champion record, or None when the deployment has none for `kind` yet."""
    path = champion_path(deployment, kind)
    if not path.is_file():
        return None
    return Champion.model_validate_json(path.read_text())


def write_champion(champion: Champion) -> Path:
    """Make `champion` the deployment's champion for its kind, atomically; returns the path."""
    path = champion_path(champion.deployment, champion.kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(champion.model_dump_json(indent=2) + "\n")
    with open(tmp) as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return path


def all_champions(kind: str) -> list[Champion]:
    """Every deployment's champion of `kind`, newest promotion first."""
    root = runs_root() / CHAMPIONS_DIR
    found = [
        Champion.model_validate_json(path.read_text())
        for path in sorted(root.glob(f"*/{kind}.json"))
        if path.is_file()
    ]
    return sorted(found, key=lambda c: c.promoted_at, reverse=True)


def find_judge(classes: list[str], candidates: list[Champion] | None = None) -> Champion | None:
    """The newest classifier champion whose classes cover `classes` (so that it can judge a DiT
    trained on them), or None: among `candidates`, default every deployment's under the local
    runs root."""
    wanted = set(classes)
    pool = all_champions("classifier") if candidates is None else candidates
    newest_first = sorted(pool, key=lambda c: c.promoted_at, reverse=True)
    return next((c for c in newest_first if wanted <= set(c.classes)), None)


def resolve(path_or_champion: str | Path, kind: str) -> Path:
    """An export folder: `path_or_champion` itself, or for `"champion:<deployment>"` the run dir
    of that deployment's `kind` champion.

    Raises:
        FileNotFoundError: the deployment has no champion of that kind (names how to get one).
    """
    text = str(path_or_champion)
    if not text.startswith(PREFIX):
        return Path(path_or_champion)
    deployment = text[len(PREFIX) :]
    champion = read_champion(deployment, kind)
    if champion is None:
        raise FileNotFoundError(
            f"deployment {deployment!r} has no {kind} champion yet "
            f"({champion_path(deployment, kind)}): run a deployment that trains a {kind} once "
            f"(e.g. `train-cats --deployment {'dit' if kind == 'dit' else 'classifier'}`), or "
            "pass an export folder"
        )
    return champion.run_dir


def missing_export(path_or_champion: str | Path, kind: str) -> str | None:
    """Why `path_or_champion` (a folder or `"champion:<deployment>"`) has no `kind` export here,
    in one line naming the fix; None where its weights and config are in place. Only looks for
    the files: a damaged export fails where it is loaded."""
    try:
        folder = resolve(path_or_champion, kind)
    except FileNotFoundError as exc:  # a deployment without a champion of that kind
        return str(exc)
    missing = [
        name for name in ("model.safetensors", "config.json") if not (folder / name).is_file()
    ]
    if missing:
        return (
            f"no {kind} export at {folder} ({' and '.join(missing)} missing): pass a finished "
            f"{kind} run dir or {PREFIX}<deployment>"
        )
    return None
