"""The autoguidance guide of a DiT run: an early EMA snapshot, kept once and exported.

Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself" (arXiv:2406.02507),
§3: guide a model with a weaker version of itself trained on the same task, so that the two make
the same kinds of errors, more strongly in the weaker one. Its §5 finds that a shorter-trained
snapshot of the same model works; here the guide is the EMA shadow when the run first reaches
`guide_snapshot_fraction` of its planned steps (`TrainingRun.total`, re-planned under a time
budget, so "first reaches" is judged against the plan of that step).

The snapshot is written into the run dir (`guide_snapshot.safetensors`, its step in the file's
metadata) as soon as it is due, atomically (a temporary file, then a rename), and never again: a
resumed run finds it on disk and keeps it, so the guide does not depend on where a run was
interrupted. The export copies it to `guide.safetensors` beside `model.safetensors` and names it
in `config.json` as `"guide": {"file": "guide.safetensors", "step": N}`;
`tasks.exported.load_guide` reads it back.
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tasks.training.export import plain_state_dict

GUIDE = "guide.safetensors"
SNAPSHOT = "guide_snapshot.safetensors"


class GuideSnapshot:
    """The run dir's guide snapshot: when it is due, writing it once, loading and exporting it.

    Args:
        run_dir: the training run dir (an existing snapshot there is kept).
        fraction: `DiTConfig.guide_snapshot_fraction` in [0, 1); 0 = no guide.

    Attributes:
        step: the training step the snapshot was taken at, or None while there is none.
    """

    def __init__(self, run_dir: str | Path, fraction: float) -> None:
        self.path = Path(run_dir) / SNAPSHOT
        self.fraction = fraction
        self.step = _snapshot_step(self.path) if self.path.is_file() else None
        self._model: torch.nn.Module | None = None

    def due(self, step: int, total: int) -> bool:
        """Whether to take the snapshot now: a guide is wanted, none is on disk, and `step`
        optimizer updates have reached `fraction` of the `total` planned."""
        return self.fraction > 0 and self.step is None and step >= self.fraction * total

    def take(self, shadow: torch.nn.Module, step: int) -> Path:
        """Write `shadow`'s weights (the EMA model) as the snapshot of `step`; returns its path.

        Raises:
            FileExistsError: a snapshot exists already (it is never overwritten).
        """
        if self.path.exists():
            raise FileExistsError(f"{self.path} exists; the guide snapshot is written only once")
        tmp = self.path.with_name(f".{SNAPSHOT}.{os.getpid()}.tmp")
        weights = {k: v.clone() for k, v in plain_state_dict(shadow).items()}
        save_file(weights, str(tmp), metadata={"step": str(step)})
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)  # atomic: a reader never sees half a snapshot
        self.step = step
        self._model = None
        return self.path

    def model(self, like: torch.nn.Module) -> torch.nn.Module | None:
        """The snapshot as an `eval()` copy of `like` (same architecture and device), for the
        sample grids drawn during training; None while there is no snapshot."""
        if self.step is None:
            return None
        if self._model is None:
            guide = copy.deepcopy(like).eval().requires_grad_(False)
            device = next(like.parameters()).device
            guide.load_state_dict(load_file(str(self.path), device=str(device)))
            self._model = guide
        return self._model

    def export(self, run_dir: str | Path) -> dict[str, Any]:
        """Copy the snapshot to `run_dir/guide.safetensors` (atomically, readable like the
        config) and return the `config.json` entry `{"guide": {"file", "step"}}`, or `{}`
        without a snapshot. Call before `write_export`, which writes `config.json` last, so
        that the config names only a complete guide file."""
        if self.step is None:
            return {}
        target = Path(run_dir) / GUIDE
        tmp = target.with_name(f".{GUIDE}.{os.getpid()}.tmp")
        shutil.copyfile(self.path, tmp)
        # safetensors wrote the snapshot 0600; give the copy the umask's mode, as the config has.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
        return {"guide": {"file": GUIDE, "step": self.step}}


def _snapshot_step(path: Path) -> int:
    with safe_open(str(path), framework="pt") as fh:
        return int((fh.metadata() or {})["step"])
