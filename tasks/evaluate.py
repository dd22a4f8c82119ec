"""Evaluate exported models offline and publish a report: the last step of the pipeline.

`evaluate(dataset, classifier=..., dit=..., out=..., options=EvalOptions(...))` reads only the
exports (`model.safetensors` + `config.json`, see `tasks/training/export.py`) and the dataset's
held-out split, and writes into `out`:

- `report.json` (`tasks.evaluation.report.Report`) and `report.md`;
- `confusion_matrix.png`, `samples_grid.png` (one labelled row per class) and `samples/<class>/*.png`.

What is measured: `tasks/evaluation/measure.py`; how a report is filled: `compute.py`; the history
that gives each report its deltas against the previous one: `history.py`. The output folder is
staged next to `out` and renamed into place when complete. The Prefect adapter publishes the
report as artifacts (`tasks/adapters/artifacts.py`); this function knows nothing of Prefect.

Command line: `python -m tasks.evaluate --help` (`tasks/evaluation/cli.py`).
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the command line checks its flags before the imports below load torch
    from importlib import import_module

    from tasks.evaluation.cli import run_cli

    def load():  # this module by its own name: the evaluation, and torch
        return import_module("tasks.evaluate").evaluate

    sys.exit(run_cli(load))

from data.dataset import DatasetRef, load_ref, sha256_file
from tasks.champions import TeacherAsJudgeError
from tasks.evaluation import history
from tasks.evaluation.compute import compute_report, dataset_identity, other_version_notes
from tasks.evaluation.options import EvalOptions, validated
from tasks.evaluation.report import (
    REPORT_JSON,
    REPORT_MD,
    Report,
    compare,
    load_report,
    render_markdown,
    reports_dir,
)
from tasks.paths import run_path
from tasks.training.export import WEIGHTS, read_export_config

Export = tuple[Path, dict[str, Any]]


def evaluate(
    dataset: str | Path | DatasetRef,
    classifier: str | Path | None = None,
    dit: str | Path | None = None,
    out: str | Path | None = None,
    options: EvalOptions | dict | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Evaluate an exported classifier and/or DiT on `dataset`'s held-out split.

    Args:
        dataset: a DatasetRef, its JSON, or a path to a reference.json/manifest.json/version folder.
        classifier, dit: export folders (`model.safetensors` + `config.json`); at least one. With
            both, the classifier judges the DiT (report.md names it); its classes may be a
            superset of the dataset's (`_check_exports`).
        out: the report folder (must not exist unless `overwrite`); default
            `$TRAIN_CATS_RUNS_DIR/reports/<deployment>/<UTC stamp>`.
        options: `EvalOptions` (sampling, metrics, history, device); `overrides` are fields of
            it given as keywords, applied on top.

    Returns:
        JSON-able summary: {"report_dir", "report_json", "report_md", "dataset_version",
        "metrics", "not_computed", "regressions"}.

    Raises:
        ValueError: no model given, bad options, a DiT with classes the dataset lacks, a
            classifier whose classes do not cover the dataset's and the DiT's, or a missing
            cache size; FileNotFoundError: an incomplete export or a missing `previous`;
            FileExistsError: `out` exists. All before any model runs.
    """
    opts = validated(options, **overrides)
    if classifier is None and dit is None:
        raise ValueError("nothing to evaluate: pass --classifier and/or --dit (export folders)")
    ref = load_ref(dataset)
    deployment = opts.deployment or history.default_deployment()
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if out is None:
        out = reports_dir(deployment) / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    out = Path(out).expanduser().resolve()
    if out.exists() and not opts.overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    clf_export, dit_export = _check_exports(ref, classifier, dit)
    previous = _previous(opts, deployment, out, ref)

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        report = Report(created_at=created_at, deployment=deployment, dataset=dataset_identity(ref))
        compute_report(ref, clf_export, dit_export, stage, report, opts)
        report.notes += other_version_notes(report, ref.version)
        if previous is not None:
            report.previous_report = str(previous)
            report.thresholds = {"abs": opts.regression_abs, "rel": opts.regression_rel}
            report.deltas, report.regressions, notes = compare(
                report, load_report(previous), opts.regression_abs, opts.regression_rel
            )
            report.notes += notes
        report.files["report_md"] = REPORT_MD
        (stage / REPORT_JSON).write_text(report.model_dump_json(indent=2) + "\n")
        (stage / REPORT_MD).write_text(render_markdown(report))
        history.publish(stage, out, opts.overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    history.append_history(deployment, out, created_at)
    return {
        "report_dir": str(out),
        "report_json": str(out / REPORT_JSON),
        "report_md": str(out / REPORT_MD),
        "dataset_version": ref.version,
        "metrics": report.metrics,
        "not_computed": report.not_computed,
        "regressions": report.regressions,
    }


def evaluate_runs(
    dataset: str | Path | DatasetRef | dict,
    out: str,
    classifier: str | None,
    dit: str | None,
    options: EvalOptions | dict | None = None,
) -> dict[str, Any]:
    """`evaluate` with run names relative to the runs root (`tasks.paths.run_path`) instead of
    folders: what the Prefect task and the Modal function call. Empty names skip that model."""
    if isinstance(dataset, dict):
        dataset = DatasetRef.model_validate(dataset)
    return evaluate(
        dataset,
        classifier=run_path(classifier) if classifier else None,
        dit=run_path(dit) if dit else None,
        out=run_path(out),
        options=options,
    )


def _check_not_the_teacher(judge: Path, dit_export: Export) -> None:
    """A DiT trained with REPA was pulled towards its teacher's features (Yu et al. 2025 §3);
    judged in those same features, its FD, KID and conditional accuracy would flatter it. The
    teacher is known by the weights' sha256 that the DiT's export recorded."""
    teacher = dit_export[1].get("repa_teacher") or {}
    if "weights_sha256" in teacher and teacher["weights_sha256"] == sha256_file(judge / WEIGHTS):
        raise TeacherAsJudgeError(
            f"the classifier {judge} is the REPA teacher of the DiT {dit_export[0]}: its features "
            "are what the DiT was trained towards, so they cannot judge it; pass another "
            "classifier export (e.g. one trained on the same data with another seed)"
        )


def _check_exports(
    ref: DatasetRef, classifier: str | Path | None, dit: str | Path | None
) -> tuple[Export | None, Export | None]:
    """Read both exports' configs and check them against the dataset, before any model runs.

    The DiT's classes must be the dataset's (or some of them), with a cache at its size. The
    classifier's must cover the dataset's and the DiT's, by name: it may have more, as the
    `classifier` deployment's champion (12 breeds and `other`) judging the `dit` deployment's
    DiT (12 breeds). A judge trained at a size the dataset has no cache for still judges (the
    samples are resized to its size); only its own accuracy there is not computed.
    """
    clf_export = read_export_config(classifier, "classifier") if classifier is not None else None
    dit_export = read_export_config(dit, "dit") if dit is not None else None
    if dit_export is not None:
        folder, config = dit_export
        unknown = sorted(set(config["classes"]) - set(ref.classes))
        if unknown:
            raise ValueError(
                f"{folder} was trained on classes {unknown} that dataset {ref.version} lacks; "
                "evaluate it on the dataset it was trained on"
            )
        _check_cache(ref, folder, config)
    if clf_export is not None:
        folder, config = clf_export
        if dit_export is not None:
            missing = [name for name in dit_export[1]["classes"] if name not in config["classes"]]
            if missing:
                raise ValueError(
                    f"the classifier {folder} cannot judge the DiT {dit_export[0]}: it lacks the "
                    f"DiT's classes {missing} (it has {config['classes']}); pass one whose "
                    "classes cover the DiT's, such as the `classifier` deployment's champion"
                )
            _check_not_the_teacher(folder, dit_export)
        missing = [name for name in ref.classes if name not in config["classes"]]
        if missing:
            raise ValueError(
                f"the classifier {folder} lacks the classes {missing} of dataset {ref.version} "
                f"(it has {config['classes']}); evaluate it on the dataset it was trained on"
            )
        if dit_export is None:  # a judge may be of another size; a classifier alone may not
            _check_cache(ref, folder, config)
    return clf_export, dit_export


def _check_cache(ref: DatasetRef, folder: Path, config: dict[str, Any]) -> None:
    if int(config["image_size"]) not in ref.caches:
        raise ValueError(
            f"dataset {ref.version} has no {config['image_size']} px cache for {folder}; "
            f"it has {sorted(ref.caches)}"
        )


def _previous(opts: EvalOptions, deployment: str, out: Path, ref: DatasetRef) -> Path | None:
    """The report to compare with: `opts.previous`, else the deployment history's newest."""
    if opts.previous is None:
        return history.previous_report(deployment, exclude=out, classes=ref.classes)
    path = Path(opts.previous)
    path = path / REPORT_JSON if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"previous report {path} not found")
    return path
