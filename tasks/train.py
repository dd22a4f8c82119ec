"""Run a training by model name: the one entry point that the CLI, Prefect and Modal all call.

One table maps a model name (``"classifier"``, ``"dit"``) to its config class, its named presets and
its training function. Every caller builds a config the same way, with ``build_config`` (from
``tasks.configs``, which imports no torch): the ``preset`` first, then the ``overrides`` on top,
validated once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from data.dataset import DatasetRef
from tasks import train_classifier as _classifier
from tasks import train_dit as _dit
from tasks.configs import MODELS, ModelName, build_config
from tasks.training.run_log import Progress

__all__ = ["MODELS", "TRAINERS", "ModelName", "Trainer", "build_config", "train"]


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
