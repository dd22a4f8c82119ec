"""Issue 21 §1: the classifier's low-resolution augmentation, and its accuracy at the DiT's size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from tasks.configs.classifier import PRESETS, ClassifierConfig
from tasks.configs.dit import PRESETS as DIT_PRESETS
from tasks.train_classifier import train_classifier
from tasks.training.augment import LowResolution

# The cpu-small preset without its low-resolution share, which each test sets itself.
SMALL = PRESETS["cpu-small"].model_dump() | {"low_res_fraction": 0.0, "low_res_size": None}


def test_the_cpu_small_judge_trains_at_the_size_of_the_cpu_small_dit():
    """The shipped classifier preset is the §1 judge of the shipped DiT preset's samples: if
    either preset's size moves, the judge's low-resolution share must move with it."""
    judge = PRESETS["cpu-small"]
    assert judge.low_res_fraction > 0
    assert judge.low_res_size == DIT_PRESETS["cpu-small"].image_size


def _images(n: int = 8, size: int = 64) -> torch.Tensor:
    """Sharp test images: random pixels, whose detail a 32 px round trip must destroy."""
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def test_chosen_images_lose_their_detail_and_the_others_are_untouched():
    x = _images()
    low = LowResolution(fraction=0.5, size=32, image_size=64)
    chosen = torch.tensor([True, False] * 4)
    out = low.apply(x, chosen)
    torch.testing.assert_close(out[~chosen], x[~chosen], rtol=0, atol=0)
    # The chosen rows are exactly what the judge sees of a 32 px image enlarged to 64 px.
    small = F.interpolate(x[chosen], size=32, mode="bilinear", antialias=True)
    judged = F.interpolate(small, size=64, mode="bilinear", antialias=True)
    torch.testing.assert_close(out[chosen], judged.clamp(0, 1), rtol=0, atol=1e-6)
    # Random pixels lose most of their variance between neighbours.
    detail = (out[chosen].diff(dim=-1).abs().mean(), x[chosen].diff(dim=-1).abs().mean())
    assert detail[0] < 0.5 * detail[1]


def test_the_low_size_scales_with_smaller_training_crops():
    """With 48 px crops of a 64 px model, 32 px at 64 becomes 24 px at 48: the same blur."""
    x = _images(size=48)
    out = LowResolution(1.0, 32, 64).apply(x, torch.ones(8, dtype=torch.bool))
    small = F.interpolate(x, size=24, mode="bilinear", antialias=True)
    expected = F.interpolate(small, size=48, mode="bilinear", antialias=True).clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_the_share_drawn_follows_the_fraction_and_the_generator():
    low = LowResolution(0.25, 32, 64)
    drawn = low.draw(40_000, torch.Generator().manual_seed(3))
    assert drawn.float().mean().item() == pytest.approx(0.25, abs=0.01)
    again = low.draw(40_000, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(low_res_fraction=0.5), "needs low_res_size"),
        (dict(low_res_fraction=0.5, low_res_size=64), "must be below image_size"),
        (dict(low_res_fraction=1.5, low_res_size=32), "low_res_fraction"),
    ],
)
def test_bad_low_resolution_settings_name_the_fix(overrides, message):
    with pytest.raises(ValidationError, match=message):
        ClassifierConfig(**{**SMALL, **overrides})


def test_a_run_reports_its_accuracy_per_class_at_the_low_resolution(
    oxford_mini_species_ref, tmp_path
):
    """A real short run (32 and 64 px caches): validation at 64 px and on the 32 px held-out
    images enlarged as the judge enlarges them, per class; with the same seed, the augmentation
    changes what the model learns."""
    base = {**SMALL, "time_budget_minutes": None, "steps": 6, "batch_size": 16}
    base |= {"eval_every_epochs": 1, "ckpt_every_steps": 100, "num_threads": 1}
    plain = train_classifier({**base, "low_res_size": 32}, oxford_mini_species_ref, tmp_path / "a")
    mixed = train_classifier(
        {**base, "low_res_size": 32, "low_res_fraction": 1.0},
        oxford_mini_species_ref,
        tmp_path / "b",
    )
    for result in (plain, mixed):
        metrics = result["metrics"]
        for key in ("val_accuracy_at_32px", "val_accuracy.cat_at_32px", "val_accuracy.other_at_32px"):
            assert 0.0 <= metrics[key] <= 1.0, key
        # 120 cats + 250 others held out at 10 %: the micro accuracy is the class-weighted mean.
        cats, others = 12, 25
        weighted = (
            cats * metrics["val_accuracy.cat_at_32px"]
            + others * metrics["val_accuracy.other_at_32px"]
        ) / (cats + others)
        assert metrics["val_accuracy_at_32px"] == pytest.approx(weighted, abs=1e-4)
    assert plain["metrics"]["final_loss"] != mixed["metrics"]["final_loss"]
