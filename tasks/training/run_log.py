"""What a training run reports while it runs: metrics.jsonl rows, a tqdm bar, a progress callback.

`metrics.jsonl` gets one JSON object per line, appended and flushed at once, so a preempted run
leaves every row it logged. Rows of kind "train" carry `{"step", "total_steps", "loss", "lr",
"images_per_s", "time_s"}`; evaluation rows carry their own fields and a `"kind"`. On resume, rows
beyond the checkpoint's step (logged after it by the killed process) are dropped first, so the file
reads as one run.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from tasks.paths import METRICS

Progress = Callable[[dict[str, Any]], None]


class RunLog:
    """Appends metrics rows, drives the bar and calls `progress` at each training log row.

    Args:
        run_dir: the run folder; `metrics.jsonl` lives there.
        total_steps: initial plan (updated with `set_total`).
        start_step: steps already done (non-zero when resuming); rows past it are discarded.
        progress: optional callable receiving {"step", "total_steps", "loss", "lr", "images_per_s"}.
        bar: show a tqdm progress bar (on stderr).
        writer: False for the data-parallel ranks other than 0, which keep the accounting (and
            the non-finite loss check) but write nothing.
    """

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        start_step: int,
        progress: Progress | None = None,
        bar: bool = True,
        desc: str = "train",
        writer: bool = True,
    ) -> None:
        self.path = Path(run_dir) / METRICS
        self.writer = writer
        self.progress = progress if writer else None
        if writer:
            self._truncate_after(start_step)
        self._bar = tqdm(
            total=total_steps,
            initial=start_step,
            desc=desc,
            disable=not (bar and writer),
            dynamic_ncols=True,
        )
        self._t0 = time.monotonic()
        self._loss_sum: torch.Tensor | float = 0.0
        self._count = 0
        self._images = 0
        self._t_window = time.monotonic()

    def _truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill mid-write
            if row.get("step", 0) <= step:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, row: dict[str, Any]) -> None:
        if not self.writer:
            return
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")

    def set_total(self, total_steps: int) -> None:
        if self._bar.total != total_steps:
            self._bar.total = total_steps
            self._bar.refresh()

    def step(
        self,
        step: int,
        loss: torch.Tensor,
        lr: float,
        batch_size: int,
        total_steps: int,
        every: int,
    ) -> dict[str, Any] | None:
        """Account one step; log a row every `every` steps and at `total_steps`.

        `loss` is a 0-d tensor, summed on its device and read back only at log steps, so a CUDA
        run does not synchronise every step. Returns the logged row, or None between log steps.
        Raises FloatingPointError on a non-finite mean loss, naming the step, because training
        further would only waste the budget.
        """
        self._loss_sum = self._loss_sum + loss.detach().float()
        self._count += 1
        self._images += batch_size
        self._bar.update(1)
        if step % every and step != total_steps:
            return None
        mean_loss = float(self._loss_sum) / self._count
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"loss is {mean_loss} at step {step}; lower lr or raise warmup_steps"
            )
        now = time.monotonic()
        row = {
            "kind": "train",
            "step": step,
            "total_steps": total_steps,
            "loss": mean_loss,
            "lr": lr,
            "images_per_s": self._images / max(now - self._t_window, 1e-9),
            "time_s": now - self._t0,
        }
        self._loss_sum, self._count, self._images, self._t_window = 0.0, 0, 0, now
        self.write(row)
        self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.2e}")
        if self.progress is not None:
            self.progress(
                {k: row[k] for k in ("step", "total_steps", "loss", "lr", "images_per_s")}
            )
        return row

    def close(self) -> None:
        self._bar.close()
