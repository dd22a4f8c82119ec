"""Training configs and their named presets, one module per model, and `build_config`: the one way
a config is built from a preset and overrides (the flow's checks, the tasks, the Modal functions).

Nothing here imports torch, so a command line can check its flags in a fraction of a second.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from data.errors import one_line
from tasks.configs import classifier, dit
from tasks.training.config import TrainConfig

ModelName = Literal["classifier", "dit"]
MODELS: tuple[ModelName, ...] = ("classifier", "dit")
# Per model: its config class and its named presets.
CONFIGS: dict[str, tuple[type[TrainConfig], dict[str, TrainConfig]]] = {
    "classifier": (classifier.ClassifierConfig, classifier.PRESETS),
    "dit": (dit.DiTConfig, dit.PRESETS),
}


def build_config(model: str, preset: str, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Return ``model``'s config: the named ``preset`` with ``overrides`` applied and re-validated.

    Raises:
        ValueError: unknown model or preset (the message lists the valid names), or an override
            that the config rejects (the message names the field and the reason).
    """
    if model not in CONFIGS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(CONFIGS)}")
    config_type, presets = CONFIGS[model]
    if preset not in presets:
        raise ValueError(f"unknown {model} preset {preset!r}; choose one of {sorted(presets)}")
    unknown = sorted(set(overrides or {}) - set(config_type.model_fields))
    if unknown:
        raise ValueError(
            f"unknown {model} override field(s) {unknown}; valid fields: "
            f"{sorted(config_type.model_fields)}"
        )
    try:
        return config_type.model_validate({**presets[preset].model_dump(), **(overrides or {})})
    except ValidationError as exc:
        raise ValueError(
            f"invalid {model} config (preset {preset!r} + overrides): {one_line(exc)}"
        ) from None
