"""The evaluation report: its JSON schema, where reports live, deltas against the previous report of
the same deployment, and the human-readable Markdown.

Reports of one deployment default to `$TRAIN_CATS_RUNS_DIR/reports/<deployment>/<stamp>/`
(`report.json`, `report.md`, pictures), but may be written anywhere: every finished report is
appended to `$TRAIN_CATS_RUNS_DIR/reports/<deployment>/history.jsonl`, and the previous report is
the newest entry there that still exists (see `tasks.evaluate`), unless the caller names one.

A metric regressed when it moved the wrong way by more than its threshold: scores in [0, 1]
(accuracies, F1, precision, recall) by more than `abs_threshold` (absolute), distances (FD, FID,
KID) by more than `rel_threshold` times the previous value.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tasks.paths import runs_root

SCHEMA_VERSION = 1
REPORT_JSON = "report.json"
REPORT_MD = "report.md"

# Distances: lower is better. "…_std" and sample counts carry no direction. Everything else in
# `Report.metrics` is a score in [0, 1] where higher is better.
LOWER_IS_BETTER = frozenset(
    {
        "generator.classifier_fd",
        "generator.classifier_kid",
        "generator.inception_fid",
        "generator.inception_kid",
        # The share of samples flagged as copies of a training image: any rise from 0 flags.
        "generator.copy_fraction.pixel",
        "generator.copy_fraction.features",
    }
)


class ModelIdentity(BaseModel):
    """Which exported model was evaluated: its folder and the hashes of its two files."""

    kind: str
    path: str
    weights_sha256: str
    config_sha256: str
    image_size: int
    classes: list[str]
    dataset_version: str | None = Field(None, description="Version the model was trained on.")
    train_config: dict[str, Any] = Field(
        default_factory=dict, description="The training config it was exported with."
    )


class DatasetIdentity(BaseModel):
    version: str
    root: str
    label_mode: str
    classes: list[str]
    split: str = "val"
    split_counts: dict[str, int] = Field(description="Held-out images per class.")


class Sampling(BaseModel):
    """How the DiT samples were drawn (EMA weights, as exported)."""

    method: str
    steps: int
    cfg_scale: float
    seed: int
    samples_per_class: int
    n_generated: int
    image_size: int
    # The sampling levers (issue 21 §2); the defaults are how reports before them sampled.
    guidance: str = "cfg"
    guidance_interval: tuple[float, float] | None = None
    time_shift: float = 1.0
    # The autocast precision the samples were drawn in ("auto" resolves per machine: bf16 on CUDA
    # and on CPUs with AMX or AVX-512 BF16); None in reports from before it was recorded. Part of
    # the like-for-like check, since the two round differently.
    precision: str | None = None


class Delta(BaseModel):
    previous: float
    current: float
    delta: float
    regression: bool


class Report(BaseModel):
    """Contents of `report.json`. `metrics` holds only computed numbers; anything that was not
    computed is in `not_computed` with the reason, never a placeholder value."""

    schema_version: int = SCHEMA_VERSION
    created_at: str = Field(description="UTC, ISO 8601.")
    deployment: str
    dataset: DatasetIdentity
    classifier: ModelIdentity | None = None
    dit: ModelIdentity | None = None
    sampling: Sampling | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    not_computed: dict[str, str] = Field(default_factory=dict)
    notes: list[str] = Field(default_factory=list)
    settings: dict[str, float | int | str] = Field(
        default_factory=dict, description="Sample counts, feature dims, KID subset size, k."
    )
    confusion_matrix: list[list[int]] | None = None
    confusion_columns: list[str] | None = Field(
        None, description="The predicted classes (columns) when the classifier has classes the "
        "dataset lacks; None: the dataset's classes, as the rows.",
    )  # fmt: skip
    files: dict[str, str] = Field(default_factory=dict, description="Relative to the report dir.")
    previous_report: str | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    deltas: dict[str, Delta] = Field(default_factory=dict)
    regressions: list[str] = Field(default_factory=list)


def reports_dir(deployment: str) -> Path:
    """`$TRAIN_CATS_RUNS_DIR/reports/<deployment>`: the history of one deployment's reports."""
    if not deployment or "/" in deployment or deployment in (".", ".."):
        raise ValueError(f"deployment name {deployment!r} must be a non-empty name without '/'")
    return runs_root() / "reports" / deployment


