"""Use an export: rebuild a trained model from `model.safetensors` + `config.json`, and sample.

What evaluation, notebooks and the trainers' sample grids share. Only the export folder is read
(`tasks/training/export.py` gives the format); nothing is downloaded. The sampling levers of issue
21 §2 (guidance interval, autoguidance with the exported guide, time shift) default to the
export's "sampler" dict (`sampler_settings`) and are `models.flow_matching.sample`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from models.classifier import Classifier, build_classifier
from models.dit import DiT
from models.flow_matching import SAMPLERS
from models.flow_matching import sample as integrate
from tasks.champions import resolve
from tasks.training.export import (
    load_weights,
    read_export,
    read_export_config,
    require_consistent,
)
from tasks.training.runtime import Precision, autocast


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


# What an export's "sampler" dict falls back to per key: exports from before a key existed sampled
# this way (no guidance interval, the uniform grid, classifier-free guidance).
SAMPLER_DEFAULTS: dict[str, Any] = {
    "method": "euler",
    "steps": 25,
    "cfg_scale": 1.0,
    "guidance": "cfg",
    "guidance_interval": None,
    "time_shift": 1.0,
}
GUIDANCE = ("cfg", "auto")


@torch.no_grad()
def draw(
    model: DiT,
    labels: torch.Tensor,
    steps: int,
    method: str,
    cfg_scale: float,
    seed: int,
    *,
    guide: DiT | None = None,
    guidance_interval: tuple[float, float] | None = None,
    time_shift: float = 1.0,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Images (B, 3, H, W) float in [0, 1] for `labels` ((B,) int64), from noise seeded by `seed`
    alone (a private generator, so drawing never disturbs the training RNG streams).

    `guide` (autoguidance), `guidance_interval` and `time_shift` are those of
    `models.flow_matching.sample`, which raises ValueError for bad values. `precision` is the
    autocast one (`tasks.training.runtime.resolve_precision`; "auto" depends on the machine)."""
    device = next(model.parameters()).device
    size = model.input_size
    gen = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(len(labels), model.in_channels, size, size, generator=gen).to(device)
    with autocast(device, precision):
        x0 = integrate(
            model, noise, labels, steps=steps, method=method, cfg_scale=cfg_scale,
            guidance_interval=guidance_interval, guide=guide, time_shift=time_shift,
        )  # fmt: skip
    return ((x0.float() + 1.0) / 2.0).clamp_(0.0, 1.0)


def sampler_settings(export_config: dict[str, Any], **given: Any) -> dict[str, Any]:
    """How to sample a DiT export: its `config.json` "sampler" dict, keys missing from older
    exports filled from `SAMPLER_DEFAULTS`, then every non-None `given` key on top.

    Returns a dict with the keys of `SAMPLER_DEFAULTS` (`guidance_interval` a (lo, hi) tuple or
    None). Raises ValueError for an unknown method or guidance, or a non-positive time shift.
    """
    unknown = sorted(set(given) - set(SAMPLER_DEFAULTS))
    if unknown:
        raise TypeError(f"unknown sampler setting(s) {unknown}; valid: {sorted(SAMPLER_DEFAULTS)}")
    settings = {**SAMPLER_DEFAULTS, **export_config.get("sampler", {})}
    settings.update({key: value for key, value in given.items() if value is not None})
    if settings["method"] not in SAMPLERS:
        raise ValueError(f"unknown method {settings['method']!r}; valid: {SAMPLERS}")
    if settings["guidance"] not in GUIDANCE:
        raise ValueError(f"unknown guidance {settings['guidance']!r}; valid: {GUIDANCE}")
    if not settings["time_shift"] > 0:
        raise ValueError(f"time_shift={settings['time_shift']} must be > 0")
    interval = settings["guidance_interval"]
    settings["guidance_interval"] = None if interval is None else tuple(map(float, interval))
    settings["steps"], settings["cfg_scale"] = int(settings["steps"]), float(settings["cfg_scale"])
    settings["time_shift"] = float(settings["time_shift"])
    return settings


