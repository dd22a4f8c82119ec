"""Fields shared by every training config, and the command line that overrides them.

`TrainConfig` holds what the classifier and the DiT train alike (optimizer, schedule, time budget,
checkpointing, logging); `ClassifierConfig` and `DiTConfig` extend it in their task modules.
`RESUMABLE_FIELDS` names the fields a resumed run may change without invalidating its checkpoints:
they decide how long and how observably a run goes on, not what it computes up to now. Every other
field must match the checkpoint exactly, or the resume is refused (see `tasks.training.checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from data.dataset import load_ref
from data.errors import DatasetError, OneLineParser, print_error

# Changing one of these on resume is allowed. `steps` and `time_budget_minutes` re-plan the LR
# schedule from the resume point (so a run that changes them is no longer bit-identical to an
# uninterrupted one, by choice); the rest only change logging, checkpoint cadence, the sample
# grids drawn along the way, or the execution engine (`compile`, `num_threads`, `sdpa_backend`:
# the same maths, though a different kernel or thread count may round differently).
RESUMABLE_FIELDS = frozenset(
    {
        "steps",
        "time_budget_minutes",
        "log_every",
        "ckpt_every_steps",
        "ckpt_every_minutes",
        "keep_checkpoints",
        "compile",
        "sample_every",
        "sample_steps",
        "eval_every_epochs",
        "test_time_flip",
        "progress_bar",
        "num_threads",
        "adaptive_threads",
        "sdpa_backend",
        # The global batch is what the maths sees; how many processes share it, and where the
        # images sit, only changes the summation order of the gradient all-reduce.
        "world_size",
        "device_cache_fraction",
    }
)


class TrainConfig(BaseModel):
    """Optimisation, schedule, budget and bookkeeping fields common to both trainings.

    Units: learning rates per optimizer step, `time_budget_minutes` in wall-clock minutes,
    `ckpt_every_minutes` in wall-clock minutes, `image_size` in pixels (square).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    image_size: int = Field(32, ge=8, description="square training resolution in px")
    steps: int = Field(
        ge=1, description="optimizer steps; an upper bound when time_budget_minutes is set"
    )
    batch_size: int = Field(ge=1)
    lr: float = Field(gt=0, description="peak AdamW learning rate")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final LR as a fraction of lr")
    warmup_steps: int = Field(ge=0, description="linear LR warm-up length in steps")
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0, description="max global gradient L2 norm")
    seed: int = Field(0, ge=0)
    time_budget_minutes: float | None = Field(
        None,
        gt=0,
        description="wall-clock budget for the whole run, exports included; plans the step count",
    )
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl rows")
    ckpt_every_steps: int = Field(500, ge=1)
    ckpt_every_minutes: float = Field(10.0, gt=0)
    keep_checkpoints: int = Field(3, ge=1, description="newest checkpoints kept on disk")
    compile: bool = Field(False, description="wrap the model in torch.compile")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="autocast precision; auto = bf16 on CUDA and on CPUs with AMX or AVX-512 BF16, "
        "else fp32",
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads for torch (default: torch's choice); 1 avoids OpenMP spin-waits "
        "when other processes share the cores",
    )
    adaptive_threads: bool = Field(
        True,
        description="under a time budget on the CPU, with num_threads unset: time all threads "
        "against one and keep the faster, re-checked as other processes come and go",
    )
    progress_bar: bool = True
    world_size: int | None = Field(
        None,
        ge=1,
        description="data-parallel processes (DDP), each taking batch_size / world_size images of "
        "every global batch; default: every visible CUDA device, 1 on the CPU",
    )
    device_cache_fraction: float = Field(
        0.5,
        ge=0,
        le=0.9,
        description="copy the training split's uint8 cache to the accelerator once when it takes "
        "at most this share of the device's memory (then no per-step host-to-device copy); "
        "0 keeps it on the host (memory-mapped, pinned, prefetched)",
    )

    @model_validator(mode="after")
    def _batch_splits_evenly(self) -> TrainConfig:
        if self.world_size is not None and self.batch_size % self.world_size:
            raise ValueError(
                f"batch_size={self.batch_size} does not split evenly over world_size="
                f"{self.world_size} processes; pick a batch_size that is a multiple of it"
            )
        return self


ConfigT = TypeVar("ConfigT", bound=TrainConfig)