def load_report(path: str | Path) -> Report:
    """Read a `report.json` (or the report folder holding one).

    Raises:
        FileNotFoundError: no report there. pydantic.ValidationError: not a report.
    """
    path = Path(path)
    if path.is_dir():
        path = path / REPORT_JSON
    return Report.model_validate_json(path.read_text())


def compare(
    current: Report, previous: Report, abs_threshold: float, rel_threshold: float
) -> tuple[dict[str, Delta], list[str], list[str]]:
    """Deltas of every metric present in both reports, the regressed metric names, and notes on
    what makes the comparison less than like-for-like."""
    deltas: dict[str, Delta] = {}
    for name, value in current.metrics.items():
        before = previous.metrics.get(name)
        if before is None or name.endswith("_std"):
            continue
        change = value - before
        if name in LOWER_IS_BETTER:
            regression = change > rel_threshold * abs(before)
        else:
            regression = change < -abs_threshold
        deltas[name] = Delta(previous=before, current=value, delta=change, regression=regression)
    notes = []
    if previous.dataset.version != current.dataset.version:
        notes.append(
            f"the previous report used dataset {previous.dataset.version}, this one "
            f"{current.dataset.version}: deltas mix model and data changes"
        )
    if previous.settings.get("n_feature_samples") != current.settings.get("n_feature_samples"):
        notes.append(
            "the previous report used a different number of samples: FD/FID are biased by the "
            "sample count, so their deltas are not like-for-like"
        )
    for kind in ("classifier", "dit"):
        changed = _config_changes(getattr(previous, kind), getattr(current, kind))
        if changed:
            notes.append(
                f"the previous report's {kind} was trained with another config ({changed}): "
                "deltas mix the recipe change with run-to-run variation"
            )
    if current.dit and judge_identity(previous) != judge_identity(current):
        notes.append(
            "the previous report judged the DiT with another classifier (its weights or "
            "config.json differ): conditional accuracy, FD, KID and precision/recall in "
            "classifier features are not like-for-like"
        )
    return deltas, [name for name, d in deltas.items() if d.regression], notes


# Fields that change how a run is logged or executed, not what it learns.
_COSMETIC = {"progress_bar", "log_every", "num_threads", "adaptive_threads", "keep_checkpoints"}


def _config_changes(before: ModelIdentity | None, after: ModelIdentity | None) -> str:
    """`field before -> after, ...` for the training-config fields that differ; "" if none (or a
    model, or a config, is missing on either side)."""
    if before is None or after is None or not before.train_config or not after.train_config:
        return ""
    a, b = before.train_config, after.train_config
    fields = sorted(k for k in set(a) | set(b) if k not in _COSMETIC and a.get(k) != b.get(k))
    return ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in fields)


def judge_identity(report: Report) -> tuple[str, str] | None:
    """The hashes of the classifier whose features and predictions judged the samples."""
    c = report.classifier
    return None if c is None else (c.weights_sha256, c.config_sha256)


def _fmt(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.4g}"


def _model_line(label: str, model: ModelIdentity | None) -> str:
    if model is None:
        return f"- **{label}:** not given"
    return (
        f"- **{label}:** `{model.path}` (weights sha256 `{model.weights_sha256[:16]}…`, "
        f"{model.image_size} px, trained on `{model.dataset_version}`)"
    )


def _guidance_words(s: Sampling) -> str:
    """'CFG scale 5' or 'autoguidance scale 5 at t in [0.2, 0.8]'."""
    kind = "CFG" if s.guidance == "cfg" else "autoguidance"
    where = ""
    if s.guidance_interval is not None:
        where = f" at t in [{s.guidance_interval[0]:g}, {s.guidance_interval[1]:g}]"
    return f"{kind} scale {s.cfg_scale:g}{where}"


