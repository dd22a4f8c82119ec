"""Use an export: rebuild a trained model from `model.safetensors` + `config.json`, and sample.

What evaluation, notebooks and the trainers' sample grids share. Only the export folder is read
(`tasks/training/export.py` gives the format); nothing is downloaded.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.classifier import Classifier, build_classifier
from models.dit import DiT
from models.flow_matching import SAMPLERS
from models.flow_matching import sample as integrate
from tasks.champions import resolve
from tasks.training.export import load_weights, read_export, require_consistent
from tasks.training.runtime import autocast


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    """Rebuild the exported classifier from `model.safetensors` + `config.json` in `path`
    (a folder, or `"champion:<deployment>"` for that deployment's champion, `tasks.champions`).

    Returns an `eval()` model on `device` (no download: the weights come from the export) with
    `classes` (list[str]) and `export_config` (dict) attributes. Its input is (B, 3, S, S) float
    normalised with `export_config["normalisation"]`, S = `export_config["image_size"]`.
    Raises FileNotFoundError / ValueError as `tasks.training.export.read_export`, and ValueError for a
    `test_time_flip` that is not a boolean, or an `image_size` / `test_time_flip` that contradicts
    the export's `train_config`.
    """
    path = resolve(path, "classifier")
    weights, config = read_export(path, "classifier")
    # Exports from before the field existed predicted on the single view.
    test_time_flip = config.get("test_time_flip", False)
    if not isinstance(test_time_flip, bool):
        raise ValueError(
            f"{path}: config.json has test_time_flip={test_time_flip!r}; it must be true or "
            "false (re-export the run, or fix the file)"
        )
    # The top-level fields drive loading and evaluation; the training config they were exported
    # from must agree, or a hand edit changed how the model is used without retraining it.
    trained = config.get("train_config", {})
    checks = {"num_classes vs len(classes)": (config["num_classes"], len(config["classes"]))}
    for field, value in (("image_size", config["image_size"]), ("test_time_flip", test_time_flip)):
        if field in trained:
            checks[f"{field} vs train_config.{field}"] = (value, trained[field])
    require_consistent(path, checks)
    model = build_classifier(
        config["backbone"],
        config["num_classes"],
        small_input_stem=config["small_input_stem"],
        test_time_flip=test_time_flip,
    )
    load_weights(model, weights, path)
    model.classes = list(config["classes"])
    model.export_config = config
    return model.to(device).eval()



@torch.no_grad()
def draw(
    model: DiT, labels: torch.Tensor, steps: int, method: str, cfg_scale: float, seed: int
) -> torch.Tensor:
    """Images (B, 3, H, W) float in [0, 1] for `labels`, from noise seeded by `seed` alone (a
    private generator, so drawing never disturbs the training RNG streams)."""
    device = next(model.parameters()).device
    size = model.input_size
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(len(labels), model.in_channels, size, size, generator=gen).to(device)
    with autocast(device):
        x0 = integrate(model, noise, labels, steps=steps, method=method, cfg_scale=cfg_scale)
    return ((x0.float() + 1.0) / 2.0).clamp_(0.0, 1.0)



def load_dit(path: str | Path, device: str | torch.device = "cpu") -> DiT:
    """Rebuild the exported DiT from `model.safetensors` + `config.json` in `path` (a folder, or
    `"champion:<deployment>"` for that deployment's champion, `tasks.champions`).

    Returns an `eval()` model on `device` with `classes` (list[str]) and `export_config` (dict)
    attributes. Raises FileNotFoundError / ValueError as `tasks.training.export.read_export`, and
    FileNotFoundError for a deployment without a champion.
    """
    path = resolve(path, "dit")
    weights, config = read_export(path, "dit")
    arch = config["arch"]
    require_consistent(
        path,
        {
            "arch.input_size vs image_size": (arch["input_size"], config["image_size"]),
            "arch.num_classes vs len(classes)": (arch["num_classes"], len(config["classes"])),
        },
    )
    model = DiT(**arch)
    load_weights(model, weights, path)
    model.classes = list(config["classes"])
    model.export_config = config
    return model.to(device).eval()


def sample(
    model_or_path: DiT | str | Path,
    class_names: list[str],
    n_per_class: int = 8,
    steps: int | None = None,
    method: str | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Draw `n_per_class` images for each class name, grouped by class in the given order.

    Args:
        model_or_path: a model from `load_dit`, or an export folder.
        class_names: names from the export's `classes`.
        steps, method, cfg_scale: ODE steps, "euler"/"heun", CFG scale; None = the export's
            defaults (`config.json` "sampler").
        seed: noise seed; the same seed gives the same images.

    Returns:
        (len(class_names) * n_per_class, 3, H, W) float32 in [0, 1], on the model's device.

    Raises:
        ValueError: an unknown class name (listing the valid ones), n_per_class < 1, or an
            unknown method.
    """
    model = model_or_path if isinstance(model_or_path, DiT) else load_dit(model_or_path)
    classes = getattr(model, "classes", None)
    if classes is None:
        raise ValueError("this DiT has no class names; load it with load_dit(path)")
    unknown = [name for name in class_names if name not in classes]
    if unknown:
        raise ValueError(f"unknown class name(s) {unknown}; this model knows {classes}")
    if n_per_class < 1:
        raise ValueError(f"n_per_class={n_per_class} must be >= 1")
    defaults = model.export_config["sampler"] if hasattr(model, "export_config") else {}
    method = method or defaults.get("method", "euler")
    if method not in SAMPLERS:
        raise ValueError(f"unknown method {method!r}; valid: {SAMPLERS}")
    device = next(model.parameters()).device
    ids = torch.tensor([classes.index(name) for name in class_names], device=device)
    labels = ids.repeat_interleave(n_per_class)
    return draw(
        model,
        labels,
        steps or defaults.get("steps", 25),
        method,
        cfg_scale if cfg_scale is not None else defaults.get("cfg_scale", 1.0),
        seed,
    )


