"""Representation alignment (REPA; Yu et al. 2025, "Representation Alignment for Generation:
Training Diffusion Transformers Is Easier Than You Think", §3).

The hidden tokens h_t of an early DiT block, computed on the noisy x_t, are mapped by a small
trainable projector h_phi and pulled towards a frozen teacher's features y* of the clean x0 at the
same image location:

    L_REPA = -E[ 1/N sum_n sim(y*[n], h_phi(h_t[n])) ]        (paper eq. 8; sim = cosine)

and the DiT trains on `L_flow + repa_weight * L_REPA`. The paper's teacher is DINOv2; here it is
a trained classifier export (`tasks.exported.load_classifier`): its last spatial feature map,
resampled to the DiT's token grid (input_size / patch_size)^2.

- `load_teacher(spec)`: the frozen `Teacher` (eval, no gradients) and its identity, or one-line
  errors for a missing or unusable export.
- `AlignedDiT(dit, teacher_channels, depth, hidden)`: the DiT and the projector as one module, so
  that one optimizer, one gradient clip and DistributedDataParallel (which averages the gradients
  of the module it wraps) cover both; a forward hook on `dit.blocks[depth - 1]` captures the
  tokens, and `projected` holds their projection after each forward.
- `repa_loss(projected, targets)`: eq. 8, and `RepaLog`, the metrics.jsonl rows of the term.

The projector is trained and checkpointed with the DiT (a `TrainingRun` part); it is not exported.

Never use the evaluation judge as the teacher: the judge's Fréchet distance and conditional
accuracy are measured in its own features, which REPA trains the DiT towards, so the figures
would be gamed rather than earned (`benchmarks/bench_recipes.py` refuses it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from data.dataset import sha256_file
from models.classifier import Classifier, build_classifier
from tasks.champions import resolve
from tasks.exported import load_classifier
from tasks.training.distributed import Ranks, mean_across
from tasks.training.export import WEIGHTS


class Teacher(nn.Module):
    """A frozen classifier export as REPA's target encoder.

    Attributes:
        net: the classifier, in eval mode with `requires_grad=False` (always: `train()` is a
            no-op, so BatchNorm statistics never move).
        image_size: the export's input size S.
        channels: C, the width of its last spatial feature map.
        identity: JSON-able {source, path, weights_sha256, backbone, image_size,
            dataset_version, classes}, recorded in the DiT export so a report can tell.
    """

    def __init__(self, net: Classifier, identity: dict[str, Any]) -> None:
        super().__init__()
        config = net.export_config
        self.net = net.eval().requires_grad_(False)
        self.image_size = int(config["image_size"])
        self.identity = identity
        norm = config["normalisation"]
        self.register_buffer("mean", torch.tensor(norm["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(norm["std"]).view(1, 3, 1, 1), persistent=False)
        probe = torch.zeros(1, 3, self.image_size, self.image_size)
        with torch.no_grad():
            _, self.channels, h, w = self.net.forward_feature_map(
                (probe - self.mean) / self.std
            ).shape
        if (flat := _flat_reason(config, h, w)) is not None:
            raise ValueError(
                f"repa_teacher={identity['source']!r}: {flat}; use a teacher trained with "
                "small_input_stem or at a larger image_size"
            )

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # frozen: eval mode whatever a caller asks

    @torch.no_grad()
    def forward(self, x0: torch.Tensor, grid: int) -> torch.Tensor:
        """The alignment targets y*.

        Args:
            x0: (B, 3, H, W) float, the DiT's clean images in [-1, 1].
            grid: the DiT's token grid side g = input_size / patch_size.

        Returns:
            (B, g*g, C) float32, row-major over the grid like the DiT's tokens.
        """
        # The same input pipeline as the evaluation's (tasks/evaluation/measure.py): [0, 1],
        # antialiased bilinear resize to the export's size, the export's normalisation.
        x = ((x0.float() + 1.0) / 2.0).clamp(0.0, 1.0)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bilinear", antialias=True)
        fmap = self.net.forward_feature_map((x - self.mean) / self.std).float()
        if fmap.shape[-2:] != (grid, grid):
            fmap = F.interpolate(fmap, size=grid, mode="bilinear", antialias=True)
        return fmap.flatten(2).transpose(1, 2)


def flat_feature_map(config: dict[str, Any]) -> str | None:
    """Why a classifier export with this `config.json` could not teach REPA, or None: a last
    feature map of 1x1 at its `image_size` leaves nothing spatial to align (the check `Teacher`
    makes on the loaded export). The architecture is built without its weights, so the flow
    can ask before any work, whatever backend holds the export (well under a second on a CPU).
    """
    net = build_classifier(
        config["backbone"], int(config["num_classes"]), small_input_stem=config["small_input_stem"]
    ).eval()
    size = int(config["image_size"])
    with torch.no_grad():
        _, _, h, w = net.forward_feature_map(torch.zeros(1, 3, size, size)).shape
    return _flat_reason(config, h, w)


def _flat_reason(config: dict[str, Any], h: int, w: int) -> str | None:
    """The words for an (h, w) last feature map with nothing spatial to align, or None."""
    if h * w > 1:
        return None
    return (
        f"its last feature map at its {config['image_size']} px is 1x1 ({config['backbone']}, "
        f"small_input_stem={config['small_input_stem']}), nothing spatial to align"
    )


def load_teacher(spec: str) -> Teacher:
    """The frozen teacher from `spec`, a classifier export folder or "champion:<deployment>", on
    the CPU (move it with `.to(device)`). Cheap: call it before any other work.

    Raises:
        ValueError: one line naming `repa_teacher`: no export there (or no champion), not a
            classifier export, damaged files, or a 1x1 last feature map.
    """
    try:
        folder = resolve(spec, "classifier")
        net = load_classifier(folder)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"repa_teacher={spec!r}: {exc}") from exc
    config = net.export_config
    identity = {
        "source": spec,
        "path": str(Path(folder).resolve()),
        "weights_sha256": sha256_file(Path(folder) / WEIGHTS),
        "backbone": config["backbone"],
        "image_size": config["image_size"],
        "dataset_version": config.get("dataset_version"),
        "classes": list(config["classes"]),
    }
    return Teacher(net, identity)


class AlignedDiT(nn.Module):
    """The DiT plus REPA's projector h_phi, trained as one module.

    `forward` is the DiT's (same arguments, same (B, C, S, S) velocity); as a side effect it sets
    `projected`, (B, T, C_teacher) in the computation's dtype: the projector applied to the
    output tokens (B, T, D) of block `depth` (1-based), captured by a forward hook so that the
    DiT's code stays untouched. The projector is the paper's MLP (its §4: three linear layers
    with SiLU, D -> hidden -> hidden -> C_teacher).

    Raises:
        ValueError: `depth` outside 1..len(dit.blocks).
    """

    def __init__(self, dit: nn.Module, teacher_channels: int, depth: int, hidden: int) -> None:
        super().__init__()
        if not 1 <= depth <= len(dit.blocks):
            raise ValueError(f"repa_depth={depth} must be between 1 and depth={len(dit.blocks)}")
        self.dit = dit
        width = dit.config["hidden_size"]  # D, the width of every block's tokens
        self.projector = nn.Sequential(
            nn.Linear(width, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, teacher_channels),
        )
        self.projected: torch.Tensor | None = None
        self._tokens: list[torch.Tensor] = []
        # A closure over this list, not a bound method: the EMA's deepcopy of the DiT (made before
        # this module) has no hook, and none that could drag this module into a copy.
        self._hook = dit.blocks[depth - 1].register_forward_hook(
            lambda module, args, out, store=self._tokens: store.append(out)
        )

    @property
    def class_dropout_prob(self) -> float:
        return self.dit.class_dropout_prob  # what flow_matching_loss reads for CFG dropout

    def forward(self, x, t, y, force_drop_ids=None) -> torch.Tensor:
        self._tokens.clear()
        out = self.dit(x, t, y, force_drop_ids=force_drop_ids)
        (tokens,) = self._tokens  # exactly one pass through the block per forward
        self._tokens.clear()
        self.projected = self.projector(tokens)
        return out


def repa_loss(projected: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Paper eq. 8: minus the mean over images and tokens of the cosine similarity.

    projected: (B, T, C) any float dtype; targets: (B, T, C) float32 (no gradient).
    Returns a float32 scalar in [-1, 1]. Raises ValueError on shapes that differ.
    """
    if projected.shape != targets.shape:
        raise ValueError(
            f"REPA projection {tuple(projected.shape)} and teacher targets "
            f"{tuple(targets.shape)} differ; the token grid and the teacher's channels must agree"
        )
    return -F.cosine_similarity(projected.float(), targets, dim=-1).mean()


class RepaLog:
    """The REPA term's metrics.jsonl rows: `{"kind": "repa", "step", "repa_cosine"}` (the mean
    cosine similarity since the last row, over every rank) at the trainer's log steps."""

    def __init__(self, log_every: int, ranks: Ranks) -> None:
        self.log_every, self.ranks = log_every, ranks
        self._sum: torch.Tensor | float = 0.0
        self._count = 0
        self.last: float | None = None

    def step(self, run: Any, loss: torch.Tensor) -> None:
        """After `run.step_done` (a `tasks.training.run.TrainingRun`); every rank calls it, as
        the mean over ranks is a collective at the same steps on all of them."""
        self._sum = self._sum + (-loss.detach().float())  # summed on the device: no sync
        self._count += 1
        if run.step % self.log_every and run.step != run.total:
            return
        self.last = float(mean_across(self._sum / self._count, self.ranks))
        self._sum, self._count = 0.0, 0
        run.log.write({"kind": "repa", "step": run.step, "repa_cosine": self.last})