def load_guide(path: str | Path, device: str | torch.device = "cpu") -> DiT | None:
    """The autoguidance guide exported beside a DiT (`guide.safetensors`, named by config.json's
    "guide" entry; `tasks.training.guide`), or None for an export without one.

    `path` is an export folder or `"champion:<deployment>"`. Returns an `eval()` DiT with the
    export's architecture on `device`, with a `guide_step` attribute (the training step of the
    snapshot). Raises FileNotFoundError for a guide file that config.json names but that is
    missing, ValueError for one that does not fit the architecture (both naming the file).
    """
    folder, config = read_export_config(resolve(path, "dit"), "dit")
    entry = config.get("guide")
    if entry is None:
        return None
    file = folder / entry["file"]
    if not file.is_file():
        raise FileNotFoundError(
            f"{file} not found, but {folder / 'config.json'} names it; re-export"
        )
    guide = DiT(**config["arch"])
    load_weights(guide, load_file(str(file)), file)
    guide.guide_step = int(entry["step"])
    return guide.to(device).eval()


def _guide_for(model: DiT) -> DiT:
    """The guide exported with `model` (by its `export_dir`, set by `load_dit`), or a one-line
    ValueError naming the fix."""
    folder = getattr(model, "export_dir", None)
    guide = load_guide(folder, next(model.parameters()).device) if folder else None
    if guide is None:
        where = f"the DiT export {folder}" if folder else "this DiT (not loaded by load_dit)"
        raise ValueError(
            f"guidance='auto' needs a guide model, but {where} has none (guide.safetensors): "
            "retrain with guide_snapshot_fraction > 0 (e.g. 0.25), or use guidance='cfg'"
        )
    return guide


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
    model.export_dir = Path(path)  # where `sample` finds the autoguidance guide
    return model.to(device).eval()


def sample(
    model_or_path: DiT | str | Path,
    class_names: list[str],
    n_per_class: int = 8,
    steps: int | None = None,
    method: str | None = None,
    cfg_scale: float | None = None,
    seed: int = 0,
    *,
    guidance: str | None = None,
    guidance_interval: tuple[float, float] | None = None,
    time_shift: float | None = None,
    guide: DiT | None = None,
    precision: Precision = "auto",
) -> torch.Tensor:
    """Draw `n_per_class` images for each class name, grouped by class in the given order.

    Args:
        model_or_path: a model from `load_dit`, or an export folder.
        class_names: names from the export's `classes`.
        steps, method, cfg_scale: ODE steps, "euler"/"heun", guidance weight; None = the
            export's defaults (`config.json` "sampler", `sampler_settings`).
        seed: noise seed; the same seed gives the same images.
        guidance: "cfg" (classifier-free, Ho & Salimans 2022) or "auto" (autoguidance with the
            export's guide, Karras et al. 2024 §3); None = the export's default.
        guidance_interval: (lo, hi) in t (1 = noise): guide only there (Kynkäänniemi et al.
            2024 §3); None = the export's default; (0, 1) = every step.
        time_shift: SD3 shift of the time grid (Esser et al. 2024 §5.3.2); None = the export's.
        guide: the guide for "auto" (default: `load_guide` of the export `model_or_path` came
            from); ignored for "cfg".
        precision: "fp32", "bf16" or "auto" (bf16 where the device multiplies it natively,
            `tasks.training.runtime.resolve_precision`): the autocast the ODE runs under.

    Returns:
        (len(class_names) * n_per_class, 3, H, W) float32 in [0, 1], on the model's device.

    Raises:
        ValueError: an unknown class name (listing the valid ones), n_per_class < 1, an unknown
            method or guidance, a bad interval or shift, or "auto" for an export without a guide
            (one line naming the fix).
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
    settings = sampler_settings(
        getattr(model, "export_config", {}),
        steps=steps or None, method=method or None, cfg_scale=cfg_scale, guidance=guidance,
        guidance_interval=guidance_interval, time_shift=time_shift,
    )  # fmt: skip
    if settings["guidance"] == "auto":
        guide = guide if guide is not None else _guide_for(model)
    else:
        guide = None
    device = next(model.parameters()).device
    ids = torch.tensor([classes.index(name) for name in class_names], device=device)
    labels = ids.repeat_interleave(n_per_class)
    return draw(
        model, labels, settings["steps"], settings["method"], settings["cfg_scale"], seed,
        guide=guide, guidance_interval=settings["guidance_interval"],
        time_shift=settings["time_shift"], precision=precision,
    )  # fmt: skip
