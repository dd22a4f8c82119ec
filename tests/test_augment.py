"""The classifier's batched augmentation: torchvision's crop distribution, exact identity at
the trivial parameters, per-image independence, and the same draws at every world size."""

from __future__ import annotations

import math

import pytest
import torch
from torchvision.transforms import v2

from tasks.training.augment import CropFlipJitter
from tasks.training.distributed import Ranks


def _boxes(params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = params[:, 2] - params[:, 0]
    h = params[:, 3] - params[:, 1]
    return w, h


def test_crops_follow_torchvisions_random_resized_crop():
    augment = CropFlipJitter(scale_min=0.35, flip=True, jitter=0.2)
    params = augment.draw(4000, 48, 48, torch.Generator().manual_seed(0))
    w, h = _boxes(params)
    assert (params[:, 0] >= 0).all() and (params[:, 2] <= 48).all()
    assert (params[:, 1] >= 0).all() and (params[:, 3] <= 48).all()
    area = w * h / 48**2
    # Rounding w and h to whole pixels moves the area a little past the scale bounds.
    assert area.min() >= 0.30 and area.max() <= 1.0
    assert ((w / h).log().abs() <= math.log(4 / 3) + 0.1).all()
    torch.manual_seed(0)
    reference = (
        torch.tensor(
            [
                math.prod(
                    v2.RandomResizedCrop.get_params(
                        torch.zeros(3, 48, 48), [0.35, 1.0], [3 / 4, 4 / 3]
                    )[2:]
                )
                for _ in range(4000)
            ],
            dtype=torch.float32,
        )
        / 48**2
    )
    assert abs(area.mean() - reference.mean()) < 0.02  # both about 0.62
    assert abs(params[:, 4].mean() - 0.5) < 0.05  # flips
    factors = params[:, 5:]
    assert factors.min() >= 0.8 and factors.max() <= 1.2 and abs(factors.mean() - 1.0) < 0.02


def test_the_whole_image_unflipped_unjittered_is_returned_exactly():
    images = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    params = torch.tensor([[0, 0, 16, 16, 0, 1, 1, 1]] * 3, dtype=torch.float32)
    out = CropFlipJitter(0.35, flip=True, jitter=0.2).apply(images, params, 16)
    torch.testing.assert_close(out, images.float() / 255, rtol=0, atol=1e-6)
    flipped = params.clone()
    flipped[1, 4] = 1
    out = CropFlipJitter(0.35, flip=True, jitter=0.0).apply(images, flipped, 16)
    torch.testing.assert_close(out[1], images[1].flip(2).float() / 255, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[0], images[0].float() / 255, rtol=0, atol=1e-6)


def test_a_crop_takes_its_own_pixels_and_downscales_by_averaging():
    images = torch.arange(16, dtype=torch.uint8).repeat_interleave(16).view(1, 1, 16, 16)
    images = images.expand(1, 3, 16, 16).contiguous()  # row r holds the value r
    params = torch.tensor([[0, 8, 16, 16, 0, 1, 1, 1]], dtype=torch.float32)  # the bottom half
    out = CropFlipJitter(0.35, flip=False, jitter=0.0).apply(images, params, 4) * 255
    expected = torch.tensor([8.5, 10.5, 12.5, 14.5])  # means of row pairs 8-9, 10-11, ...
    torch.testing.assert_close(out[0, 0, :, 0], expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("world_size", [2, 4])
def test_shards_of_the_global_draw_augment_like_one_process(world_size):
    augment = CropFlipJitter(0.35, flip=True, jitter=0.3)
    images = torch.randint(0, 256, (8, 3, 24, 24), dtype=torch.uint8)
    params = augment.draw(8, 24, 24, torch.Generator().manual_seed(3))
    whole = augment.apply(images, params, 16)
    parts = []
    for rank in range(world_size):
        ranks = Ranks(rank, world_size)
        parts.append(augment.apply(ranks.shard(images), ranks.shard(params), 16))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    assert whole.min() >= 0 and whole.max() <= 1
