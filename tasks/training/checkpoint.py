"""Atomic, rotating training checkpoints, auto-resume, and the RNG states that make resume exact.

Layout: `<run_dir>/checkpoints/step_<9 digits>.pt`, one `torch.save` dict per file:

    {"format": 1, "step": int, "config": dict, "dataset_version": str, "rng": capture_rng(),
     ...task state: "model", "ema", "optimizer", "scheduler", "loader", "budget", ...}

Each file is written to a temporary name in the same folder, flushed and fsynced, then renamed into
place (rename is atomic on POSIX), so a reader never sees half a checkpoint under a final name. A
file that still fails to load (disk trouble, a truncated copy) is skipped with a warning and the
next older one is used. Files are read with `weights_only=True`: only tensors and plain containers,
so a checkpoint cannot run code; the numpy RNG state is therefore stored as a tensor.
"""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

FORMAT = 1
CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^step_(\d{9})\.pt$")
_REQUIRED = ("format", "step", "config", "dataset_version", "rng")


class ResumeMismatchError(ValueError):
    """A run dir's checkpoint was made with a different config or dataset version."""


class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> Any: ...


class GeneratorState:
    """A `torch.Generator` seen through the state_dict protocol (its state is a uint8 tensor)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def state_dict(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def make_state(
    step: int,
    config: dict[str, Any],
    dataset_version: str,
    parts: dict[str, Stateful],
    **extra: Any,
) -> dict[str, Any]:
    """A checkpoint dict: the bookkeeping keys, the global RNG states, and each part's state."""
    state = {
        "format": FORMAT,
        "step": step,
        "config": config,
        "dataset_version": dataset_version,
        "rng": capture_rng(),
    }
    state.update({name: part.state_dict() for name, part in parts.items()})
    state.update(extra)
    return state


def restore_state(checkpoint: dict[str, Any], parts: dict[str, Stateful]) -> None:
    """Load each part's state from `checkpoint`, then the global RNG states (last, so that nothing
    done while loading can advance them). Raises KeyError naming a part the checkpoint lacks."""
    for name, part in parts.items():
        if name not in checkpoint:
            raise KeyError(f"checkpoint at step {checkpoint['step']} has no {name!r} state")
        part.load_state_dict(checkpoint[name])
    restore_rng(checkpoint["rng"])


# ---------------------------------------------------------------- RNG states


def capture_rng() -> dict[str, Any]:
    """The global torch (CPU and every CUDA device), numpy and python RNG states."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert kind == "MT19937"
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "python": random.getstate(),
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng`; CUDA states are restored only when CUDA is present."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ---------------------------------------------------------------- files


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Final-named checkpoint files, newest (highest step) first."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)), reverse=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (which must hold the `_REQUIRED` keys) atomically; keep the newest `keep`.

    Returns the final path. Raises KeyError naming a missing required key, ValueError if keep < 1.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise KeyError(f"checkpoint state lacks {missing}")
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step_{state['step']:09d}.pt"
    tmp = folder / f".{final.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(folder)
    for old in list_checkpoints(run_dir)[keep:]:
        old.unlink(missing_ok=True)
    return final


def _load(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or any(k not in state for k in _REQUIRED):
        raise ValueError("not a train-cats checkpoint (required keys missing)")
    if state["format"] != FORMAT:
        raise ValueError(f"checkpoint format {state['format']}, this code reads {FORMAT}")
    return state


def load_latest(run_dir: str | Path) -> dict[str, Any] | None:
    """The newest checkpoint that loads, or None when there is none.

    Unreadable files are skipped with a RuntimeWarning that names them and the error; leftover
    temporary files of a process killed mid-write are deleted.
    """
    folder = checkpoint_dir(run_dir)
    if folder.is_dir():
        for leftover in folder.glob(".step_*.pt.tmp-*"):
            leftover.unlink(missing_ok=True)
    for path in list_checkpoints(run_dir):
        try:
            return _load(path)
        except Exception as exc:  # any failure to read means "not valid": try the older one
            warnings.warn(
                f"skipping unreadable checkpoint {path}: {type(exc).__name__}: {exc}",
                RuntimeWarning,
                stacklevel=2,
            )
    return None


def check_compatible(
    checkpoint: dict[str, Any],
    config: dict[str, Any],
    dataset_version: str,
    resumable: frozenset[str],
) -> list[str]:
    """Refuse to resume across a different config or dataset; return the changed resumable fields.

    Raises:
        ResumeMismatchError: naming every differing non-resumable field (old -> new) and/or the two
            dataset versions, and the way out (a new run dir, or the original values).
    """
    problems = []
    if checkpoint["dataset_version"] != dataset_version:
        problems.append(f"dataset version {checkpoint['dataset_version']!r} -> {dataset_version!r}")
    old = checkpoint["config"]
    changed_ok = []
    for name in sorted(set(old) | set(config)):
        if old.get(name) == config.get(name):
            continue
        if name in resumable:
            changed_ok.append(name)
        else:
            problems.append(f"{name}: {old.get(name)!r} -> {config.get(name)!r}")
    if problems:
        raise ResumeMismatchError(
            f"cannot resume step {checkpoint['step']}: "
            + "; ".join(problems)
            + ". Use a new --run-dir, or rerun with the checkpoint's values."
        )
    return changed_ok


def resume(
    run_dir: str | Path,
    config: dict[str, Any],
    dataset_version: str,
    resumable: frozenset[str],
    parts: dict[str, Stateful],
) -> tuple[int, bool, int | None]:
    """Restore `parts` from the newest valid checkpoint in `run_dir`, if there is one.

    Returns `(step, finished, resumed_from)`: the step to continue from (0 for a fresh run),
    whether the checkpoint marks a finished run whose length fields (`steps`,
    `time_budget_minutes`) are unchanged (nothing is left to train), and the checkpoint's step or
    None. Raises ResumeMismatchError as `check_compatible`.
    """
    state = load_latest(run_dir)
    if state is None:
        return 0, False, None
    changed = check_compatible(state, config, dataset_version, resumable)
    restore_state(state, parts)
    finished = bool(state.get("finished")) and not {"steps", "time_budget_minutes"} & set(changed)
    return state["step"], finished, state["step"]


class Cadence:
    """Decides when to checkpoint: every `every_steps` steps, or once `every_minutes` have passed
    since the last save (whichever comes first), so a preemption loses a bounded amount of work."""

    def __init__(self, every_steps: int, every_minutes: float) -> None:
        self.every_steps = every_steps
        self.every_s = every_minutes * 60.0
        self._last = time.monotonic()

    def due(self, step: int) -> bool:
        return step % self.every_steps == 0 or time.monotonic() - self._last >= self.every_s

    def saved(self) -> None:
        self._last = time.monotonic()
