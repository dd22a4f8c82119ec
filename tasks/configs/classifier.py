"""The classifier training config (`ClassifierConfig`) and its named presets (`PRESETS`).

Kept apart from the training loop (`tasks.train_classifier`) so that the command lines, the flow's
parameter checks and the deployments can read and validate a config without building a model,
and without importing torch (seconds): the backbone names are plain data here.
"""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from tasks.training.config import TrainConfig

# `models.classifier.BACKBONES` as plain data: name -> whether torchvision publishes ImageNet
# weights for it; tests/test_first_contact.py checks that the two tables agree.
BACKBONES: dict[str, bool] = {
    "resnet8": False,
    "resnet10": False,
    "resnet18": True,
    "resnet34": True,
    "resnet50": True,
    "mobilenet_v3_small": True,
}


class ClassifierConfig(TrainConfig):
    """Everything that defines a classifier training run (see `TrainConfig` for shared fields)."""

    backbone: str = Field("resnet18", description=f"one of {sorted(BACKBONES)}")
    pretrained: bool = Field(False, description="start from torchvision's ImageNet weights")
    small_input_stem: bool = Field(True, description="CIFAR-style stem for 32-64 px inputs")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    train_image_size: int | None = Field(
        None,
        ge=8,
        description="RandomResizedCrop output in px (default: image_size); below image_size it "
        "trains faster while validation and the export stay at image_size (FixRes)",
    )
    test_size_finetune_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="final share of the planned steps trained on image_size crops rather than "
        "train_image_size ones (FixRes fine-tuning at the test resolution)",
    )
    crop_scale_min: float = Field(0.35, gt=0, le=1, description="RandomResizedCrop min area")
    color_jitter: float = Field(0.2, ge=0, description="brightness/contrast/saturation strength")
    flip: bool = Field(True, description="random horizontal flips")
    low_res_fraction: float = Field(
        0.0,
        ge=0,
        le=1,
        description="share of training images shrunk to low_res_size px and enlarged back, so "
        "that the classifier judges low-resolution images (the DiT's samples) fairly",
    )
    low_res_size: int | None = Field(
        None,
        ge=4,
        description="the low resolution in px (the DiT's image_size); validation also reports "
        "the accuracy there when the dataset has a cache at that size",
    )
    test_time_flip: bool = Field(
        False, description="evaluate (and judge) on the mean of each image and its mirror"
    )
    eval_every_epochs: int = Field(1, ge=1, description="epochs between validation passes")
    eval_batch_size: int = Field(256, ge=1)

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        if value not in BACKBONES:
            raise ValueError(f"unknown backbone {value!r}; choose one of {sorted(BACKBONES)}")
        return value

    @property
    def train_size(self) -> int:
        """The training crops' side in px: `train_image_size`, else `image_size`."""
        return self.train_image_size or self.image_size

    @model_validator(mode="after")
    def _train_crops_fit(self) -> ClassifierConfig:
        if self.train_size > self.image_size:
            raise ValueError(
                f"train_image_size={self.train_image_size} exceeds image_size={self.image_size}: "
                "the crops are cut from the image_size cache, so upsampling them adds no detail; "
                "lower train_image_size, or raise image_size (a cache at that size)"
            )
        if self.low_res_fraction > 0 and self.low_res_size is None:
            raise ValueError(
                f"low_res_fraction={self.low_res_fraction} needs low_res_size: set it to the "
                "resolution to judge (the DiT's image_size, e.g. 32)"
            )
        if self.low_res_size is not None and self.low_res_size >= self.image_size:
            raise ValueError(
                f"low_res_size={self.low_res_size} must be below image_size={self.image_size}; "
                "lower it to the resolution to judge (the DiT's image_size)"
            )
        if self.test_size_finetune_fraction > 0 and self.train_size == self.image_size:
            raise ValueError(
                f"test_size_finetune_fraction={self.test_size_finetune_fraction} fine-tunes at "
                f"image_size={self.image_size}, which the run already trains at; set "
                "train_image_size below image_size, or the fraction to 0"
            )
        return self

    @model_validator(mode="after")
    def _weights_exist(self) -> ClassifierConfig:
        if self.pretrained and not BACKBONES[self.backbone]:
            having = ", ".join(name for name, weights in BACKBONES.items() if weights)
            raise ValueError(
                f"backbone {self.backbone!r} has no published ImageNet weights: train it from "
                f"scratch (pretrained=False) or pick a backbone that has them: {having}"
            )
        return self


PRESETS: dict[str, ClassifierConfig] = {
    # Tests and CI: MobileNetV3-Small at 32 px, 60 steps of 16; why: docs/recipes.md.
    "cpu-tiny": ClassifierConfig(
        backbone="mobilenet_v3_small",
        small_input_stem=False,
        image_size=32,
        steps=60,
        batch_size=16,
        lr=2e-3,
        warmup_steps=5,
        weight_decay=0.05,
        log_every=10,
        ckpt_every_steps=30,
        progress_bar=False,
    ),
    # The 2-core demo: ResNet-8 at 64 px, trained on 48 px crops then 64 px ones (FixRes), a
    # quarter of the images shrunk to the DiT's 32 px (a fair judge of its samples), 10 minutes;
    # why: docs/recipes.md.
    "cpu-small": ClassifierConfig(
        backbone="resnet8",
        small_input_stem=False,
        image_size=64,
        train_image_size=48,
        test_size_finetune_fraction=0.2,
        low_res_fraction=0.25,
        low_res_size=32,
        steps=100_000,
        time_budget_minutes=10.0,
        batch_size=64,
        lr=2e-3,
        warmup_steps=30,
        weight_decay=0.05,
        crop_scale_min=0.75,
        color_jitter=0.0,
        test_time_flip=True,
        eval_every_epochs=3,
        log_every=10,
        ckpt_every_steps=200,
        ckpt_every_minutes=2.0,
    ),
    # The Modal default: ImageNet-pretrained ResNet-50 at 224 px, fine-tuned on 256k images (BiT's
    # small-data schedule); why, with the arithmetic (benchmarks/gpu_presets.py): docs/gpu_presets.md.
    "gpu": ClassifierConfig(
        backbone="resnet50",
        pretrained=True,
        small_input_stem=False,
        image_size=224,
        steps=1_000,
        time_budget_minutes=15.0,
        batch_size=256,
        lr=5e-4,
        warmup_steps=50,
        weight_decay=0.05,
        test_time_flip=True,
        eval_every_epochs=10,
        log_every=20,
        ckpt_every_steps=250,
        ckpt_every_minutes=5.0,
        compile=True,
    ),
}
