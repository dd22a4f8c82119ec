"""Run a training by model name: the one entry point that the CLI, Prefect and Modal all call.

One table maps a model name (``"classifier"``, ``"dit"``) to its config class, its named presets and
its training function, so that every caller builds a config the same way: the ``preset`` first,
then the ``overrides`` on top, validated once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from data.dataset import DatasetRef
from data.errors import one_line
from tasks import train_classifier as _classifier
from tasks import train_dit as _dit
from tasks.training.run_log import Progress

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
        raise ValueError(
            f"invalid {model} config (preset {preset!r} + overrides): {one_line(exc)}"
        ) from None


def train(
    model: str,
    preset: str,
    overrides: dict[str, Any] | None,
    dataset: DatasetRef | str | Path | dict,
    run_dir: str | Path,
    progress: Progress | None = None,
) -> dict:
    """Train ``model`` from ``preset`` + ``overrides`` on ``dataset`` into ``run_dir``.

    ``dataset`` is a DatasetRef, its JSON or dict, or a path (``data.dataset.load_ref``). Returns
    the trainer's JSON-able result (run dir, metrics, exported files). Raises ValueError for a bad
    model, preset or override before any data is read, then whatever the trainer raises.
    """
    config = build_config(model, preset, overrides)
    if isinstance(dataset, dict):
        dataset = DatasetRef.model_validate(dataset)
    return TRAINERS[model].train(config, dataset, run_dir, progress=progress)
