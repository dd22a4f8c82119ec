"""The options of one evaluation, as one typed object.

The command line (`python -m tasks.evaluate`), the flow parameter (`evaluation`, rendered as a form
in the Prefect UI) and the Modal function all take this object, so each option is written down
once, here, with its range and meaning.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from data.errors import one_line
from tasks.configs.dit import check_interval
from tasks.training.config import pair_or_scalar, scalar_type

# `models.flow_matching.SAMPLERS`, as plain data so that the options are checked without importing
# torch; tests/test_first_contact.py checks that they agree.
SAMPLERS = ("euler", "heun")


class EvalOptions(BaseModel):
    """How to sample, measure and compare; every field has a default."""

    model_config = ConfigDict(extra="forbid")

    samples_per_class: int = Field(
        16, ge=1, le=1024, description="DiT samples generated per class for the grid and metrics"
    )
    sampler: str | None = Field(None, description="ODE sampler, euler or heun (default: the DiT's)")
    steps: int | None = Field(None, ge=1, description="ODE steps (default: the DiT export's)")
    cfg_scale: float | None = Field(
        None, ge=1.0, description="CFG scale, 1 = no guidance (default: the DiT export's)"
    )
    guidance: Literal["cfg", "auto"] | None = Field(
        None, description="cfg (null class) or auto (the export's guide) (default: the DiT's)"
    )
    guidance_interval: tuple[float, float] | None = Field(
        None, description="guide only at t in [LO, HI], 1 = noise; 0 1 = every step (default: "
        "the DiT's)",
    )  # fmt: skip
    time_shift: float | None = Field(
        None, gt=0, description="SD3 shift of the time grid, 1 = uniform (default: the DiT's)"
    )
    seed: int = Field(0, ge=0, description="seed of the sampling noise, real draw, KID subsets")
    deployment: str | None = Field(
        None, description="name whose report history gives the deltas (default: the Prefect "
        "deployment running this, else local)",
    )  # fmt: skip
    previous: Path | None = Field(
        None, description="compare with this report.json (or folder) instead of the history"
    )
    inception_weights: Path | None = Field(
        None, description="FID Inception weights file (default: $TRAIN_CATS_INCEPTION_WEIGHTS "
        "or torch's hub cache)",
    )  # fmt: skip
    inception_download: bool | None = Field(
        None, description="download missing Inception weights (default: unless offline env says no)"
    )
    kid_subset_size: int = Field(1000, ge=2, description="KID subset size, capped at the samples")
    kid_subsets: int = Field(100, ge=1, description="number of KID subsets")
    regression_abs: float = Field(0.02, ge=0, description="flag a [0, 1] score that dropped more")
    regression_rel: float = Field(
        0.10, ge=0, description="flag a distance (FD, FID, KID) that rose by more than this share"
    )
    batch_size: int = Field(64, ge=1, description="images per forward pass")
    device: str | None = Field(None, description="torch device (default: cuda if available)")
    overwrite: bool = Field(False, description="replace an existing report folder")

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, value: str | None) -> str | None:
        if value is not None and value not in SAMPLERS:
            raise ValueError(f"unknown sampler {value!r}; choose one of {', '.join(SAMPLERS)}")
        return value

    @field_validator("guidance_interval")
    @classmethod
    def _ordered_interval(cls, value: tuple[float, float] | None) -> tuple[float, float] | None:
        check_interval(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        # One message listing the valid names, rather than pydantic's "extra inputs" per field.
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown evaluation option(s) {unknown}; valid: {sorted(cls.model_fields)}"
                )
        return data


def validated(options: EvalOptions | dict | None, **overrides: Any) -> EvalOptions:
    """`options` with `overrides` on top, validated. Raises ValueError naming the field."""
    base = options.model_dump(exclude_unset=True) if isinstance(options, EvalOptions) else options
    try:
        return EvalOptions.model_validate({**(base or {}), **overrides})
    except ValidationError as exc:
        raise ValueError(one_line(exc)) from None


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per option (booleans as --x / --no-x), defaults left to the model."""
    for name, field in EvalOptions.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if field.annotation in (bool, bool | None):
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, help=field.description
            )
            continue
        kind, nargs = pair_or_scalar(scalar_type(field.annotation))
        choices = list(SAMPLERS) if name == "sampler" else None
        if literal := [a for a in get_args(field.annotation) if get_origin(a) is Literal]:
            choices = list(get_args(literal[0]))  # e.g. guidance: Literal["cfg", "auto"] | None
        parser.add_argument(
            flag, dest=name, type=kind, nargs=nargs, choices=choices, help=field.description
        )


def from_args(args: argparse.Namespace) -> EvalOptions:
    """The options given on the command line (unset flags keep the defaults)."""
    given = {n: getattr(args, n) for n in EvalOptions.model_fields if getattr(args, n) is not None}
    return validated(None, **given)
