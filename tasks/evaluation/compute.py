"""Fill a report: run every measurement the given exports allow, and save the pictures.

Whatever cannot be computed (no classifier to give the feature space, too few samples, no
Inception weights) is listed under `not_computed` with the reason, never given a value.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from data.dataset import DatasetRef, open_split
from tasks.evaluation import figures, inception, memorisation, metrics
from tasks.evaluation.measure import (
    ClassifierUnderTest,
    classifier_metrics,
    generator_metrics,
    identity,
    matched_real,
    per_class_accuracies,
    split_images,
)
from tasks.evaluation.options import EvalOptions
from tasks.evaluation.report import DatasetIdentity, Report, Sampling
from tasks.exported import load_dit, load_guide, sample, sampler_settings
from tasks.paths import SAMPLES_DIR
from tasks.training.runtime import resolve_precision

log = logging.getLogger(__name__)

GRID_PNG = "samples_grid.png"
CONFUSION_PNG = "confusion_matrix.png"
COPY_SCATTER_PNG = "memorisation_scatter.png"
COPY_PAIRS_PNG = "memorisation_pairs.png"
COPY_PAIRS_SHOWN = 8  # the samples nearest to being copies, each beside its nearest training image


def torch_device(opts: EvalOptions) -> torch.device:
    """The options' device, else CUDA when available, else the CPU."""
    return torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))


GENERATOR_KEYS = (
    "generator.conditional_accuracy",
    "generator.classifier_fd",
    "generator.classifier_kid",
    "generator.precision",
    "generator.recall",
    "generator.inception_fid",
    "generator.inception_kid",
    "generator.copy_fraction.pixel",
    "generator.copy_fraction.features",
)
# Where a judge comes from: the `classifier` deployment's champion (tasks.champions.find_judge).
GET_A_JUDGE = (
    "train the classifier deployment once (`prefect deployment run train-cats/classifier`, or "
    "in-process `train-cats --deployment classifier`): its champion judges later dit runs"
)


