"""The two trainings by name, and where their outputs live.

One table maps a model name (``"classifier"``, ``"dit"``) to its config class, its named presets and
its training function, so that the flow (validation), the Prefect tasks (local runs) and the Modal
functions (remote runs) build configs the same way: ``preset`` first, then ``overrides`` on top.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from tasks import train_classifier as _classifier
from tasks import train_dit as _dit

ModelName = Literal["classifier", "dit"]
MODELS: tuple[ModelName, ...] = ("classifier", "dit")


@dataclass(frozen=True)
class Trainer:
    """A training function with its config type and named presets."""

    config_type: type[BaseModel]
    presets: dict[str, BaseModel]
    train: Callable[..., dict]


TRAINERS: dict[str, Trainer] = {
    "classifier": Trainer(
        _classifier.ClassifierConfig, _classifier.PRESETS, _classifier.train_classifier
    ),
    "dit": Trainer(_dit.DiTConfig, _dit.PRESETS, _dit.train_dit),
}


def build_config(model: str, preset: str, overrides: dict[str, Any] | None = None) -> BaseModel:
    """Return ``model``'s config: the named ``preset`` with ``overrides`` applied and re-validated.

    Raises:
        ValueError: unknown model or preset (the message lists the valid names), or an override
            that the config rejects (the message names the field and the reason).
    """
    if model not in TRAINERS:
        raise ValueError(f"unknown model {model!r}; choose one of {sorted(TRAINERS)}")
    trainer = TRAINERS[model]
    if preset not in trainer.presets:
        raise ValueError(
            f"unknown {model} preset {preset!r}; choose one of {sorted(trainer.presets)}"
        )
    base = trainer.presets[preset].model_dump()
    unknown = sorted(set(overrides or {}) - set(trainer.config_type.model_fields))
    if unknown:
        raise ValueError(
            f"unknown {model} override field(s) {unknown}; valid fields: "
            f"{sorted(trainer.config_type.model_fields)}"
        )
    try:
        return trainer.config_type.model_validate({**base, **(overrides or {})})
    except ValidationError as exc:
        raise ValueError(f"invalid {model} config (preset {preset!r} + overrides): {exc}") from exc


def runs_root() -> Path:
    """The folder holding run dirs and reports: ``$TRAIN_CATS_RUNS_DIR`` or ``./artifacts/runs``.

    On Modal the image sets ``TRAIN_CATS_RUNS_DIR=/runs``, the mount point of the runs volume.
    """
    return Path(os.environ.get("TRAIN_CATS_RUNS_DIR", "artifacts/runs")).resolve()


def run_path(run_name: str) -> Path:
    """Absolute path of ``run_name`` (a relative name such as ``"2026-11-29/dit-cpu-tiny-ab12"``).

    Raises:
        ValueError: ``run_name`` is absolute or climbs out of the runs root with ``..``.
    """
    relative = Path(run_name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts:
        raise ValueError(f"run name {run_name!r} must be a relative path inside the runs root")
    return runs_root() / relative
