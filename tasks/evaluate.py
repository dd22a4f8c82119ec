"""Evaluate exported models offline and publish a report: the last step of the pipeline.

`evaluate(dataset, classifier=..., dit=..., out=...)` reads only the exports (`model.safetensors` +
`config.json`, see `tasks/export.py`) and the dataset's held-out split, and writes into `out`:

- `report.json` (`tasks.report.Report`) and `report.md`;
- `confusion_matrix.png`, `samples_grid.png` (one labelled row per class) and `samples/<class>/*.png`.

Classifier: top-1 and per-class accuracy, macro-F1, confusion matrix on the held-out split.
Generator (DiT, EMA weights): samples per class, then, in the trained classifier's penultimate
feature space and at equal, class-matched sample counts: Fréchet distance, KID, k-NN precision and
recall; the classifier's accuracy on the samples for their conditioning class ("conditional
accuracy"); and Inception FID/KID when the Inception weights are available (`tasks/inception.py`).
Whatever cannot be computed is listed under `not_computed` with the reason, never given a value.

The output folder is staged next to `out` and renamed into place when complete. Each finished
report is appended to its deployment's history (`tasks/report.py`), and the next report of the
same deployment shows its deltas against it. Inside a Prefect flow or task run the function also
publishes a table, a markdown and link artifacts.

Command line: `python -m tasks.evaluate --help`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock

from data.dataset import DatasetRef, load_ref, open_split, sha256_file
from data.errors import DatasetError
from models.classifier import Classifier
from models.flow_matching import SAMPLERS
from tasks import figures, inception, metrics
from tasks.export import CONFIG, WEIGHTS, read_export_config
from tasks.loader import iter_batches
from tasks.report import (
    REPORT_JSON,
    REPORT_MD,
    DatasetIdentity,
    ModelIdentity,
    Report,
    Sampling,
    compare,
    load_report,
    render_markdown,
    reports_dir,
)
from tasks.train_classifier import load_classifier
from tasks.train_dit import load_dit, sample
from tasks.trainers import runs_root

log = logging.getLogger(__name__)

HISTORY = "history.jsonl"
DEFAULT_DEPLOYMENT = "local"
GRID_PNG = "samples_grid.png"
CONFUSION_PNG = "confusion_matrix.png"
SAMPLES_DIR = "samples"


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _identity(folder: Path, config: dict[str, Any]) -> ModelIdentity:
    return ModelIdentity(
        kind=config["kind"],
        path=str(folder),
        weights_sha256=sha256_file(folder / WEIGHTS),
        config_sha256=sha256_file(folder / CONFIG),
        image_size=int(config["image_size"]),
        classes=list(config["classes"]),
        dataset_version=config.get("dataset_version"),
    )


@dataclass
class ClassifierUnderTest:
    """A loaded classifier with the input pipeline its config.json prescribes."""

    model: Classifier
    classes: list[str]
    image_size: int
    mean: torch.Tensor  # (1, 3, 1, 1)
    std: torch.Tensor  # (1, 3, 1, 1)

    @classmethod
    def load(
        cls, folder: Path, config: dict[str, Any], device: torch.device
    ) -> ClassifierUnderTest:
        norm = config["normalisation"]
        shape = (1, 3, 1, 1)
        return cls(
            model=load_classifier(folder).to(device).eval(),
            classes=list(config["classes"]),
            image_size=int(config["image_size"]),
            mean=torch.tensor(norm["mean"], dtype=torch.float32, device=device).view(shape),
            std=torch.tensor(norm["std"], dtype=torch.float32, device=device).view(shape),
        )

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """images: (N, 3, H, W) float in [0, 1] (resized to the classifier's size if needed)
        -> (predicted class ids (N,) int64, penultimate features (N, D) float32), on the CPU.
        A classifier exported with test_time_flip gives both for the image and its mirror,
        averaged, to real and generated images alike."""
        preds, feats = [], []
        for batch in images.split(batch_size):
            x = batch.to(self.mean.device, torch.float32).clamp(0, 1)
            if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
                x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True)
            f = self.model.forward_features((x - self.mean) / self.std)
            preds.append(self.model.head(f).argmax(dim=1).cpu())
            feats.append(f.float().cpu())
        return torch.cat(preds), torch.cat(feats)


def _split_images(ref: DatasetRef, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out images at `image_size`: (N, 3, H, W) float in [0, 1] and (N,) int64 labels."""
    split = open_split(ref, image_size, "val")
    images, labels = zip(*iter_batches(split, 256), strict=True)
    return torch.cat(images).float() / 255.0, torch.cat(labels)


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


def classifier_metrics(
    clf: ClassifierUnderTest, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 64
) -> dict[str, Any]:
    """Top-1/per-class accuracy, macro-F1 and confusion matrix of `clf` on labelled images.

    Args:
        images: (N, 3, H, W) float in [0, 1]; labels: (N,) int64 ids into `clf.classes`.

    Returns:
        `tasks.metrics.classification_metrics`'s dict.
    """
    preds, _ = clf.predict(images, batch_size)
    return metrics.classification_metrics(preds, labels, len(clf.classes))


def _per_class(prefix: str, classes: list[str], result: dict[str, Any]) -> dict[str, float]:
    """`{prefix.<class>: accuracy}` from `classification_metrics`' per-class accuracies, leaving
    out classes without samples."""
    per_class = zip(classes, result["per_class_accuracy"], strict=True)
    return {f"{prefix}.{name}": acc for name, acc in per_class if acc is not None}


def generator_metrics(
    clf: ClassifierUnderTest,
    fake: torch.Tensor,
    fake_labels: torch.Tensor,
    real: torch.Tensor,
    partners: torch.Tensor | None = None,
    kid_subset: int = 1000,
    kid_subsets: int = 100,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[dict[str, float], dict[str, str], dict[str, int]]:
    """Generator metrics in `clf`'s penultimate feature space.

    Args:
        fake: (N, 3, H, W) float in [0, 1] generated images; fake_labels: (N,) int64 conditioning
            class ids (in `clf.classes` numbering).
        real: (M, 3, H', W') float in [0, 1] held-out images, class-matched to `fake` by the caller.
        partners: (M,) int64, the index into `fake` of each real image's generated partner; FD,
            KID and precision/recall compare `fake[partners]` with `real` (equal counts). None:
            the first min(N, M) of each. The conditional accuracy always uses all N samples.

    Returns:
        (metrics, not_computed reasons, settings): metrics `generator.conditional_accuracy`
        (all samples) and `generator.conditional_accuracy.<class>` (the fraction of samples
        conditioned on that class that `clf` assigns to it), `generator.classifier_fd`,
        `generator.classifier_kid` (+ `_std`), `generator.precision`, `generator.recall`; settings record the counts, feature dim and KID subset size used.
    """
    fake_preds, fake_feats = clf.predict(fake, batch_size)
    _, real_feats = clf.predict(real, batch_size)
    if partners is not None:
        fake_feats = fake_feats[partners]
    n = min(len(fake_feats), len(real_feats))
    fake_feats, real_feats = fake_feats[:n], real_feats[:n]
    conditional = metrics.classification_metrics(fake_preds, fake_labels, len(clf.classes))
    out = {"generator.conditional_accuracy": conditional["accuracy"]}
    # Per class: e.g. the fraction of cat-conditioned samples the classifier calls "cat".
    out |= _per_class("generator.conditional_accuracy", clf.classes, conditional)
    skipped: dict[str, str] = {}
    settings = {"n_feature_samples": n, "classifier_feature_dim": int(fake_feats.shape[1])}
    if n >= 2:
        out["generator.classifier_fd"] = metrics.frechet_distance(real_feats, fake_feats)
        mean, std, used = metrics.kernel_inception_distance(
            real_feats, fake_feats, kid_subset, kid_subsets, seed
        )
        out["generator.classifier_kid"], out["generator.classifier_kid_std"] = mean, std
        settings["kid_subset_size"] = used
    else:
        reason = f"needs ≥ 2 class-matched samples per set, got {n}"
        skipped["generator.classifier_fd"] = skipped["generator.classifier_kid"] = reason
    k = metrics.PR_NEIGHBOURS
    if n > k:
        out["generator.precision"], out["generator.recall"] = metrics.precision_recall(
            real_feats, fake_feats, k
        )
        settings["pr_neighbours"] = k
    else:
        reason = f"k-NN manifolds with k={k} need more than {k} samples per set, got {n}"
        skipped["generator.precision"] = skipped["generator.recall"] = reason
    return out, skipped, settings


def _matched_real(
    ref: DatasetRef, image_size: int, class_names: list[str], per_class: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Held-out images matching the generated set class by class: for each class, a seeded draw of
    min(per_class, held-out count) images. Returns images (M, 3, S, S) float in [0, 1], the index
    into each class's generated block of every real image's generated partner, and the counts."""
    split = open_split(ref, image_size, "val")
    rng = np.random.default_rng(seed)
    rows, partners, counts = [], [], {}
    for c, name in enumerate(class_names):
        pool = split.indices[split.labels[split.indices] == ref.classes.index(name)]
        take = rng.permutation(pool)[: min(per_class, len(pool))]
        rows.append(take)
        partners.extend(c * per_class + i for i in range(len(take)))
        counts[name] = len(take)
    rows_all = np.concatenate(rows)
    images = torch.from_numpy(np.ascontiguousarray(split.images[rows_all])).permute(0, 3, 1, 2)
    return images.float() / 255.0, torch.tensor(partners, dtype=torch.long), counts


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def _save_samples(
    images: torch.Tensor, class_names: list[str], per_class: int, folder: Path
) -> None:
    for c, name in enumerate(class_names):
        for i in range(per_class):
            figures.save_png(
                figures.to_pil(images[c * per_class + i]),
                folder / SAMPLES_DIR / _safe_name(name) / f"{i:04d}.png",
            )


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "class"


def _history_entry(report_dir: Path) -> str:
    """Report paths are stored relative to the runs root when inside it, so that a history
    written on Modal (/runs) and read locally (or the reverse) still resolves."""
    root = runs_root()
    return str(report_dir.relative_to(root)) if report_dir.is_relative_to(root) else str(report_dir)


def _previous_report(deployment: str, exclude: Path, classes: list[str]) -> Path | None:
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


def _append_history(deployment: str, report_dir: Path, created_at: str) -> None:
    history = reports_dir(deployment) / HISTORY
    history.parent.mkdir(parents=True, exist_ok=True)
    entry = json.dumps({"report_dir": _history_entry(report_dir), "created_at": created_at})
    with FileLock(str(history) + ".lock"), open(history, "a") as handle:
        handle.write(entry + "\n")


def _publish(stage: Path, out: Path, overwrite: bool) -> None:
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


# --------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------


def evaluate(
    dataset: str | Path | DatasetRef,
    classifier: str | Path | None = None,
    dit: str | Path | None = None,
    out: str | Path | None = None,
    *,
    samples_per_class: int = 16,
    sampler: str | None = None,
    steps: int | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    deployment: str | None = None,
    previous: str | Path | None = None,
    inception_weights: str | Path | None = None,
    inception_download: bool | None = None,
    kid_subset_size: int = 1000,
    kid_subsets: int = 100,
    regression_abs: float = 0.02,
    regression_rel: float = 0.10,
    batch_size: int = 64,
    device: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Evaluate an exported classifier and/or DiT on `dataset`'s held-out split.

    Args:
        dataset: a DatasetRef, its JSON, or a path to a reference.json/manifest.json/version folder.
        classifier, dit: export folders (`model.safetensors` + `config.json`); at least one.
        out: the report folder (must not exist unless `overwrite`); default
            `$TRAIN_CATS_RUNS_DIR/reports/<deployment>/<UTC stamp>`.
        samples_per_class: DiT samples per class, ≥ 1 (≥ 2 for FD/KID, > 3 for precision/recall).
        sampler, steps, cfg_scale: "euler"/"heun", ODE steps ≥ 1, CFG scale ≥ 1; None takes the
            DiT export's defaults (config.json "sampler"). The values used are in the report.
        seed: seed of the sampling noise, the real-image draw and the KID subsets.
        deployment: the name whose report history gives the deltas; default the Prefect
            deployment running this code, else "local".
        previous: compare with this report.json/folder instead of the history's latest.
        inception_weights, inception_download: see `tasks.inception.resolve_weights`.
        kid_subset_size, kid_subsets: KID subsets (size capped at the sample count).
        regression_abs: flag a score in [0, 1] that dropped by more than this.
        regression_rel: flag a distance (FD, FID, KID) that rose by more than this fraction.
        batch_size: images per forward pass.
        device: torch device; default CUDA when available, else CPU.
        overwrite: replace an existing `out` (atomically, once the new report is complete).

    Returns:
        JSON-able summary: {"report_dir", "report_json", "report_md", "dataset_version",
        "metrics", "not_computed", "regressions"}.

    Raises:
        ValueError: no model given, bad sampling settings, class names that do not match the
            dataset, or a missing cache size; FileNotFoundError: an incomplete export or a missing
            `previous`; FileExistsError: `out` exists. All before any model runs.
    """
    # ---- validate everything before the expensive part ---------------------------------------
    if classifier is None and dit is None:
        raise ValueError("nothing to evaluate: pass --classifier and/or --dit (export folders)")
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class={samples_per_class} must be ≥ 1")
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} must be ≥ 1")
    if sampler is not None and sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if cfg_scale is not None and cfg_scale < 1.0:
        raise ValueError(f"cfg_scale={cfg_scale} must be ≥ 1 (1 = no guidance)")
    ref = load_ref(dataset)
    deployment = deployment or default_deployment()
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if out is None:
        out = reports_dir(deployment) / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    clf_export = read_export_config(classifier, "classifier") if classifier is not None else None
    dit_export = read_export_config(dit, "dit") if dit is not None else None
    for export in (clf_export, dit_export):
        if export is None:
            continue
        folder, config = export
        unknown = sorted(set(config["classes"]) - set(ref.classes))
        if unknown:
            raise ValueError(
                f"{folder} was trained on classes {unknown} that dataset {ref.version} lacks; "
                "evaluate it on the dataset it was trained on"
            )
        if int(config["image_size"]) not in ref.caches:
            raise ValueError(
                f"dataset {ref.version} has no {config['image_size']} px cache for {folder}; "
                f"it has {sorted(ref.caches)}"
            )
    if clf_export and clf_export[1]["classes"] != ref.classes:
        raise ValueError(
            f"the classifier's classes {clf_export[1]['classes']} differ from the dataset's "
            f"{ref.classes}; evaluate it on the dataset it was trained on"
        )
    previous_path = None
    if previous is not None:
        previous_path = Path(previous)
        previous_path = previous_path / REPORT_JSON if previous_path.is_dir() else previous_path
        if not previous_path.is_file():
            raise FileNotFoundError(f"previous report {previous_path} not found")
    else:
        previous_path = _previous_report(deployment, exclude=out, classes=ref.classes)
    torch_device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        report = Report(
            created_at=created_at, deployment=deployment, dataset=_dataset_identity(ref)
        )
        opts = _Settings(
            samples_per_class=samples_per_class, sampler=sampler, steps=steps,
            cfg_scale=cfg_scale, seed=seed, inception_weights=inception_weights,
            inception_download=inception_download, kid_subset=kid_subset_size,
            kid_subsets=kid_subsets, batch_size=batch_size, device=torch_device,
        )  # fmt: skip
        _run(ref, clf_export, dit_export, stage, report, opts)
        report.notes += _other_version_notes(report, ref.version)
        if previous_path is not None:
            before = load_report(previous_path)
            report.previous_report = str(previous_path)
            report.thresholds = {"abs": regression_abs, "rel": regression_rel}
            report.deltas, report.regressions, notes = compare(
                report, before, regression_abs, regression_rel
            )
            report.notes += notes
        report.files["report_md"] = REPORT_MD
        (stage / REPORT_JSON).write_text(report.model_dump_json(indent=2) + "\n")
        (stage / REPORT_MD).write_text(render_markdown(report))
        _publish(stage, out, overwrite)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _append_history(deployment, out, created_at)
    if _in_prefect_run():
        publish_artifacts(out, report)
    return {
        "report_dir": str(out),
        "report_json": str(out / REPORT_JSON),
        "report_md": str(out / REPORT_MD),
        "dataset_version": ref.version,
        "metrics": report.metrics,
        "not_computed": report.not_computed,
        "regressions": report.regressions,
    }


@dataclass(frozen=True)
class _Settings:
    """The options of one evaluation, as `evaluate` validated them."""

    samples_per_class: int
    sampler: str | None
    steps: int | None
    cfg_scale: float | None
    seed: int
    inception_weights: str | Path | None
    inception_download: bool | None
    kid_subset: int
    kid_subsets: int
    batch_size: int
    device: torch.device


GENERATOR_KEYS = (
    "generator.conditional_accuracy",
    "generator.classifier_fd",
    "generator.classifier_kid",
    "generator.precision",
    "generator.recall",
    "generator.inception_fid",
    "generator.inception_kid",
)


def _run(
    ref: DatasetRef,
    clf_export: tuple[Path, dict[str, Any]] | None,
    dit_export: tuple[Path, dict[str, Any]] | None,
    stage: Path,
    report: Report,
    opts: _Settings,
) -> None:
    """Compute everything into `report`, writing the pictures into `stage`."""
    clf = None
    if clf_export is not None:
        report.classifier = _identity(*clf_export)
        clf = ClassifierUnderTest.load(*clf_export, opts.device)
        _add_classifier_metrics(report, ref, clf, stage, opts)
    else:
        report.not_computed["classifier.*"] = "no classifier given"
    if dit_export is None:
        report.not_computed.update(dict.fromkeys(GENERATOR_KEYS, "no DiT given"))
        return
    report.dit = _identity(*dit_export)
    fake, class_names = _draw_samples(report, dit_export, stage, opts)
    real, partners, matched = _matched_real(
        ref, report.dit.image_size, class_names, opts.samples_per_class, opts.seed
    )
    report.settings["n_real_matched"] = len(real)
    short = {name: n for name, n in matched.items() if n < opts.samples_per_class}
    if short:
        report.notes.append(
            f"the held-out split has fewer images than samples_per_class for {short}; the "
            f"distribution metrics use {len(real)} class-matched real/generated pairs"
        )
    if clf is not None:
        _add_feature_metrics(report, clf, fake, class_names, real, partners, opts)
        _add_accuracy_at_dit_size(report, ref, clf, opts)
    else:
        report.not_computed.update(
            dict.fromkeys(GENERATOR_KEYS[:5], "no classifier given (its features are the space)")
        )
    _add_inception_metrics(report, real, fake[partners], opts)


def _dataset_identity(ref: DatasetRef) -> DatasetIdentity:
    split = open_split(ref, next(iter(ref.caches)), "val")
    held_out = np.bincount(split.labels[split.indices], minlength=len(ref.classes))
    return DatasetIdentity(
        version=ref.version,
        root=ref.root,
        label_mode=ref.label_mode,
        classes=list(ref.classes),
        split_counts={name: int(n) for name, n in zip(ref.classes, held_out, strict=True)},
    )


def _add_classifier_metrics(
    report: Report, ref: DatasetRef, clf: ClassifierUnderTest, stage: Path, opts: _Settings
) -> None:
    images, labels = _split_images(ref, clf.image_size)
    result = classifier_metrics(clf, images, labels, opts.batch_size)
    report.metrics["classifier.accuracy"] = result["accuracy"]
    report.metrics["classifier.macro_f1"] = result["macro_f1"]
    for name, acc in zip(clf.classes, result["per_class_accuracy"], strict=True):
        if acc is None:
            report.not_computed[f"classifier.class_accuracy.{name}"] = "no held-out images"
        else:
            report.metrics[f"classifier.class_accuracy.{name}"] = acc
    report.confusion_matrix = result["confusion_matrix"]
    figures.save_png(
        figures.confusion_image(report.confusion_matrix, clf.classes), stage / CONFUSION_PNG
    )
    report.files["confusion_png"] = CONFUSION_PNG
    report.settings["n_classifier_eval"] = len(labels)


def _draw_samples(
    report: Report, dit_export: tuple[Path, dict[str, Any]], stage: Path, opts: _Settings
) -> tuple[torch.Tensor, list[str]]:
    """Sample every class of the DiT (sampler settings default to the export's), save the grid
    and the single images; returns (N, 3, H, W) float in [0, 1] on the CPU and the class names."""
    model = load_dit(dit_export[0], device=opts.device)
    defaults = dit_export[1].get("sampler", {})
    method = opts.sampler or defaults.get("method", "euler")
    steps = opts.steps or int(defaults.get("steps", 25))
    scale = float(opts.cfg_scale if opts.cfg_scale is not None else defaults.get("cfg_scale", 1.0))
    names, per_class = list(model.classes), opts.samples_per_class
    fake = sample(model, names, per_class, steps, method, scale, opts.seed).cpu()
    report.sampling = Sampling(
        method=method,
        steps=steps,
        cfg_scale=scale,
        seed=opts.seed,
        samples_per_class=per_class,
        n_generated=len(fake),
        image_size=report.dit.image_size,
    )
    figures.save_png(figures.labelled_grid(fake, names, per_class), stage / GRID_PNG)
    _save_samples(fake, names, per_class, stage)
    report.files.update(grid=GRID_PNG, samples=SAMPLES_DIR)
    return fake, names


def _add_feature_metrics(
    report: Report,
    clf: ClassifierUnderTest,
    fake: torch.Tensor,
    class_names: list[str],
    real: torch.Tensor,
    partners: torch.Tensor,
    opts: _Settings,
) -> None:
    fake_labels = torch.tensor([clf.classes.index(n) for n in class_names])
    fake_labels = fake_labels.repeat_interleave(opts.samples_per_class)
    values, skipped, settings = generator_metrics(
        clf, fake, fake_labels, real, partners,
        opts.kid_subset, opts.kid_subsets, opts.seed, opts.batch_size,
    )  # fmt: skip
    report.metrics.update(values)
    report.not_computed.update(skipped)
    report.settings.update(settings)
    n, d = settings["n_feature_samples"], settings["classifier_feature_dim"]
    if n < d:
        report.notes.append(_few_samples_note("classifier", n, d))
    if report.dit.image_size != clf.image_size:
        report.notes.append(
            f"samples and real images ({report.dit.image_size} px) are resized to the "
            f"classifier's {clf.image_size} px before feature extraction"
        )


def _add_accuracy_at_dit_size(
    report: Report, ref: DatasetRef, clf: ClassifierUnderTest, opts: _Settings
) -> None:
    """The classifier's accuracy on real held-out images at the DiT's resolution, resized to its
    own exactly as the samples are: the ceiling of the conditional accuracy, and the check that
    a classifier trained at another size still recognises images at this one. Only when the
    sizes differ (otherwise it is `classifier.accuracy`) and the dataset has a cache there."""
    size = report.dit.image_size
    if size == clf.image_size or size not in ref.caches:
        return
    images, labels = _split_images(ref, size)
    result = classifier_metrics(clf, images, labels, opts.batch_size)
    report.metrics["classifier.accuracy_at_dit_size"] = result["accuracy"]
    report.metrics |= _per_class("classifier.class_accuracy_at_dit_size", clf.classes, result)


def _other_version_notes(report: Report, version: str) -> list[str]:
    """A model trained on another version of the data may have trained on some of these held-out
    images (the split is per version), which inflates its scores: say so in the report."""
    notes = []
    for model in (report.classifier, report.dit):
        if model is not None and model.dataset_version not in (None, version):
            notes.append(
                f"the {model.kind} was trained on dataset {model.dataset_version}, not on the "
                f"evaluated {version}: held-out images may include its training images, so its "
                "figures can be inflated; evaluate on the version it was trained on"
            )
            log.warning(notes[-1])
    return notes


def _few_samples_note(space: str, n: int, d: int) -> str:
    return (
        f"{space} feature space: {n} samples per set but {d} feature dimensions, so the "
        "covariances are rank-deficient and the Fréchet distance is biased upwards; compare "
        "only reports with the same sample count (KID is unbiased and more reliable here)"
    )


def _add_inception_metrics(
    report: Report, real: torch.Tensor, fake: torch.Tensor, opts: _Settings
) -> None:
    keys = ("generator.inception_fid", "generator.inception_kid")
    if len(real) < 2:
        report.not_computed.update(dict.fromkeys(keys, f"needs ≥ 2 matched pairs, got {len(real)}"))
        return
    try:
        path = inception.resolve_weights(opts.inception_weights, opts.inception_download)
    except inception.InceptionUnavailable as exc:
        report.not_computed.update(dict.fromkeys(keys, str(exc)))
        return
    real_feats = inception.inception_features(real, path, device=opts.device)
    fake_feats = inception.inception_features(fake, path, device=opts.device)
    report.metrics["generator.inception_fid"] = metrics.frechet_distance(real_feats, fake_feats)
    mean, std, used = metrics.kernel_inception_distance(
        real_feats, fake_feats, opts.kid_subset, opts.kid_subsets, opts.seed
    )
    report.metrics["generator.inception_kid"] = mean
    report.metrics["generator.inception_kid_std"] = std
    report.settings["inception_weights"] = str(path)
    report.settings["inception_kid_subset_size"] = used
    if len(real) < real_feats.shape[1]:
        report.notes.append(_few_samples_note("Inception", len(real), real_feats.shape[1]))


# --------------------------------------------------------------------------------------------
# Prefect artifacts
# --------------------------------------------------------------------------------------------


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _artifact_key(deployment: str, what: str) -> str:
    # Prefect keys: lowercase letters, digits and dashes only.
    return re.sub(r"[^a-z0-9-]+", "-", f"{deployment}-eval-{what}".lower()).strip("-")


def _significant(value: float) -> float:
    return float(f"{value:.6g}")


def publish_artifacts(report_dir: Path, report: Report) -> None:
    """Publish the report to the current Prefect run: a table of the metrics, a markdown summary
    with the sample grid and confusion matrix inline (`data:` URIs, which the Prefect UI renders),
    and links to the report files."""
    from prefect.artifacts import (
        create_link_artifact,
        create_markdown_artifact,
        create_table_artifact,
    )

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
    for name in ("grid", "confusion_png"):
        if name in report.files:
            relative = report.files[name]
            uri = figures.png_data_uri(report_dir / relative)
            summary = summary.replace(f"]({relative})", f"]({uri})")
    create_markdown_artifact(
        markdown=summary,
        key=_artifact_key(report.deployment, "report"),
        description="Evaluation report with the sample grid and confusion matrix",
    )
    for name, relative in {"report_json": REPORT_JSON, **report.files}.items():
        create_link_artifact(
            link=(report_dir / relative).as_uri(),
            link_text=f"{name}: {report_dir / relative}",
            key=_artifact_key(report.deployment, name.replace("_", "-")),
        )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tasks.evaluate",
        description="Evaluate an exported classifier and/or DiT on the dataset's held-out split; "
        "write report.json, report.md and pictures into --out. The last stdout line is a JSON "
        "summary.",
    )
    p.add_argument(
        "--dataset", required=True, help="DatasetRef JSON, reference.json or version folder"
    )
    p.add_argument("--classifier", help="classifier run dir (model.safetensors + config.json)")
    p.add_argument("--dit", help="DiT run dir (model.safetensors + config.json)")
    p.add_argument(
        "--out", help="report folder (default $TRAIN_CATS_RUNS_DIR/reports/<deployment>/<time>)"
    )
    p.add_argument("--samples-per-class", type=int, default=16, help="DiT samples per class")
    p.add_argument("--sampler", choices=SAMPLERS, help="ODE sampler (default: the export's)")
    p.add_argument("--steps", type=int, help="ODE steps (default: the export's)")
    p.add_argument("--cfg-scale", type=float, help="CFG scale, 1 = none (default: the export's)")
    p.add_argument("--seed", type=int, default=0, help="seed of noise, real draw, KID subsets")
    p.add_argument("--deployment", help="name whose report history gives deltas (default local)")
    p.add_argument("--previous", help="compare with this report.json instead of the history")
    p.add_argument(
        "--inception-weights",
        help=f"FID Inception weights file (default ${inception.WEIGHTS_ENV} or torch's hub cache)",
    )
    p.add_argument(
        "--no-inception-download",
        action="store_true",
        help="never download the Inception weights (Inception FID/KID 'not computed' without them)",
    )
    p.add_argument("--kid-subset-size", type=int, default=1000, help="capped at the sample count")
    p.add_argument("--kid-subsets", type=int, default=100)
    p.add_argument("--regression-abs", type=float, default=0.02, help="score drop flagged")
    p.add_argument("--regression-rel", type=float, default=0.10, help="relative distance rise")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m tasks.evaluate``: bad input exits 2 with one line naming it."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = _evaluate_from_args(args)
    except (ValueError, FileNotFoundError, FileExistsError, DatasetError) as exc:
        parser.error(str(exc))
    for name, value in summary["metrics"].items():
        print(f"{name:45s} {value:.4g}", file=sys.stderr)
    for name, reason in summary["not_computed"].items():
        print(f"{name:45s} not computed: {reason}", file=sys.stderr)
    print(json.dumps(summary))
    return 0


def _evaluate_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return evaluate(
        args.dataset,
        classifier=args.classifier,
        dit=args.dit,
        out=args.out,
        samples_per_class=args.samples_per_class,
        sampler=args.sampler,
        steps=args.steps,
        cfg_scale=args.cfg_scale,
        seed=args.seed,
        deployment=args.deployment,
        previous=args.previous,
        inception_weights=args.inception_weights,
        inception_download=False if args.no_inception_download else None,
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
        regression_abs=args.regression_abs,
        regression_rel=args.regression_rel,
        batch_size=args.batch_size,
        device=args.device,
        overwrite=args.overwrite,
    )


if __name__ == "__main__":
    sys.exit(main())
