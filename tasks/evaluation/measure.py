"""What an evaluation measures: the classifier under test, and the metric functions.

Classifier: top-1 and per-class accuracy, macro-F1 and the confusion matrix on held-out images.
Generator: in the trained classifier's penultimate feature space, at equal, class-matched sample
counts, the Fréchet distance, KID, k-NN precision and recall (`tasks/evaluation/metrics.py` gives
each formula and its paper), and the classifier's accuracy on the samples for their conditioning
class ("conditional accuracy").

The classifier may be a judge with more classes than the dataset (the 12 breeds plus `other`
judging a DiT of the 12 breeds): labels map to its classes by name, and a prediction of a class
the dataset lacks counts as wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from data.dataset import DatasetRef, open_split, sha256_file
from data.loader import iter_batches
from models.classifier import Classifier
from tasks.evaluation import metrics
from tasks.evaluation.report import ModelIdentity
from tasks.exported import load_classifier
from tasks.training.export import CONFIG, WEIGHTS


def identity(folder: Path, config: dict[str, Any]) -> ModelIdentity:
    return ModelIdentity(
        kind=config["kind"],
        path=str(folder),
        weights_sha256=sha256_file(folder / WEIGHTS),
        config_sha256=sha256_file(folder / CONFIG),
        image_size=int(config["image_size"]),
        classes=list(config["classes"]),
        dataset_version=config.get("dataset_version"),
        train_config=dict(config.get("train_config") or {}),
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


def split_images(ref: DatasetRef, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All held-out images at `image_size`: (N, 3, H, W) float in [0, 1] and (N,) int64 labels."""
    split = open_split(ref, image_size, "val")
    images, labels = zip(*iter_batches(split, 256), strict=True)
    return torch.cat(images).float() / 255.0, torch.cat(labels)


def classifier_metrics(
    clf: ClassifierUnderTest,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 64,
    classes: list[str] | None = None,
) -> dict[str, Any]:
    """Top-1/per-class accuracy, macro-F1 and confusion matrix of `clf` on labelled images.

    Args:
        images: (N, 3, H, W) float in [0, 1]; labels: (N,) int64 ids into `classes`.
        classes: the names of the label ids (a dataset's classes), each one of `clf.classes`,
            which may have more (a judge with an extra `other`); default `clf.classes`.

    Returns:
        `tasks.evaluation.metrics.classification_metrics`'s dict over `classes`
        (`judged_metrics`): a prediction of a class outside `classes` counts as wrong.
    """
    preds, _ = clf.predict(images, batch_size)
    return judged_metrics(preds, labels, clf.classes if classes is None else classes, clf.classes)


def judged_metrics(
    preds: torch.Tensor, labels: torch.Tensor, classes: list[str], judge_classes: list[str]
) -> dict[str, Any]:
    """`classification_metrics` of a judge whose classes cover the labels' by name.

    Args:
        preds: (N,) int64 ids into `judge_classes`; labels: (N,) int64 ids into `classes`.

    Returns:
        accuracy (a prediction outside `classes` is wrong), per_class_accuracy (one entry per
        name in `classes`), macro_f1 (averaged over `classes`, leaving out those absent from
        both predictions and labels, torchmetrics' rule) and confusion_matrix (rows: `classes`,
        true; columns: `judge_classes`, predicted).
    """
    if list(classes) == list(judge_classes):
        return metrics.classification_metrics(preds, labels, len(classes))
    rows = torch.tensor([judge_classes.index(name) for name in classes])
    result = metrics.classification_metrics(preds, rows[labels], len(judge_classes))
    confusion = torch.tensor(result["confusion_matrix"])[rows]  # (len(classes), len(judge))
    f1 = []
    for i, j in enumerate(rows.tolist()):
        tp = int(confusion[i, j])
        fp, fn = int(confusion[:, j].sum()) - tp, int(confusion[i].sum()) - tp
        if tp + fp + fn:
            f1.append(2 * tp / (2 * tp + fp + fn))
    return {
        "accuracy": result["accuracy"],
        "per_class_accuracy": [result["per_class_accuracy"][j] for j in rows.tolist()],
        "macro_f1": sum(f1) / len(f1) if f1 else 0.0,
        "confusion_matrix": confusion.tolist(),
    }


def per_class_accuracies(
    prefix: str, classes: list[str], result: dict[str, Any]
) -> dict[str, float]:
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
    out |= per_class_accuracies("generator.conditional_accuracy", clf.classes, conditional)
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


def matched_real(
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