def render_markdown(report: Report) -> str:
    """The human-readable report; pictures are linked by their paths relative to the report."""
    lines = [
        f"# Evaluation report — {report.deployment}",
        "",
        f"Created {report.created_at}. Dataset `{report.dataset.version}` "
        f"({report.dataset.label_mode}, classes: {', '.join(report.dataset.classes)}), "
        f"held-out split `{report.dataset.split}` "
        f"({sum(report.dataset.split_counts.values())} images).",
        "",
        _model_line("Classifier", report.classifier),
        _model_line("DiT", report.dit),
    ]
    if report.dit and report.classifier:
        lines.append(f"- **Judge:** the DiT's samples were judged by `{report.classifier.path}`")
    if report.sampling:
        s = report.sampling
        lines.append(
            f"- **Sampling:** {s.samples_per_class} per class ({s.n_generated} in all) with the EMA "
            f"weights, {s.method} sampler, {s.steps} steps, {_guidance_words(s)}, time shift "
            f"{s.time_shift:g}, seed {s.seed}" + (f", {s.precision}" if s.precision else "")
        )
    lines += [
        "",
        "## Metrics",
        "",
        "| metric | value | previous | delta | |",
        "|---|---|---|---|---|",
    ]
    for name, value in report.metrics.items():
        delta = report.deltas.get(name)
        flag = "**regression**" if delta and delta.regression else ""
        previous = delta.previous if delta else None
        change = f"{delta.delta:+.4g}" if delta else "—"
        lines.append(f"| `{name}` | {_fmt(value)} | {_fmt(previous)} | {change} | {flag} |")
    for name in report.not_computed:
        lines.append(f"| `{name}` | not computed (see below) | | | |")
    if report.previous_report:
        lines += ["", f"Compared with `{report.previous_report}`."]
        if report.regressions:
            lines.append(f"**Regressions:** {', '.join(f'`{n}`' for n in report.regressions)}.")
    else:
        lines += ["", "No previous report for this deployment: no deltas."]
    if report.not_computed:
        lines += ["", "## Not computed", ""]
        lines += [f"- `{name}`: {reason}" for name, reason in report.not_computed.items()]
    if report.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in report.notes]]
    if report.confusion_matrix is not None:
        names = report.dataset.classes
        columns = report.confusion_columns or names
        lines += ["", "## Confusion matrix (rows: true class, columns: predicted)", ""]
        lines += ["| | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        lines += [
            f"| **{name}** | " + " | ".join(str(c) for c in row) + " |"
            for name, row in zip(names, report.confusion_matrix, strict=True)
        ]
        if "confusion_png" in report.files:
            lines += ["", f"![confusion matrix]({report.files['confusion_png']})"]
    if "grid" in report.files:
        lines += [
            "",
            "## Samples (one row per class)",
            "",
            f"![samples]({report.files['grid']})",
            "",
            f"Individual images: `{report.files['samples']}/`.",
        ]
    return "\n".join(lines + _memorisation_lines(report)) + "\n"


def _memorisation_lines(report: Report) -> list[str]:
    """The copy-detection section (`tasks/evaluation/memorisation.py`), when it was computed."""
    if "memorisation_scatter" not in report.files:
        return []
    settings, found = report.settings, []
    for space, label in (("pixel", "pixels"), ("features", "the judge's features")):
        value = report.metrics.get(f"generator.copy_fraction.{space}")
        if value is not None:
            median = settings.get(f"copy_ratio_median.{space}")
            found.append(f"{label} {value:.1%} (median ratio {_fmt(median)})")
    mirrored = " and their mirror images" if settings.get("copy_mirrored") else ""
    return [
        "",
        "## Memorisation (copy detection)",
        "",
        f"For each sample, d1 is the L2 distance to its nearest training image (the DiT's "
        f"{settings.get('copy_training_images')} training images{mirrored}, at its size, pixels "
        f"in [0, 1]) and d2 to the second nearest; a sample with d1 / d2 < "
        f"{_fmt(settings.get('copy_ratio_threshold'))} is flagged as a likely copy (the ratio "
        f"test after Carlini et al. 2023). Flagged: {'; '.join(found)}.",
        "",
        f"![copy detection]({report.files['memorisation_scatter']})",
        "",
        "The samples nearest to being copies (lowest pixel ratio), each beside its nearest "
        "training image; the label gives the sample's class, number and ratio:",
        "",
        f"![sample | nearest training image]({report.files['memorisation_pairs']})",
    ]
