"""The Prefect artifacts a person reads in the UI: dataset summary, live training progress,
training results with links to the files, the evaluation report, and a note on each failure.

Keys are stable per kind (``dataset-summary``, ``dit-metrics`` ...), so the UI's Artifacts page
shows each as one series across scheduled runs.
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import ArtifactCreate

from data.dataset import DatasetRef, read_manifest
from tasks.evaluation import figures
from tasks.evaluation.report import REPORT_JSON, Report, load_report, render_markdown

PROGRESS_EVERY_S = 2.0


def publish_dataset_summary(ref: DatasetRef) -> None:
    """A table of images per class (train/val when the manifest is readable here) and the skips.

    On Modal the version folder lives on the data volume, so only the reference's counts exist
    on this side; locally the manifest adds the split and every skipped file's reason.
    """
    manifest = read_manifest(Path(ref.root))
    splits = manifest.split_counts if manifest else {}
    create_table_artifact(
        table=[
            {
                "class": name,
                "images": ref.counts.get(name, 0),
                **{split: counts.get(name, 0) for split, counts in splits.items()},
            }
            for name in ref.classes
        ],
        key="dataset-summary",
        description=f"Dataset {ref.version} at {ref.root}",
    )
    if manifest:
        skipped = "\n".join(f"- {reason}: {n}" for reason, n in manifest.skipped_counts.items())
        create_markdown_artifact(
            markdown=f"## Dataset {ref.version}\n\n**Source:** `{manifest.source}`\n\n"
            f"**Archive:** {manifest.archive.bytes:,} bytes, `{manifest.archive.checksum}` "
            f"(verified: {manifest.archive.checksum_verified})\n\n"
            f"**Skipped files:**\n{skipped or '- none'}\n\n**Resize:** {manifest.resize}",
            key="dataset-details",
            description=f"Dataset {ref.version}: source, checksum, skipped files",
        )


# What a person can do next, per step: retrying is cheap because every step resumes or reuses.
_NEXT_STEP = {
    "ensure_dataset": "Transient network errors were already retried. Fix the source or checksum "
    "the error names (the flow's `dataset` parameter), then run again: a published version is "
    "reused and a partial download resumes.",
    "evaluate": "The trained models are exported in their run dirs: rerun "
    "`python -m tasks.evaluate` on them, or run the deployment again.",
    "train": "A training resumes from the newest checkpoint in its run dir: retry the flow run "
    "(or run the deployment again with the same parameters and run dir) to continue.",
}


def failure_artifact(step: Any, task_run: Any, state: Any) -> None:
    """``on_failure`` hook: a markdown artifact on the failed task run naming it and its error.

    Written through the client with explicit run ids, because hooks run after the task's own
    run context has closed.
    """
    markdown = (
        f"## {step.name} failed\n\n**Task run:** `{task_run.name}`\n\n"
        f"**Error:** {state.message}\n\n{_NEXT_STEP.get(step.name, _NEXT_STEP['train'])}"
    )
    key = f"failure-{step.name.replace('_', '-')}"
    _create_markdown(key, markdown, f"{step.name} failed", task_run.flow_run_id, task_run.id)


def _create_markdown(
    key: str, markdown: str, description: str, flow_run_id: Any, task_run_id: Any = None
) -> None:
    """A markdown artifact attached by explicit run ids: hooks run after the run context."""
    with get_client(sync_client=True) as client:
        client.create_artifact(
            ArtifactCreate(
                key=key,
                type="markdown",
                data=markdown,
                description=description,
                flow_run_id=flow_run_id,
                task_run_id=task_run_id,
            )
        )


def flow_failure_artifact(flow: Any, flow_run: Any, state: Any) -> None:
    """The flow's ``on_failure`` hook: a markdown artifact on the failed flow run with its error,
    so that a run that failed before any task shows why in the UI as a failed task does: invalid
    parameters (Prefect's own validation, before the flow body runs, calls this hook too), an
    unreachable source."""
    markdown = (
        f"## {flow.name} failed\n\n**Flow run:** `{flow_run.name}`\n\n"
        f"**Error:** {_one_line(state.message)}"
        "\n\nFix the parameter it names (Run → Parameters in the UI, or `--params` / the flags"
        " of `train-cats`) and run again."
    )
    _create_markdown(f"failure-{flow.name}", markdown, f"{flow.name} failed", flow_run.id)


def _one_line(message: str | None) -> str:
    """A state's message on one line. Prefect lists invalid parameters one per line under a
    heading ("...invalid parameters:\n - dataset.checksum: Value error, reason"): join them."""
    head, *items = [line.strip() for line in (message or "").splitlines() if line.strip()] or [""]
    reasons = [item.removeprefix("- ").replace("Value error, ", "") for item in items]
    return " ".join([head, "; ".join(reasons)]) if reasons else head


class ProgressArtifact:
    """A training ``progress`` callback that keeps one Prefect progress artifact up to date."""

    def __init__(self, label: str):
        self.label = label
        self.artifact_id = create_progress_artifact(0.0, description=f"{label}: starting")
        self.last = 0.0
        self.logger = get_run_logger()

    def __call__(self, p: dict) -> None:
        now = time.monotonic()
        final = p["step"] >= p["total_steps"]
        if now - self.last < PROGRESS_EVERY_S and not final:
            return
        self.last = now
        text = (
            f"{self.label}: step {p['step']}/{p['total_steps']}, loss {p['loss']:.4f}, "
            f"lr {p['lr']:.2e}, {p['images_per_s']:.1f} img/s"
        )
        self.report(100.0 * p["step"] / max(p["total_steps"], 1), text)

    def report(self, percent: float, text: str) -> None:
        """Set the artifact to ``percent`` (0-100) with ``text`` as its description; log it."""
        update_progress_artifact(self.artifact_id, percent, description=text)
        self.logger.info(text)


def publish_training(model: str, result: dict, where: str) -> None:
    metrics = result.get("metrics") or {}
    create_table_artifact(
        table=[{"metric": k, "value": v} for k, v in sorted(metrics.items())],
        key=f"{model}-metrics",
        description=f"{model}: final training metrics ({where})",
    )
    files = result.get("files") or {}
    items = files.items() if isinstance(files, dict) else ((Path(f).name, f) for f in files)
    lines = [f"- {name}: `{path}`" for name, path in items]
    create_markdown_artifact(
        markdown=f"## {model} run\n\n**Run dir ({where}):** `{result['run_dir']}`\n\n"
        + "\n".join(lines),
        key=f"{model}-files",
        description=f"{model}: exported files",
    )
    if where == "local":
        create_link_artifact(
            Path(result["run_dir"]).resolve().as_uri(),
            link_text=f"{model} run dir",
            key=f"{model}-run-dir",
        )


def _artifact_key(deployment: str, what: str) -> str:
    # Prefect keys: lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{deployment}-eval-{what}".lower()).strip("-")


def _significant(value: float) -> float:
    return float(f"{value:.6g}")


def publish_report(report_dir: Path) -> None:
    """Publish the report to the current Prefect run: a table of the metrics, a markdown summary
    with the sample grid and confusion matrix inline (`data:` URIs, which the Prefect UI renders),
    and links to the report files."""
    report = load_report(report_dir)
    _publish_metrics_and_summary(report, lambda relative: (report_dir / relative).read_bytes())
    for name, relative in {"report_json": REPORT_JSON, **report.files}.items():
        create_link_artifact(
            link=(report_dir / relative).as_uri(),
            link_text=f"{name}: {report_dir / relative}",
            key=_artifact_key(report.deployment, name.replace("_", "-")),
        )


def publish_remote_report(result: dict, out: str, read: Callable[[str], bytes]) -> None:
    """Publish a report written on the runs volume as ``publish_report`` does a local one.

    ``read(path)`` returns a committed file of the runs volume (``path`` relative to its root,
    e.g. ``modal_calls.read_volume_file``): the same metrics table and summary, with the sample
    grid and confusion matrix inline, read back from ``<out>/``; instead of file links, how to
    fetch the folder. If the report cannot be read, the metrics of ``result`` only.
    """
    logger = get_run_logger()
    try:
        report = Report.model_validate_json(read(f"{out}/{REPORT_JSON}"))
    except Exception as exc:  # the step succeeded: show what is known rather than fail it
        logger.warning("could not read %s/%s from the runs volume: %s", out, REPORT_JSON, exc)
        report = None
        rows = [{"metric": k, "value": v} for k, v in sorted((result.get("metrics") or {}).items())]
        rows += [{"metric": k, "value": f"not computed: {v}"} for k, v in
                 sorted((result.get("not_computed") or {}).items())]  # fmt: skip
        create_table_artifact(rows, key="eval-metrics", description="Evaluation metrics (Modal)")
    if report is not None:
        _publish_metrics_and_summary(report, lambda relative: read(f"{out}/{relative}"))
    create_markdown_artifact(
        markdown=f"## Evaluation report on volume `train-cats-runs`\n\n`{result['report_dir']}`"
        f"\n\nRegressions: {result.get('regressions') or 'none'}\n\nFetch it with:\n\n"
        f"```\nmodal volume get train-cats-runs {out} ./report\n```",
        key="eval-report-location",
        description="Where the evaluation report lives on Modal",
    )


def _publish_metrics_and_summary(report: Report, read: Callable[[str], bytes]) -> None:
    """The metrics table and the markdown summary; ``read(relative)`` gives a report file."""
    rows: list[dict[str, Any]] = []
    for name, value in report.metrics.items():
        delta = report.deltas.get(name)
        rows.append(
            {
                "metric": name,
                "value": _significant(value),
                "previous": _significant(delta.previous) if delta else None,
                "delta": _significant(delta.delta) if delta else None,
                "regression": bool(delta and delta.regression),
                "note": "",
            }
        )
    for name, reason in report.not_computed.items():
        rows.append({"metric": name, "value": "not computed", "regression": False, "note": reason})
    create_table_artifact(
        table=rows,
        key=_artifact_key(report.deployment, "metrics"),
        description=f"Evaluation metrics, dataset {report.dataset.version}",
    )
    summary = render_markdown(report)
    for name in ("grid", "confusion_png", "memorisation_scatter", "memorisation_pairs"):
        if name in report.files:
            relative = report.files[name]
            try:
                uri = figures.png_data_uri(io.BytesIO(read(relative)))
            except Exception as exc:  # a missing picture leaves its relative link, not a failure
                get_run_logger().warning("could not inline %s (%s): %s", name, relative, exc)
                continue
            summary = summary.replace(f"]({relative})", f"]({uri})")
    create_markdown_artifact(
        markdown=summary,
        key=_artifact_key(report.deployment, "report"),
        description="Evaluation report with the sample grid and confusion matrix",
    )
