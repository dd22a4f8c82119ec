"""Training at one resolution and testing at another (FixRes), for the classifier.

Touvron et al. 2019, "Fixing the train-test resolution discrepancy": a model trained on crops
smaller than its test images sees objects at another apparent size, and its BatchNorm statistics no
longer fit (§3.2). Two cheap fixes live here: re-estimating the statistics at the test resolution
(`recalibrate_batchnorm`) and finishing the run on crops of the test size (`CropSizeSchedule`, §4.2).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import numpy as np
import torch

from data.dataset import PackedSplit
from data.loader import iter_batches
from models.classifier import IMAGENET_MEAN, IMAGENET_STD, Classifier
from tasks.training.runtime import Precision, autocast

# Training images whose BatchNorm statistics stand for the whole split at the test resolution.
# On a 48 px-trained ResNet-8 (docs/recipes.md), 2,048 scored 0.876 and all 14,399 0.874, in 3.7 s
# rather than 23 s of forward passes on the 2-core machine.
BN_RECALIBRATION_IMAGES = 2048



def normalise(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """(B, 3, H, W) uint8 (host or device) -> `standardise`d float32 on `device`."""
    if device.type == "cuda" and images.device.type == "cpu":
        images = images.pin_memory()
    return standardise(images.to(device, non_blocking=True).float().div_(255.0))


def standardise(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1] -> normalised with the ImageNet mean and std, in
    channels-last memory order (what cuDNN's convolutions run fastest in, with bf16 above all)."""
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)



def recalibrate_batchnorm(
    model: Classifier,
    split: PackedSplit,
    batch_size: int,
    device: torch.device,
    precision: Precision = "auto",
) -> Classifier:
    """A copy of `model`, in eval mode, whose BatchNorm statistics are re-estimated on `split`.

    For a model trained on crops smaller than the images it is tested on: the test resolution
    changes the scale of every activation, and the running statistics learnt on the training
    crops no longer normalise them (Touvron et al. 2019, "Fixing the train-test resolution
    discrepancy", §3.2). FixRes adapts by fine-tuning at the test resolution (§4.2); this keeps
    the cheap part of that fix, forward passes only: `torch.optim.swa_utils.update_bn` over
    `BN_RECALIBRATION_IMAGES` un-augmented images evenly spaced through `split` (a training split,
    at the test resolution). `model` is untouched, so training goes on from its own statistics
    and a resumed run stays bit-identical.
    """
    adapted = copy.deepcopy(model)
    n = len(split.indices)
    # Spread over the whole split, whose rows may be grouped by class.
    picks = np.linspace(0, n - 1, num=min(n, BN_RECALIBRATION_IMAGES)).round().astype(np.int64)
    subset = dataclasses.replace(split, indices=split.indices[picks])
    batches = (normalise(images, device) for images, _ in iter_batches(subset, batch_size))
    with torch.no_grad(), autocast(device, precision):
        torch.optim.swa_utils.update_bn(batches, adapted)
    return adapted.eval()



class CropSizeSchedule:
    """The side in px of the training crops at each step: `config.train_size` until the final
    `test_size_finetune_fraction` of the planned steps, then `config.image_size` (Touvron et al.
    2019, "Fixing the train-test resolution discrepancy", §4.2: fine-tune at the test resolution).

    Under a time budget the plan moves as throughput is measured, and the larger crops slow each
    step, which shortens it; so the switch, once made, holds for the rest of the run, and the
    checkpoints carry it (`state_dict`) so a resumed run trains on the same crops.
    """

    def __init__(self, config: Any) -> None:
        """`config`: a ClassifierConfig (train_size, image_size, test_size_finetune_fraction)."""
        self.small, self.large = config.train_size, config.image_size
        self.fraction = config.test_size_finetune_fraction
        self.switch_step: int | None = None

    def size(self, step: int, total: int) -> int:
        """The crop side for update number `step` (0-based) of `total` planned."""
        if self.switch_step is None and self.fraction > 0 and step >= (1 - self.fraction) * total:
            self.switch_step = step
        return self.small if self.switch_step is None else self.large

    def state_dict(self) -> dict[str, Any]:
        return {"switch_step": self.switch_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.switch_step = state["switch_step"]
