"""Classifiers: shapes and features per backbone, stems, errors, and the pretrained-weights fetch
against real files in a temporary TORCH_HOME and real HTTP servers on 127.0.0.1."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest
import torch
import torchvision.models as tvm
from torch import nn

from models.classifier import BACKBONES
from tasks.training.pretrained import (
    DEFAULT_WEIGHTS_URL,
    WEIGHTS_URL_ENV,
    PretrainedWeightsUnavailable,
    build_classifier,
    weights_cache_path,
    weights_url,
)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("backbone", sorted(BACKBONES))
@pytest.mark.parametrize("small_input_stem", [False, True])
def test_logits_and_features_have_the_right_shapes(backbone, small_input_stem):
    torch.manual_seed(0)
    model = build_classifier(backbone, 5, small_input_stem=small_input_stem).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        logits, feats = model(x), model.forward_features(x)
    assert logits.shape == (2, 5) and logits.dtype == torch.float32
    assert feats.shape == (2, BACKBONES[backbone].feature_dim) == (2, model.feature_dim)
    # The head is the only thing between the features and the logits.
    torch.testing.assert_close(model.head(feats), logits)
    assert isinstance(model.head, nn.Linear) and model.head.out_features == 5


def test_small_input_stem_keeps_more_resolution():
    model = build_classifier("resnet18", 2, small_input_stem=True).eval()
    conv = model.backbone.conv1
    assert (conv.kernel_size, conv.stride) == ((3, 3), (1, 1))
    assert isinstance(model.backbone.maxpool, nn.Identity)
    # Total stride 8 instead of 32: a 32 px image leaves a 4x4 map before pooling, not 1x1.
    trunk = nn.Sequential(*list(model.backbone.children())[:-2])
    assert trunk(torch.randn(1, 3, 32, 32)).shape[-2:] == (4, 4)
    plain = build_classifier("resnet18", 2).eval()
    trunk = nn.Sequential(*list(plain.backbone.children())[:-2])
    assert trunk(torch.randn(1, 3, 32, 32)).shape[-2:] == (1, 1)
    mobile = build_classifier("mobilenet_v3_small", 2, small_input_stem=True)
    assert mobile.backbone.features[0][0].stride == (1, 1)


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ValueError, match="resnet8, resnet10, resnet18, resnet34, resnet50, mobile"):
        build_classifier("vgg16", 3)


def test_resnet10_is_resnet18_with_one_block_per_stage():
    ten, eighteen = build_classifier("resnet10", 2), build_classifier("resnet18", 2)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        assert len(getattr(ten.backbone, stage)) == 1
        assert len(getattr(eighteen.backbone, stage)) == 2
    # Same stem, widths and head: only the second block of each stage is gone.
    assert ten.backbone.conv1.weight.shape == eighteen.backbone.conv1.weight.shape
    assert ten.feature_dim == eighteen.feature_dim == 512
    params = sum(p.numel() for p in ten.parameters())
    assert 4.8e6 < params < 5.0e6


def test_resnet8_is_resnet10_without_its_last_stage():
    eight, ten = build_classifier("resnet8", 2), build_classifier("resnet10", 2)
    assert isinstance(eight.backbone.layer4, nn.Identity)
    # Every other weight has ResNet-10's name and shape, so nothing else changed.
    kept = {k: v.shape for k, v in ten.state_dict().items() if not k.startswith("backbone.layer4")}
    kept["head.weight"] = torch.Size([2, 256])
    assert {k: v.shape for k, v in eight.state_dict().items()} == kept
    assert eight.feature_dim == 256
    assert 1.2e6 < sum(p.numel() for p in eight.parameters()) < 1.3e6
    # At 64 px, the last map is 4x4 (total stride 16) instead of ResNet-10's 2x2.
    trunk = nn.Sequential(*list(eight.backbone.children())[:-2]).eval()
    assert trunk(torch.randn(1, 3, 64, 64)).shape == (1, 256, 4, 4)


def test_test_time_flip_averages_the_mirror_in_eval_mode_only():
    torch.manual_seed(0)
    flipping = build_classifier("resnet10", 3, test_time_flip=True)
    single = build_classifier("resnet10", 3)
    single.load_state_dict(flipping.state_dict())
    x = torch.randn(4, 3, 32, 32)
    mirror = x.flip(-1)
    with torch.no_grad():
        flipping.eval(), single.eval()
        torch.testing.assert_close(flipping(x), (single(x) + single(mirror)) / 2)
        torch.testing.assert_close(flipping(mirror), flipping(x))
        torch.testing.assert_close(flipping.head(flipping.forward_features(x)), flipping(x))
        assert not torch.allclose(single(mirror), single(x))  # the mirror is a different view
        assert flipping(torch.randn(0, 3, 32, 32)).shape == (0, 3)  # an empty batch
        flipping.train(), single.train()  # training sees the single view
        torch.testing.assert_close(flipping(x), single(x))


def test_pretrained_without_published_weights_fails_before_any_fetch(torch_home, monkeypatch):
    # A closed port as the mirror: were a fetch attempted, the error would be a download error.
    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{_closed_port()}/models/")
    with pytest.raises(
        ValueError, match=r"'resnet10' has no published .*pretrained=False.*resnet18"
    ):
        build_classifier("resnet10", 2, pretrained=True)
    with pytest.raises(ValueError, match="no published ImageNet weights"):
        weights_url("resnet10")
    assert not torch_home.exists()


def test_zero_classes_is_an_error():
    with pytest.raises(ValueError, match="num_classes=0"):
        build_classifier("resnet18", 0)


# --- pretrained weights ------------------------------------------------------------------------


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


def _closed_port() -> int:
    """A 127.0.0.1 port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _random_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(123)
    return BACKBONES[backbone].build(weights=None).state_dict()


