"""Image classifiers on torchvision backbones, with a new head for N classes and penultimate features.

``build_classifier`` returns a ``Classifier``: ``backbone`` (a torchvision network whose last linear
layer is replaced by ``nn.Identity``) followed by ``head`` (``nn.Linear(feature_dim, N)``).
``forward_features`` gives the penultimate features used for Fréchet distance / KID.

Backbones: ResNet-8/10/18/34/50 (He et al. 2016, "Deep Residual Learning for Image Recognition";
ResNet-10 is ResNet-18's layout with one basic block per stage, built from torchvision's ``ResNet``
class, and ResNet-8 is ResNet-10 without its last stage) and MobileNetV3-Small (Howard et al. 2019,
"Searching for MobileNetV3"). ResNet-8 and ResNet-10 have no published ImageNet weights, so they
train from scratch only.

``models/`` does no I/O: ImageNet weights are fetched by the caller
(``tasks/training/pretrained.py``) and handed to ``build_classifier`` as a state dict.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision.models as tvm
from torch import nn

# Normalisation the ImageNet weights were trained with (torchvision's transforms for them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    """A torchvision architecture: its builder, ImageNet weights (None: none published) and
    penultimate width."""

    build: Callable[..., nn.Module]
    weights: tvm.WeightsEnum | None
    feature_dim: int


def _resnet10(weights: None = None) -> tvm.ResNet:
    """ResNet-18 with one basic block per stage instead of two: 4.9M parameters, about twice the
    training throughput of ResNet-18 on a 2-core CPU at 64 px (same signature as torchvision's
    builders, but there are no weights to pass)."""
    return tvm.ResNet(tvm.resnet.BasicBlock, [1, 1, 1, 1])


def _resnet8(weights: None = None) -> tvm.ResNet:
    """ResNet-10 without its last stage: three stages of one basic block, 64/128/256 wide, 1.2M
    parameters, 256-d features. The dropped stage holds 3.7M of ResNet-10's 4.9M parameters and,
    at 64 px, runs at 2x2 spatial, where oneDNN's weight gradient for its 512-channel 3x3 convs is
    slow on AVX2 CPUs: without it a 2-core step takes half the time."""
    net = _resnet10()
    net.layer4 = nn.Identity()
    return net


BACKBONES: dict[str, Backbone] = {
    "resnet8": Backbone(_resnet8, None, 256),
    "resnet10": Backbone(_resnet10, None, 512),
    "resnet18": Backbone(tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, 512),
    "resnet34": Backbone(tvm.resnet34, tvm.ResNet34_Weights.IMAGENET1K_V1, 512),
    "resnet50": Backbone(tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, 2048),
    "mobilenet_v3_small": Backbone(
        tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1, 1024
    ),
}


class Classifier(nn.Module):
    """``backbone`` -> (B, feature_dim) penultimate features -> ``head`` -> (B, num_classes) logits.

    With ``test_time_flip``, an ``eval()`` model averages the features of each image and its
    horizontal mirror (Krizhevsky et al. 2012, "ImageNet Classification with Deep Convolutional
    Neural Networks", §4.1, averaged predictions over reflections). The head is linear, so this
    is the mean of the two views' logits, and ``head(forward_features(x)) == forward(x)`` holds
    in both modes. Training mode always sees the single view.

    Attributes:
        backbone_name: key into ``BACKBONES``.
        feature_dim: width D of the penultimate features.
        num_classes: number of output logits N.
        test_time_flip: average over the mirror in eval mode.
    """

    def __init__(
        self,
        backbone_name: str,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        test_time_flip: bool = False,
    ):
        super().__init__()
        self.backbone_name = backbone_name
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.test_time_flip = test_time_flip
        self.backbone = backbone
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, normalised with IMAGENET_MEAN/STD -> (B, feature_dim) float."""
        if self.test_time_flip and not self.training:
            both = self.backbone(torch.cat([x, x.flip(-1)]))
            return both.unflatten(0, (2, x.shape[0])).mean(0)
        return self.backbone(x)

    def forward_feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, normalised -> (B, C, h, w) float: the backbone's last spatial
        feature map, before global pooling (ResNet: layer4's output, C = ``feature_dim``;
        MobileNetV3: ``features``' output, C = 576). Always the single view, whatever
        ``test_time_flip`` says: a map averaged with its mirror would blur left and right.
        Used as per-location targets by representation alignment (``tasks/training/repa.py``)."""
        net = self.backbone
        if isinstance(net, tvm.ResNet):
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            return net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return net.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, H, W) float, normalised -> (B, num_classes) logits."""
        return self.head(self.forward_features(x))


def build_classifier(
    backbone: str,
    num_classes: int,
    pretrained_state: dict[str, torch.Tensor] | None = None,
    small_input_stem: bool = False,
    test_time_flip: bool = False,
) -> Classifier:
    """Build a classifier for ``num_classes`` classes on a torchvision backbone.

    Args:
        backbone: a key of ``BACKBONES``: resnet8, resnet10, resnet18, resnet34, resnet50,
            mobilenet_v3_small.
        num_classes: number of classes N >= 1; the head is a fresh ``nn.Linear(D, N)``.
        pretrained_state: torchvision's ImageNet state dict for this backbone (1000-class head),
            loaded before the head is replaced; inputs should then be normalised with
            ``IMAGENET_MEAN``/``IMAGENET_STD``. None: random initialisation.
        small_input_stem: for 32-64 px inputs. ResNets get the CIFAR stem of He et al. 2016
            §4.2 (3x3 stride-1 conv, no max-pool: total stride 8 instead of 32); MobileNetV3's
            first conv gets stride 1 (total stride 16). The replaced ResNet conv is freshly
            initialised even when ``pretrained``.
        test_time_flip: in eval mode, average over each image and its mirror (see ``Classifier``);
            doubles the cost of inference, not of training.

    Returns:
        A ``Classifier`` in training mode; ``forward`` maps (B, 3, H, W) float -> (B, N).

    Raises:
        ValueError: unknown backbone (the message lists the valid names), or num_classes < 1.
    """
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid names: {', '.join(BACKBONES)}")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")
    spec = BACKBONES[backbone]
    net = spec.build(weights=None)
    if pretrained_state is not None:
        net.load_state_dict(pretrained_state)
    if small_input_stem:
        _use_small_input_stem(net)
    _drop_head(net)
    return Classifier(backbone, net, spec.feature_dim, num_classes, test_time_flip)


def _drop_head(net: nn.Module) -> None:
    """Replace the last linear layer by ``nn.Identity`` so the network outputs its features."""
    if isinstance(net, tvm.ResNet):
        net.fc = nn.Identity()
    else:  # MobileNetV3: classifier = Linear, Hardswish, Dropout, Linear
        net.classifier[-1] = nn.Identity()


def _use_small_input_stem(net: nn.Module) -> None:
    if isinstance(net, tvm.ResNet):
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    else:
        net.features[0][0].stride = (1, 1)


def require_imagenet_weights(backbone: str) -> tvm.WeightsEnum:
    """``backbone``'s torchvision ImageNet weights entry.

    Raises:
        ValueError: the backbone has none; the message lists the backbones that have.
    """
    weights = BACKBONES[backbone].weights
    if weights is None:
        having = ", ".join(name for name, spec in BACKBONES.items() if spec.weights is not None)
        raise ValueError(
            f"backbone {backbone!r} has no published ImageNet weights: train it from scratch "
            f"(pretrained=False) or pick a backbone that has them: {having}"
        )
    return weights
