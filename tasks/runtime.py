"""Where and how a training step runs: device, autocast precision, fused AdamW, torch.compile."""

from __future__ import annotations

import contextlib
import random
from typing import Literal

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed the global torch, numpy and python RNGs (model initialisation, augmentations)."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def pick_device(
    name: Literal["auto", "cpu", "cuda"], num_threads: int | None = None
) -> torch.device:
    """`auto` -> CUDA when available, else the CPU; sets torch's CPU threads when given.

    Raises RuntimeError for `cuda` without CUDA.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "device='cuda' but CUDA is not available here; use device='cpu' or 'auto'"
        )
    return torch.device(name)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (range of fp32, so no loss scaling is needed); plain fp32 elsewhere,
    because CPU bf16 matmuls are slower than fp32 on machines without AMX."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def build_adamw(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with decay on matrices/kernels only.

    Biases, norm gains and embeddings' 1-D vectors are not decayed (the usual transformer practice,
    e.g. nanoGPT). The fused kernel is used on CUDA, and on the CPU where this torch supports it.
    """
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except RuntimeError:
        # Builds without a fused kernel for this device: torch picks its next fastest path.
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile(model)` when enabled. The compiled wrapper shares parameters with `model`;
    save `model` (or strip `_orig_mod.` with `tasks.export.plain_state_dict`), never the wrapper."""
    return torch.compile(model) if enabled else model
