"""Where and how a training step runs: device, autocast precision, fused AdamW, torch.compile,
the data path, DDP, and the CUDA switches an expert expects (`cuda_settings`)."""

from __future__ import annotations

import contextlib
import random
from typing import Any, Literal

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from data.loader import HostRows, PackedBatches, ResidentRows, Split, fits_on_device
from tasks.training.distributed import Ranks


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
    device = torch.device(name)
    if device.type == "cuda":
        cuda_settings()
    return device


def cuda_settings() -> None:
    """The CUDA switches a training wants, each for a reason:

    - TF32 for the float32 matmuls and convolutions left outside bf16 autocast (on Ampere and
      later, 8x the fp32 throughput at a 10-bit mantissa, which SGD noise dwarfs);
    - `cudnn.benchmark`: the trainings' shapes are fixed (one batch size, one crop size per
      phase), so timing cuDNN's algorithms once per shape pays for itself within a few steps.
    """
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


Precision = Literal["auto", "fp32", "bf16"]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware, where oneDNN's bf16 kernels beat fp32:

    - AMX tiles (Intel Sapphire Rapids and later): a bf16 matmul 5.7x fp32 on machine A
      (1.9 TFLOP/s against 0.33);
    - AVX-512 BF16 dot products (Intel Cooper Lake, AMD Zen 4 and later): the `cpu-small`
      classifier trains at 1.8x the images/s of fp32 and the DiT at 1.45x on machine J.

    Without either, oneDNN emulates bf16, slower than fp32 (machine B); docs/benchmarks.md names
    the machines. torch exposes the checks only privately, so a torch without them means "no"."""
    names = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    checks = [getattr(torch.cpu, name, None) for name in names]
    return any(check is not None and check() for check in checks)


def resolve_precision(device: torch.device, precision: Precision) -> Literal["fp32", "bf16"]:
    """`auto` -> bf16 on CUDA and on CPUs with native bf16 (`cpu_has_native_bf16`), fp32
    elsewhere. Explicit values are returned unchanged."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" or cpu_has_native_bf16() else "fp32"


def autocast(
    device: torch.device, precision: Precision = "auto"
) -> contextlib.AbstractContextManager:
    """bf16 autocast where `resolve_precision` says bf16 (range of fp32, so no loss scaling is
    needed; weights, optimizer state and losses stay fp32), plain fp32 otherwise."""
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sdpa_backend(name: Literal["auto", "math"]) -> contextlib.AbstractContextManager:
    """`auto`: torch picks the attention kernel (flash on the CPU). `math`: the unfused
    softmax(QK^T/sqrt(d))V path, whose plain bf16 matmuls beat the CPU flash kernel's backward for
    short sequences (64 tokens: 0.31 against 0.38 s per DiT-Ti/4 training step here)."""
    if name == "math":
        return sdpa_kernel(SDPBackend.MATH)
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


# The hidden layers' matrices that Muon orthogonalises: the transformer blocks and U-ViT skips.
MUON_MODULES = ("blocks", "skip_projections")


def build_optimizer(
    model: torch.nn.Module, name: str, lr: float, weight_decay: float
) -> torch.optim.Optimizer | MuonAdamW:
    """`build_adamw`, or for `name="muon"` a `MuonAdamW` over the same parameters."""
    if name == "muon":
        return MuonAdamW(model, lr, weight_decay)
    return build_adamw(model, lr, weight_decay)


class MuonAdamW:
    """Muon for the transformer blocks' 2-D weight matrices, AdamW for every other parameter.

    Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
    `torch.optim.Muon`) replaces each matrix's momentum update by its nearest semi-orthogonal
    matrix (5 Newton-Schulz steps), which equalises the update's singular values. It is meant for
    hidden layers only: embeddings, the output layer, convolutions, biases and gains stay with
    AdamW (`build_adamw`). Muon's step is scaled to match AdamW's update RMS
    (`adjust_lr_fn="match_rms_adamw"`, Liu et al. 2025, "Muon is Scalable for LLM Training", §2.2),
    so one learning rate and one schedule drive both.

    Quacks like one optimizer for the loop, the LR schedule (`param_groups`) and checkpoints
    (`state_dict`). Matrices are chosen by module name: a parameter under a module named in
    `MUON_MODULES` (at any depth, so wrappers such as REPA's are fine) with `ndim == 2`.

    Raises:
        ValueError: the model has no such matrix (Muon would do nothing; use AdamW).
    """

    def __init__(self, model: torch.nn.Module, lr: float, weight_decay: float):
        matrices, rest = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            hidden = param.ndim == 2 and any(p in MUON_MODULES for p in name.split("."))
            (matrices if hidden else rest).append((name, param))
        if not matrices:
            raise ValueError(
                f"optimizer=muon found no 2-D weights under {MUON_MODULES}; use optimizer=adamw"
            )
        self.muon = torch.optim.Muon(
            [p for _, p in matrices],
            lr=lr,
            weight_decay=weight_decay,
            adjust_lr_fn="match_rms_adamw",
        )
        holder = torch.nn.ParameterDict({str(i): p for i, (_, p) in enumerate(rest)})
        self.adamw = build_adamw(holder, lr, weight_decay)
        self.optimizers = (self.muon, self.adamw)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every group of both optimizers (the same dicts: setting `lr` here sets it there)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def maybe_compile(model: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`torch.compile(model)` when enabled. The compiled wrapper shares parameters with `model`;
    save `model` (or strip `_orig_mod.` with `tasks.training.export.plain_state_dict`), never the wrapper."""
    return torch.compile(model) if enabled else model


def training_batches(
    split: Split, config: Any, device: torch.device, ranks: Ranks
) -> PackedBatches:
    """This rank's training batches, from the device when the split fits there.

    With `config.device_cache_fraction` > 0 and the split's uint8 cache within that share of the
    device's memory, it is copied once (`ResidentRows`; on the CPU into RAM): a batch is then an
    on-device gather and the augmentation runs where the model does. Otherwise batches come from
    the memory map (`HostRows`), prefetched one ahead on CUDA, through pinned memory.
    """
    if fits_on_device(split, device, config.device_cache_fraction):
        source = ResidentRows(split, device)
    else:
        source = HostRows(split, device)
    return PackedBatches(
        split,
        config.batch_size,
        config.seed,
        rank=ranks.rank,
        world_size=ranks.world_size,
        source=source,
        prefetch=isinstance(source, HostRows) and device.type == "cuda",
    )


def data_parallel(model: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """`model` in DistributedDataParallel when several ranks train it, else `model` itself.

    DDP broadcasts rank 0's parameters and buffers at construction and all-reduces (averages) the
    gradients in buckets during `backward()`, overlapped with it (Li et al. 2020, "PyTorch
    Distributed", §3.2). BatchNorm keeps per-rank batch statistics (torchvision's reference
    recipes' default); DDP broadcasts rank 0's running statistics before each forward.
    """
    if not ranks.enabled:
        return model
    return DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