def test_default_url_is_torchvisions_host(monkeypatch):
    monkeypatch.delenv(WEIGHTS_URL_ENV, raising=False)
    assert DEFAULT_WEIGHTS_URL == "https://download.pytorch.org/models/"
    assert weights_url("resnet18") == tvm.ResNet18_Weights.IMAGENET1K_V1.url


def test_cached_weights_load_without_network(torch_home, monkeypatch):
    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{_closed_port()}/models/")
    state = _random_state_dict("resnet18")
    cached = torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert weights_cache_path("resnet18") == cached
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)
    model = build_classifier("resnet18", 3, pretrained=True)
    assert torch.equal(model.backbone.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.head.out_features == 3


def test_offline_fails_fast_naming_the_host_and_the_way_out(torch_home, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv(WEIGHTS_URL_ENV, f"http://127.0.0.1:{port}/models")
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as err:
        build_classifier("resnet18", 3, pretrained=True)
    assert time.monotonic() - start < 10
    message = str(err.value)
    assert f"host 127.0.0.1:{port}" in message
    assert f"127.0.0.1:{port}/models/resnet18-f37072fd.pth" in message
    assert "pretrained=False" in message and "TORCH_HOME" in message
    assert not (torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth").exists()


MOBILENET_FILE = "mobilenet_v3_small-047dcff4.pth"


@pytest.fixture
def mirror(http_server, tmp_path, monkeypatch):
    """The 127.0.0.1 file server as the weights mirror, serving a random MobileNetV3 state dict
    under torchvision's file name."""
    state = _random_state_dict("mobilenet_v3_small")
    torch.save(state, tmp_path / MOBILENET_FILE)
    http_server.add(f"/models/{MOBILENET_FILE}", tmp_path / MOBILENET_FILE)
    monkeypatch.setenv(WEIGHTS_URL_ENV, http_server.url("/models/"))
    return http_server, state


def test_weights_are_downloaded_from_a_mirror_cached_and_loaded(torch_home, mirror):
    server, state = mirror
    model = build_classifier("mobilenet_v3_small", 2, pretrained=True)
    assert torch.equal(model.backbone.features[0][0].weight, state["features.0.0.weight"])
    cache_dir = torch_home / "hub" / "checkpoints"
    assert [p.name for p in cache_dir.iterdir()] == [MOBILENET_FILE]
    # A second build is served from the cache: no new request.
    again = build_classifier("mobilenet_v3_small", 4, pretrained=True)
    assert torch.equal(again.backbone.features[0][0].weight, state["features.0.0.weight"])
    assert server.count(f"/models/{MOBILENET_FILE}") == 1


def test_missing_file_on_the_mirror_is_a_clear_error(torch_home, mirror):
    with pytest.raises(PretrainedWeightsUnavailable, match=r"404.*pretrained=False"):
        build_classifier("resnet34", 3, pretrained=True)


def test_server_error_is_a_clear_error(torch_home, mirror):
    server, _ = mirror
    server.fail(f"/models/{MOBILENET_FILE}", 503)
    with pytest.raises(PretrainedWeightsUnavailable, match=r"503.*pretrained=False"):
        build_classifier("mobilenet_v3_small", 3, pretrained=True)


def test_truncated_download_leaves_nothing_in_the_cache(torch_home, mirror):
    server, state = mirror
    server.drop(f"/models/{MOBILENET_FILE}", after=4096)
    with pytest.raises(PretrainedWeightsUnavailable, match="pretrained=False"):
        build_classifier("mobilenet_v3_small", 3, pretrained=True)
    cache_dir = torch_home / "hub" / "checkpoints"
    assert list(cache_dir.iterdir()) == []  # no partial file, no leftover temp file
    # The fault was one-off: the next attempt downloads the whole file.
    model = build_classifier("mobilenet_v3_small", 3, pretrained=True)
    assert torch.equal(model.backbone.features[0][0].weight, state["features.0.0.weight"])


def test_corrupt_cached_file_is_a_clear_error(torch_home):
    cached = weights_cache_path("resnet18")
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(PretrainedWeightsUnavailable, match="not a readable state dict"):
        build_classifier("resnet18", 3, pretrained=True)
