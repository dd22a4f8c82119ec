"""Evaluation metrics on feature vectors and class predictions (pure maths, no I/O).

Generator metrics here work on *features* that the caller has already extracted (the trained
classifier's penultimate layer, see `tasks/evaluate.py`), so that the Fréchet distance, KID and
precision/recall all see one and the same set of vectors. The Fréchet distance and KID are our own
float64 implementations rather than torchmetrics' `FrechetInceptionDistance`/`KernelInceptionDistance`
fed with pre-computed features, for three reasons: seeded (reproducible) KID subsets, a symmetric
matrix square root that stays exact when covariances are rank-deficient (fewer samples than feature
dimensions, the common case for small evaluations), and no need to wrap features as fake "images".
`tests/test_metrics.py` checks both against torchmetrics on the same features. Classification
metrics use torchmetrics directly.
"""

from __future__ import annotations

import torch
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
)

# Kynkäänniemi et al. (2019), §3 and their experiments, use k = 3 nearest neighbours.
PR_NEIGHBOURS = 3


def _as_feature_matrix(x: torch.Tensor, name: str) -> torch.Tensor:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (N, D) feature matrix, got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinite values; check the feature extractor")
    return x.detach().to("cpu", torch.float64)


def _check_pair(
    a: torch.Tensor, b: torch.Tensor, min_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = _as_feature_matrix(a, "features_a"), _as_feature_matrix(b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")
    if min(a.shape[0], b.shape[0]) < min_rows:
        raise ValueError(
            f"need at least {min_rows} samples per set, got {a.shape[0]} and {b.shape[0]}; "
            "generate more samples per class"
        )
    return a, b


def _sqrtm_psd(m: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a positive semi-definite matrix (eigenvalues clipped at 0)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets.

    d² = ‖μ_a − μ_b‖² + Tr(Σ_a + Σ_b − 2 (Σ_a^½ Σ_b Σ_a^½)^½), the quantity behind FID
    (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
    Equilibrium", §"Fréchet Inception Distance"; Dowson & Landau 1982 for the closed form).
    The trace term uses the symmetric form Σ_a^½ Σ_b Σ_a^½, whose eigenvalues equal those of
    Σ_a Σ_b but are real and non-negative, so rank-deficient covariances (N < D) stay exact.

    Args:
        features_a: (N_a, D) float tensor, any float dtype; computed in float64.
        features_b: (N_b, D) float tensor.

    Returns:
        The squared Fréchet distance, a float ≥ 0 in squared feature units.

    Raises:
        ValueError: on non-2-D input, NaN/inf, mismatched D, or fewer than 2 rows in a set.
    """
    a, b = _check_pair(features_a, features_b, min_rows=2)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    d2 = (mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross
    return float(d2.clamp_min(0))


def kid_subset_size(requested: int, n_a: int, n_b: int) -> int:
    """The KID subset size actually used: the request, capped at the smaller sample count."""
    return max(0, min(requested, n_a, n_b))


def _polynomial_mmd2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased MMD² with the cubic kernel k(u, v) = (uᵀv / D + 1)³ (Bińkowski et al. 2018)."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diag = (k_xx.sum() - k_xx.trace() + k_yy.sum() - k_yy.trace()) / (m * (m - 1))
    return off_diag - 2 * k_xy.mean()


def kernel_inception_distance(
    features_a: torch.Tensor,
    features_b: torch.Tensor,
    subset_size: int = 1000,
    n_subsets: int = 100,
    seed: int = 0,
) -> tuple[float, float, int]:
    """Kernel Inception Distance (KID) between two feature sets, in any feature space.

    The mean and standard deviation, over `n_subsets` random subsets of both sets, of the unbiased
    squared MMD with the cubic polynomial kernel (Bińkowski et al. 2018, "Demystifying MMD GANs",
    §4). Unlike FID it has an unbiased estimator, so it is meaningful with few samples; the subset
    size is capped at the smaller set size so that it never exceeds the sample count.

    Args:
        features_a: (N_a, D) float tensor.
        features_b: (N_b, D) float tensor.
        subset_size: requested samples per subset; the value used is min(subset_size, N_a, N_b).
        n_subsets: number of random subsets (≥ 1).
        seed: seed of the subset draws (results are reproducible).

    Returns:
        (mean, std, used_subset_size). The mean can be slightly negative for identical distributions
        (the estimator is unbiased); std is 0 when a single subset is drawn.

    Raises:
        ValueError: on bad input, n_subsets < 1, or fewer than 2 samples in either set.
    """
    a, b = _check_pair(features_a, features_b, min_rows=2)
    if n_subsets < 1 or subset_size < 2:
        raise ValueError(f"need n_subsets ≥ 1 and subset_size ≥ 2, got {n_subsets}, {subset_size}")
    m = kid_subset_size(subset_size, a.shape[0], b.shape[0])
    gen = torch.Generator().manual_seed(seed)
    values = torch.stack(
        [
            _polynomial_mmd2(
                a[torch.randperm(a.shape[0], generator=gen)[:m]],
                b[torch.randperm(b.shape[0], generator=gen)[:m]],
            )
            for _ in range(n_subsets)
        ]
    )
    std = values.std() if n_subsets > 1 else torch.zeros(())
    return float(values.mean()), float(std), m


def _kth_neighbour_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row of x: (N,) float64."""
    d = torch.cdist(x, x)
    # Column 0 of the sorted distances is the point itself (distance 0).
    return d.sort(dim=1).values[:, k]


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of `points` inside at least one ball (centres[i], radii[i])."""
    inside = torch.cdist(points, centres) <= radii.unsqueeze(0)
    return float(inside.any(dim=1).double().mean())


def precision_recall(
    real: torch.Tensor, fake: torch.Tensor, k: int = PR_NEIGHBOURS
) -> tuple[float, float]:
    """Improved precision and recall of generated samples (Kynkäänniemi et al. 2019, §2).

    Each set's manifold is the union of balls around its points whose radius is the distance to the
    k-th nearest neighbour within the same set. Precision is the fraction of fake samples inside the
    real manifold (fidelity); recall is the fraction of real samples inside the fake manifold
    (diversity).

    Args:
        real: (N_r, D) float tensor of real features.
        fake: (N_f, D) float tensor of generated features.
        k: neighbourhood size (the paper uses 3).

    Returns:
        (precision, recall), each in [0, 1].

    Raises:
        ValueError: on bad input, or when a set has no more than k samples.
    """
    real, fake = _check_pair(real, fake, min_rows=k + 1)
    precision = _coverage(fake, real, _kth_neighbour_radii(real, k))
    recall = _coverage(real, fake, _kth_neighbour_radii(fake, k))
    return precision, recall


def classification_metrics(
    preds: torch.Tensor, targets: torch.Tensor, num_classes: int
) -> dict[str, float | list[float | None] | list[list[int]]]:
    """Top-1 accuracy, per-class accuracy, macro-F1 and the confusion matrix (torchmetrics).

    Args:
        preds: (N,) int64 predicted class ids in [0, num_classes).
        targets: (N,) int64 true class ids in [0, num_classes).
        num_classes: number of classes C.

    Returns:
        {"accuracy": float in [0, 1], "per_class_accuracy": C entries (recall of each class; None
        for a class with no samples), "macro_f1": float in [0, 1] (classes absent from both preds
        and targets are left out of the average, torchmetrics' rule), "confusion_matrix": C×C ints,
        rows = true class, columns = predicted class}.

    Raises:
        ValueError: on empty or mismatched inputs, or ids outside [0, num_classes).
    """
    if preds.shape != targets.shape or preds.ndim != 1 or preds.numel() == 0:
        raise ValueError(
            f"preds and targets must be equal-length non-empty 1-D tensors, got "
            f"{tuple(preds.shape)} and {tuple(targets.shape)}"
        )
    for name, t in (("preds", preds), ("targets", targets)):
        if t.min() < 0 or t.max() >= num_classes:
            raise ValueError(f"{name} holds class ids outside [0, {num_classes})")
    preds, targets = preds.long().cpu(), targets.long().cpu()
    accuracy = MulticlassAccuracy(num_classes, average="micro")(preds, targets)
    macro_f1 = MulticlassF1Score(num_classes, average="macro")(preds, targets)
    confusion = MulticlassConfusionMatrix(num_classes)(preds, targets)
    support = confusion.sum(dim=1)
    per_class = [
        float(confusion[c, c] / support[c]) if support[c] > 0 else None for c in range(num_classes)
    ]
    return {
        "accuracy": float(accuracy),
        "per_class_accuracy": per_class,
        "macro_f1": float(macro_f1),
        "confusion_matrix": confusion.tolist(),
    }
