"""Learning-rate schedule: linear warm-up, then cosine decay to a floor.

The cosine schedule is SGDR's (Loshchilov & Hutter 2017, "SGDR", eq. 5) without restarts; the
linear warm-up is Goyal et al. 2017 ("Accurate, Large Minibatch SGD", §2.2). The total step count
is mutable (`set_total_steps`) because a time budget only learns it after measuring throughput.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class WarmupCosine:
    """Sets every param group's `lr` for the next optimizer step.

    Step `s` (0-based count of updates already applied) gets
    - `base_lr * (s + 1) / warmup_steps` while `s < warmup_steps`,
    - otherwise `min_lr + (base_lr - min_lr) * (1 + cos(pi * p)) / 2` with
      `p = clamp((s - warmup_steps) / max(1, total_steps - warmup_steps), 0, 1)`.

    Raises:
        ValueError: `base_lr <= 0`, `warmup_steps < 0`, `total_steps < 1` or a ratio outside [0, 1].
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        base_lr: float,
        warmup_steps: int,
        total_steps: int,
        min_lr_ratio: float = 0.1,
    ) -> None:
        if base_lr <= 0 or warmup_steps < 0 or not 0 <= min_lr_ratio <= 1:
            raise ValueError(
                f"bad schedule: base_lr={base_lr} (> 0), warmup_steps={warmup_steps} (>= 0), "
                f"min_lr_ratio={min_lr_ratio} (in [0, 1])"
            )
        self.optimizer = optimizer
        self.base_lr = base_lr
        self.warmup_steps = warmup_steps
        self.min_lr_ratio = min_lr_ratio
        self.total_steps = 1
        self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = int(total_steps)

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.base_lr * (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        floor = self.base_lr * self.min_lr_ratio
        return floor + (self.base_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def apply(self, step: int) -> float:
        """Write the LR for update number `step` into the optimizer; returns it."""
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        return {
            "base_lr": self.base_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "min_lr_ratio": self.min_lr_ratio,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base_lr = float(state["base_lr"])
        self.warmup_steps = int(state["warmup_steps"])
        self.min_lr_ratio = float(state["min_lr_ratio"])
        self.set_total_steps(int(state["total_steps"]))