def scalar_type(annotation: Any) -> Any:
    """The argparse `type` for a field annotation (Optional[X] -> X; bool handled by the caller)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return scalar_type(args[0])
    if typing.get_origin(annotation) is Literal:
        return str
    return annotation


def pair_or_scalar(kind: Any) -> tuple[Any, int | None]:
    """(argparse type, nargs) for a scalar type, or for a fixed tuple such as `tuple[float,
    float]` (a `guidance_interval`), which takes its items as separate words: `--flag LO HI`."""
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        return items[0], len(items)
    return kind, None


def build_parser(
    config_cls: type[TrainConfig],
    presets: dict[str, TrainConfig],
    description: str,
    prog: str | None = None,
) -> argparse.ArgumentParser:
    """A parser with --dataset/--run-dir/--preset and one `--field-name` override per config field."""
    parser = OneLineParser(
        prog=prog,
        description=description,
        usage="%(prog)s --dataset REF --run-dir DIR [--preset NAME] [--FIELD VALUE ...] [--verbose]",
    )
    parser.add_argument(
        "--dataset",
        required=True,
        help="dataset reference: the JSON printed by the downloader, a reference.json/manifest.json "
        "path, or a version folder",
    )
    parser.add_argument(
        "--run-dir", required=True, help="run directory (resumed if it has checkpoints)"
    )
    parser.add_argument("--preset", choices=sorted(presets), default="cpu-tiny")
    parser.add_argument("--verbose", action="store_true", help="print a failure's full traceback")
    overrides = parser.add_argument_group("config overrides (default: the preset's value)")
    for name, field in config_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = field.description or ""
        if field.annotation is bool:
            overrides.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
            continue
        kind, nargs = pair_or_scalar(scalar_type(field.annotation))
        choices = None
        if typing.get_origin(field.annotation) is Literal:
            choices = list(typing.get_args(field.annotation))
        overrides.add_argument(
            flag, dest=name, type=kind, nargs=nargs, choices=choices, default=None, help=help_text
        )
    # The spelling of the budget flag, kept as an alias of --time-budget-minutes.
    overrides.add_argument("--time-budget", dest="time_budget_minutes", type=float, help="minutes")
    return parser


def config_from_args(
    config_cls: type[ConfigT], presets: dict[str, ConfigT], args: argparse.Namespace
) -> ConfigT:
    """The preset named by `args.preset` with every non-None override applied and validated."""
    values = presets[args.preset].model_dump()
    values.update(
        {
            name: getattr(args, name)
            for name in config_cls.model_fields
            if getattr(args, name, None) is not None
        }
    )
    return config_cls.model_validate(values)


def check_cache(config: TrainConfig, ref: Any) -> None:
    """Raise ValueError naming `image_size` when the dataset (a `data.dataset.DatasetRef`) has no
    packed cache at that size; called before any image is read."""
    if config.image_size not in ref.caches:
        raise ValueError(
            f"image_size={config.image_size}: dataset {ref.version} has caches at "
            f"{sorted(ref.caches)} px only; pick one of those or publish a cache at that size"
        )


def run_cli(
    config_cls: type[ConfigT],
    presets: dict[str, ConfigT],
    load_train: Callable[[], Callable[[ConfigT, Any, str], dict[str, Any]]],
    description: str,
    prog: str,
    argv: list[str] | None = None,
) -> int:
    """Parse flags, train, and print the result as one JSON line (the last line of stdout, so
    callers can parse it).

    The flags, the config and the dataset reference are checked first, in a fraction of a
    second; only then does `load_train()` import the training function (and torch). Bad input
    (flags, config, dataset, a run dir holding another config) and data errors exit with status 2
    and one line naming the problem (`--verbose`: with the traceback); other failures raise.
    """
    parser = build_parser(config_cls, presets, description, prog)
    args = parser.parse_args(argv)
    try:
        config = config_from_args(config_cls, presets, args)
        ref = load_ref(args.dataset)
        check_cache(config, ref)
        result = load_train()(config, ref, args.run_dir)
    # pydantic's ValidationError is a ValueError; FileExistsError: a run dir that is a file.
    except (ValueError, FileExistsError, DatasetError) as exc:
        print_error(f"{parser.prog}: error: ", exc, args.verbose)
        return 2
    print(json.dumps(result, sort_keys=True))
    return 0