def compute_report(
    ref: DatasetRef,
    clf_export: tuple[Path, dict[str, Any]] | None,
    dit_export: tuple[Path, dict[str, Any]] | None,
    stage: Path,
    report: Report,
    opts: EvalOptions,
) -> None:
    """Compute everything into `report`, writing the pictures into `stage`."""
    clf = None
    if clf_export is not None:
        report.classifier = identity(*clf_export)
        clf = ClassifierUnderTest.load(*clf_export, torch_device(opts))
        report.notes += _judge_notes(ref, clf, clf_export[0], dit_export is not None)
        _add_classifier_metrics(report, ref, clf, stage, opts)
    else:
        report.not_computed["classifier.*"] = "no classifier given"
    if dit_export is None:
        report.not_computed.update(dict.fromkeys(GENERATOR_KEYS, "no DiT given"))
        return
    report.dit = identity(*dit_export)
    fake, class_names = _draw_samples(report, dit_export, stage, opts)
    real, partners, matched = matched_real(
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
        reason = f"no classifier given (its features are the space); to get a judge, {GET_A_JUDGE}"
        report.not_computed.update(dict.fromkeys(GENERATOR_KEYS[:5], reason))
    _add_memorisation(report, ref, fake, class_names, clf, stage, opts)
    _add_inception_metrics(report, real, fake[partners], opts)


def dataset_identity(ref: DatasetRef) -> DatasetIdentity:
    split = open_split(ref, next(iter(ref.caches)), "val")
    held_out = np.bincount(split.labels[split.indices], minlength=len(ref.classes))
    return DatasetIdentity(
        version=ref.version,
        root=ref.root,
        label_mode=ref.label_mode,
        classes=list(ref.classes),
        split_counts={name: int(n) for name, n in zip(ref.classes, held_out, strict=True)},
    )


def _judge_notes(
    ref: DatasetRef, clf: ClassifierUnderTest, folder: Path, judges: bool
) -> list[str]:
    """Which classifier judged the DiT, and what its extra classes mean for the figures."""
    notes = []
    if judges:
        notes.append(f"judged by {folder}: its predictions and features give the generator metrics")
    extra = [name for name in clf.classes if name not in ref.classes]
    if extra:
        notes.append(
            f"the classifier has classes the dataset lacks ({', '.join(extra)}): labels map to its "
            "classes by name, and a prediction of one of these counts as wrong in every accuracy"
        )
    return notes


def _add_classifier_metrics(
    report: Report, ref: DatasetRef, clf: ClassifierUnderTest, stage: Path, opts: EvalOptions
) -> None:
    if clf.image_size not in ref.caches:  # a judge trained at another size than the dataset's
        report.not_computed["classifier.*"] = (
            f"dataset {ref.version} has no {clf.image_size} px cache (the classifier's size; it "
            f"has {sorted(ref.caches)}): see classifier.accuracy_at_dit_size"
        )
        return
    images, labels = split_images(ref, clf.image_size)
    result = classifier_metrics(clf, images, labels, opts.batch_size, ref.classes)
    report.metrics["classifier.accuracy"] = result["accuracy"]
    report.metrics["classifier.macro_f1"] = result["macro_f1"]
    for name, acc in zip(ref.classes, result["per_class_accuracy"], strict=True):
        if acc is None:
            report.not_computed[f"classifier.class_accuracy.{name}"] = "no held-out images"
        else:
            report.metrics[f"classifier.class_accuracy.{name}"] = acc
    report.confusion_matrix = result["confusion_matrix"]
    if clf.classes != ref.classes:
        report.confusion_columns = list(clf.classes)
    figures.save_png(
        figures.confusion_image(report.confusion_matrix, ref.classes, columns=clf.classes),
        stage / CONFUSION_PNG,
    )
    report.files["confusion_png"] = CONFUSION_PNG
    report.settings["n_classifier_eval"] = len(labels)


def _draw_samples(
    report: Report, dit_export: tuple[Path, dict[str, Any]], stage: Path, opts: EvalOptions
) -> tuple[torch.Tensor, list[str]]:
    """Sample every class of the DiT (sampler settings default to the export's), save the grid
    and the single images; returns (N, 3, H, W) float in [0, 1] on the CPU and the class names."""
    model = load_dit(dit_export[0], device=torch_device(opts))
    drawn = sampler_settings(
        dit_export[1], method=opts.sampler, steps=opts.steps, cfg_scale=opts.cfg_scale,
        guidance=opts.guidance, guidance_interval=opts.guidance_interval,
        time_shift=opts.time_shift,
    )  # fmt: skip
    guide = load_guide(dit_export[0], torch_device(opts)) if drawn["guidance"] == "auto" else None
    names, per_class = list(model.classes), opts.samples_per_class
    # Resolved once, drawn in and recorded: "auto" means bf16 or fp32 depending on the machine.
    precision = resolve_precision(torch_device(opts), "auto")
    fake = sample(
        model, names, per_class, seed=opts.seed, guide=guide, precision=precision, **drawn
    ).cpu()
    if guide is not None:  # a property of the model, so not part of the like-for-like Sampling
        report.settings["autoguidance_guide_step"] = guide.guide_step
    report.sampling = Sampling(
        **drawn,
        seed=opts.seed,
        samples_per_class=per_class,
        n_generated=len(fake),
        image_size=report.dit.image_size,
        precision=precision,
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
    opts: EvalOptions,
) -> None:
    fake_labels = torch.tensor([clf.classes.index(n) for n in class_names])
    fake_labels = fake_labels.repeat_interleave(opts.samples_per_class)
    values, skipped, settings = generator_metrics(
        clf, fake, fake_labels, real, partners,
        opts.kid_subset_size, opts.kid_subsets, opts.seed, opts.batch_size,
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
    report: Report, ref: DatasetRef, clf: ClassifierUnderTest, opts: EvalOptions
) -> None:
    """The classifier's accuracy on real held-out images at the DiT's resolution, resized to its
    own exactly as the samples are: the ceiling of the conditional accuracy, and the check that
    a classifier trained at another size still recognises images at this one. Only when the
    sizes differ (otherwise it is `classifier.accuracy`) and the dataset has a cache there."""
    size = report.dit.image_size
    if size == clf.image_size or size not in ref.caches:
        return
    images, labels = split_images(ref, size)
    result = classifier_metrics(clf, images, labels, opts.batch_size, ref.classes)
    report.metrics["classifier.accuracy_at_dit_size"] = result["accuracy"]
    key = "classifier.class_accuracy_at_dit_size"
    report.metrics |= per_class_accuracies(key, ref.classes, result)


def _add_memorisation(
    report: Report,
    ref: DatasetRef,
    fake: torch.Tensor,
    class_names: list[str],
    clf: ClassifierUnderTest | None,
    stage: Path,
    opts: EvalOptions,
) -> None:
    """Copy detection (`memorisation.py`): the nearest/second-nearest ratio of every sample
    against the DiT's training images, in pixels and in the judge's features; the scatter and
    the samples nearest to being copies beside their nearest training image."""
    keys = ("generator.copy_fraction.pixel", "generator.copy_fraction.features")
    train = memorisation.TrainingImages.open(ref, report.dit.image_size, class_names)
    if len(train) < 2:
        report.not_computed.update(
            dict.fromkeys(keys, f"needs ≥ 2 training images, got {len(train)}")
        )
        return
    mirror = bool(report.dit.train_config.get("flip", True))  # then it also saw them mirrored
    samples = fake.to(torch_device(opts))
    spaces = {"pixel": memorisation.pixel_neighbours(samples, train, mirror)}
    if clf is not None:
        spaces["features"] = memorisation.feature_neighbours(
            samples, train, lambda x: clf.predict(x, opts.batch_size)[1]
        )
    else:
        report.not_computed[keys[1]] = (
            f"no classifier given (its features are the space); {GET_A_JUDGE}"
        )
    threshold = memorisation.RATIO_THRESHOLD
    for space, found in spaces.items():
        report.metrics[f"generator.copy_fraction.{space}"] = found.copy_fraction(threshold)
        report.settings[f"copy_ratio_median.{space}"] = float(found.ratio.median())
        report.settings[f"copy_ratio_min.{space}"] = float(found.ratio.min())
    report.settings |= {"copy_ratio_threshold": threshold, "copy_training_images": len(train),
                        "copy_mirrored": int(mirror)}  # fmt: skip
    panels = [(space, found.d1, found.d2) for space, found in spaces.items()]
    figures.save_png(figures.ratio_scatter(panels, threshold), stage / COPY_SCATTER_PNG)
    pairs = _copy_pairs(fake, class_names, opts.samples_per_class, train, spaces["pixel"])
    figures.save_png(pairs, stage / COPY_PAIRS_PNG)
    report.files.update(memorisation_scatter=COPY_SCATTER_PNG, memorisation_pairs=COPY_PAIRS_PNG)


def _copy_pairs(
    fake: torch.Tensor,
    class_names: list[str],
    per_class: int,
    train: memorisation.TrainingImages,
    pixel: memorisation.Neighbours,
) -> Image.Image:
    """The samples with the lowest pixel ratio, each beside its nearest training image (as it
    matched: mirrored if that view was nearer), labelled "<class> <sample number>: <ratio>"."""
    pairs, labels = [], []
    for i in pixel.ratio.argsort()[:COPY_PAIRS_SHOWN].tolist():
        nearest = train.image(int(pixel.index[i]))
        pairs += [fake[i].clamp(0, 1), nearest.flip(-1) if pixel.view[i] else nearest]
        mirrored = " (mirrored)" if pixel.view[i] else ""
        name, number = class_names[i // per_class], i % per_class
        labels.append(f"{name} {number:04d}: {pixel.ratio[i]:.2f}{mirrored}")
    return figures.labelled_grid(torch.stack(pairs), labels, 2)


def other_version_notes(report: Report, version: str) -> list[str]:
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
    report: Report, real: torch.Tensor, fake: torch.Tensor, opts: EvalOptions
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
    real_feats = inception.inception_features(real, path, device=torch_device(opts))
    fake_feats = inception.inception_features(fake, path, device=torch_device(opts))
    report.metrics["generator.inception_fid"] = metrics.frechet_distance(real_feats, fake_feats)
    mean, std, used = metrics.kernel_inception_distance(
        real_feats, fake_feats, opts.kid_subset_size, opts.kid_subsets, opts.seed
    )
    report.metrics["generator.inception_kid"] = mean
    report.metrics["generator.inception_kid_std"] = std
    report.settings["inception_weights"] = str(path)
    report.settings["inception_kid_subset_size"] = used
    if len(real) < real_feats.shape[1]:
        report.notes.append(_few_samples_note("Inception", len(real), real_feats.shape[1]))


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
