"""A deployment's report history, and publishing a finished report folder atomically.

Each finished report is appended to `<runs root>/reports/<deployment>/history.jsonl`, and the next
report of the same deployment compares itself with the newest readable one whose dataset has the
same classes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from filelock import FileLock

from tasks.evaluation.report import REPORT_JSON, load_report, reports_dir
from tasks.paths import runs_root

HISTORY = "history.jsonl"
DEFAULT_DEPLOYMENT = "local"


def _history_entry(report_dir: Path) -> str:
    """Report paths are stored relative to the runs root when inside it, so that a history
    written on Modal (/runs) and read locally (or the reverse) still resolves."""
    root = runs_root()
    return str(report_dir.relative_to(root)) if report_dir.is_relative_to(root) else str(report_dir)


def previous_report(deployment: str, exclude: Path, classes: list[str]) -> Path | None:
    """The newest still-readable report in the deployment's history, other than `exclude`, whose
    dataset has the same classes: a run of the same deployment on other data (say, species
    instead of breeds) has metrics that cannot be compared, so it never counts as "previous"."""
    history = reports_dir(deployment) / HISTORY
    if not history.is_file():
        return None
    for line in reversed(history.read_text().splitlines()):
        try:
            folder = runs_root() / json.loads(line)["report_dir"]
        except (ValueError, KeyError, TypeError):
            continue
        path = folder / REPORT_JSON
        if folder.resolve() == exclude.resolve() or not path.is_file():
            continue
        try:
            if load_report(path).dataset.classes == classes:
                return path
        except ValueError:  # unreadable or of another schema: skip it like a missing one
            continue
    return None


def append_history(deployment: str, report_dir: Path, created_at: str) -> None:
    history = reports_dir(deployment) / HISTORY
    history.parent.mkdir(parents=True, exist_ok=True)
    entry = json.dumps({"report_dir": _history_entry(report_dir), "created_at": created_at})
    with FileLock(str(history) + ".lock"), open(history, "a") as handle:
        handle.write(entry + "\n")


def publish(stage: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished staging folder to `out`, replacing an old `out` only if allowed."""
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(stage, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(stage, out)


def default_deployment() -> str:
    """The Prefect deployment running this code, else "local"."""
    try:
        from prefect.runtime import deployment

        name = deployment.name
    except Exception:  # no Prefect run context, or no API to ask: not a deployment run
        name = None
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name) if name else DEFAULT_DEPLOYMENT


