"""Metric maths on synthetic features, cross-checked against torchmetrics where it has the metric."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from tasks.evaluation.metrics import (
    classification_metrics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)


def _features(n: int, d: int, seed: int) -> torch.Tensor:
    """n draws from one fixed correlated Gaussian in d dimensions (the seed picks the draws)."""
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(0)) / d**0.5
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed)) @ mixing + 0.3


class _Precomputed(nn.Module):
    """Feeds ready-made features through torchmetrics' image metrics unchanged."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.num_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_frechet_distance_of_a_set_with_itself_is_zero_also_when_rank_deficient():
    for n, d in ((200, 16), (12, 64)):  # second case: fewer samples than dimensions
        x = _features(n, d, seed=1)
        assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_grows_monotonically_with_a_shift_and_equals_its_square():
    x = _features(300, 32, seed=2)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(3))
    shifts = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]
    scores = [frechet_distance(x, x + s * direction) for s in shifts]
    assert all(a < b for a, b in itertools.pairwise(scores))
    # A pure mean shift leaves the covariances equal, so d² is exactly ‖shift‖².
    for s, score in zip(shifts, scores, strict=True):
        assert score == pytest.approx(float((s * direction).square().sum()), rel=1e-6, abs=1e-6)


def test_frechet_distance_grows_monotonically_with_added_noise():
    x = _features(400, 16, seed=4)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    scores = [frechet_distance(x, x + sigma * noise) for sigma in (0.0, 0.3, 1.0, 3.0)]
    assert scores[0] == pytest.approx(0.0, abs=1e-6)
    assert all(a < b for a, b in itertools.pairwise(scores))


@pytest.mark.parametrize("n, d", [(300, 24), (20, 48)])
def test_frechet_distance_matches_torchmetrics(n, d):
    real, fake = _features(n, d, seed=6), _features(n, d, seed=7) * 1.5 + 0.2
    reference = FrechetInceptionDistance(feature=_Precomputed(d), normalize=False)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert frechet_distance(real, fake) == pytest.approx(float(reference.compute()), rel=1e-4)


def test_kid_is_about_zero_for_the_same_distribution_and_grows_with_the_shift():
    x, y = _features(200, 32, seed=8), _features(200, 32, seed=16)
    same_mean, same_std, _ = kernel_inception_distance(x, y, subset_size=100)
    assert abs(same_mean) < 3 * same_std  # unbiased: zero within its spread
    direction = torch.ones(32)
    shifted = [kernel_inception_distance(x, y + s * direction, 100)[0] for s in (0.2, 0.5, 1, 2)]
    assert all(a < b for a, b in zip([same_mean, *shifted], shifted, strict=False))
    assert shifted[0] > same_mean + 3 * same_std


def test_kid_works_with_few_samples_and_caps_the_subset_size():
    a, b = _features(6, 64, seed=9), _features(5, 64, seed=10) + 1.0
    mean, std, used = kernel_inception_distance(a, b, subset_size=1000, n_subsets=20)
    assert used == 5
    assert mean > 0 and std >= 0
    same_mean, _, _ = kernel_inception_distance(a, a, subset_size=1000, n_subsets=20)
    assert mean > abs(same_mean)
    with pytest.raises(ValueError, match="at least 2 samples"):
        kernel_inception_distance(a[:1], b)


def test_kid_is_reproducible_and_matches_torchmetrics_on_the_full_set():
    real, fake = _features(40, 16, seed=11), _features(40, 16, seed=12) + 0.5
    assert kernel_inception_distance(real, fake, 20, 10, seed=3) == kernel_inception_distance(
        real, fake, 20, 10, seed=3
    )
    # With the subset equal to the whole set every draw is the full unbiased MMD², so torchmetrics'
    # unseeded subsets give the same number.
    reference = KernelInceptionDistance(feature=_Precomputed(16), subsets=1, subset_size=40)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    ours, _, _ = kernel_inception_distance(real, fake, subset_size=40, n_subsets=1)
    assert ours == pytest.approx(float(reference.compute()[0]), rel=1e-4)


def test_precision_recall_separate_fidelity_from_diversity():
    real = _features(300, 8, seed=13)
    p, r = precision_recall(real, real.clone())
    assert p == 1.0 and r == 1.0
    # Mode collapse: every fake sample near one real point is precise but covers little.
    collapsed = real[:1] + 0.01 * torch.randn(300, 8, generator=torch.Generator().manual_seed(14))
    p, r = precision_recall(real, collapsed)
    assert p == 1.0 and r < 0.2
    # Far-off samples are neither precise nor do they cover the real set.
    p, r = precision_recall(real, real + 100.0)
    assert p == 0.0 and r == 0.0
    with pytest.raises(ValueError, match="at least 4 samples"):
        precision_recall(real, real[:3])


def test_classification_metrics_on_a_known_confusion():
    targets = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 0, 0, 1, 1, 0, 2, 2])
    m = classification_metrics(preds, targets, num_classes=4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["per_class_accuracy"] == [pytest.approx(0.75), pytest.approx(0.5), 1.0, None]
    assert m["confusion_matrix"] == [[3, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]]
    f1 = [2 * 3 / (2 * 3 + 1 + 1), 2 * 1 / (2 * 1 + 1 + 1), 1.0]  # class 3 is absent: left out
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(preds, targets, num_classes=2)


def test_bad_features_are_rejected_with_the_reason():
    x = _features(10, 4, seed=15)
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(x, x[:, :3])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(x, bad)
