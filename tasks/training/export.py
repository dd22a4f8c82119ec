"""A finished model as two files: `model.safetensors` (weights) and `config.json` (how to rebuild).

`config.json` always holds `"kind"` ("classifier" or "dit"), the architecture arguments, `classes`
(index == label id), `image_size` (px) and `normalisation` (`mean`/`std` per RGB channel, applied to
pixels scaled to [0, 1]); the task modules add their own fields. Both files are first written into
a temporary folder inside the run dir, then renamed into place, weights before config, so a
`config.json` on disk always describes complete weights next to it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
_COMPILE_PREFIX = "_orig_mod."


def plain_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` with any torch.compile `_orig_mod.` prefix removed, on the CPU.

    A compiled model (`torch.compile(m)`) reports its keys as `_orig_mod.<name>`; stripping the
    prefix makes checkpoints and exports load into a plain, uncompiled model.
    """
    state = module.state_dict()
    return {
        key.replace(_COMPILE_PREFIX, ""): value.detach().to("cpu").contiguous()
        for key, value in state.items()
    }


def write_export(
    run_dir: str | Path, weights: dict[str, torch.Tensor], config: dict[str, Any]
) -> dict[str, str]:
    """Write model.safetensors + config.json into `run_dir` atomically; returns their paths."""
    for key in ("kind", "classes", "image_size", "normalisation"):
        if key not in config:
            raise KeyError(f"export config lacks {key!r}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=run_dir))
    try:
        # safetensors refuses tensors that share storage; clone makes each one its own.
        save_file({k: v.clone() for k, v in weights.items()}, str(staging / WEIGHTS))
        (staging / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # safetensors writes its file 0600; give it the umask's mode, as the config has, so that
        # the others who read a shared runs folder can load the weights too.
        os.chmod(staging / WEIGHTS, (staging / CONFIG).stat().st_mode & 0o777)
        for name in (WEIGHTS, CONFIG):
            with open(staging / name, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(staging / name, run_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"weights": str(run_dir / WEIGHTS), "config": str(run_dir / CONFIG)}


def read_export_config(path: str | Path, kind: str) -> tuple[Path, dict[str, Any]]:
    """The export folder (of `path`, or of the folder holding a given export file) and its
    `config.json`, checked without reading the weights.

    Raises:
        FileNotFoundError: naming the missing file.
        ValueError: unreadable JSON (named), or an export of another kind (e.g. a classifier
            passed to `load_dit`).
    """
    folder = Path(path).expanduser().resolve()
    if folder.is_file():
        folder = folder.parent
    for name in (WEIGHTS, CONFIG):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{folder / name} not found: pass a finished run dir holding {WEIGHTS} and {CONFIG}"
            )
    try:
        config = json.loads((folder / CONFIG).read_text())
    except ValueError as exc:
        raise ValueError(
            f"{folder / CONFIG} is not valid JSON ({exc}); re-export or retrain"
        ) from exc
    if not isinstance(config, dict) or config.get("kind") != kind:
        found = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{folder} holds a {found!r} export, expected {kind!r}")
    return folder, config


def read_export(path: str | Path, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Weights and config of an export folder (see `read_export_config`).

    Raises:
        FileNotFoundError / ValueError: as `read_export_config`, or a damaged safetensors file
            (named).
    """
    folder, config = read_export_config(path, kind)
    try:
        weights = load_file(str(folder / WEIGHTS))
    except Exception as exc:  # safetensors raises its own (Rust) error type for damaged files
        raise ValueError(
            f"{folder / WEIGHTS} is not a readable safetensors file ({exc}); re-export or retrain"
        ) from exc
    return weights, config


def load_weights(
    model: torch.nn.Module, weights: dict[str, torch.Tensor], path: str | Path
) -> None:
    """`model.load_state_dict(weights, strict=True)`, failing with a ValueError that names the
    export when its weights do not fit the architecture its `config.json` describes."""
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        raise ValueError(
            f"{path}: {WEIGHTS} does not fit the architecture in {CONFIG} ({exc}); "
            "re-export or retrain"
        ) from exc


def require_consistent(path: str | Path, checks: dict[str, tuple[Any, Any]]) -> None:
    """Raise a ValueError naming every `name: (a, b)` pair of `config.json` fields that disagree
    (a hand-edited or mixed-up export would otherwise load and sample at the wrong size)."""
    bad = [f"{name}: {a!r} != {b!r}" for name, (a, b) in checks.items() if a != b]
    if bad:
        raise ValueError(f"{path}: {CONFIG} contradicts itself ({'; '.join(bad)}); re-export")
