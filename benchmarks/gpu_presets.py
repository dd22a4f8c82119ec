"""The arithmetic behind the `gpu` presets, printed as the table of docs/gpu_presets.md.

For each model's `gpu` preset: parameters; FLOPs per training image (forward + backward of one
training step, counted by `torch.utils.flop_counter.FlopCounterMode` on the meta device, so nothing
is computed and the count is exact for the shapes); the images/s expected on a GPU from its
published dense bf16 peak times a stated model-FLOP utilisation (MFU); and the optimizer steps and
epochs that 60 minutes, and the preset's own run, buy on the default data set. No GPU measurement
exists yet: `benchmarks/gpu_check.py` measures the real figures.

    .venv/bin/python -m benchmarks.gpu_presets [--gpu L40S]

tests/test_gpu_presets.py fails when docs/gpu_presets.md's table and this script's disagree.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from tasks.paths import DEFAULT_GPU

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s. The L40S
# sheet gives 362.05 dense (733 with 2:4 sparsity); H100 and H200 are the SXM parts Modal rents.
BF16_DENSE_TFLOPS = {"L40S": 362.05, "A100": 312.0, "H100": 989.4, "H200": 989.4, "L4": 121.0}

# The assumed MFU on the default GPU; the reasons are in docs/gpu_presets.md ("Expected speed").
# DiT-S at width 384: GEMMs of arithmetic intensity <= ~300 FLOP/byte, under the L40S's ridge
# of ~420, plus memory-bound LayerNorm/adaLN/GELU and flash attention at head dim 64.
# ResNet-50: tuned MLPerf code reaches ~25% on an A100; a plain PyTorch stack with BatchNorm on
# the L40S's 864 GB/s memory reaches less.
ASSUMED_MFU = {"dit": 0.25, "classifier": 0.15}

# Share of a budgeted run that is not training steps: start-up, torch.compile, sample grids or
# validation passes, checkpoints and the budget's reserve (3% plus the finishing work).
OVERHEAD = 0.10

# The default data sets: the `dit` deployment trains on the 12 Oxford cat breeds (max_other 0),
# the `classifier` deployment on them plus 1,000 non-cats as `other`. Per-breed counts of the
# official archive's cat images.
OXFORD_CAT_BREEDS = {
    "Abyssinian": 198,
    "Bengal": 200,
    "Birman": 200,
    "Bombay": 184,
    "British_Shorthair": 200,
    "Egyptian_Mau": 190,
    "Maine_Coon": 200,
    "Persian": 200,
    "Ragdoll": 200,
    "Russian_Blue": 200,
    "Siamese": 199,
    "Sphynx": 200,
}
OTHER_CLASS = 1_000
VAL_FRACTION = 0.1


def train_images(counts: list[int], val_fraction: float = VAL_FRACTION) -> int:
    """Training-split size: data.pack.stratified_split holds out round(n * fraction) per class."""
    return sum(n - round(n * val_fraction) for n in counts)


def default_data(model: str) -> dict[str, int]:
    """{"classes", "train_images"} of `model`'s default data set (the deployment's)."""
    counts = list(OXFORD_CAT_BREEDS.values())
    if model == "classifier":
        counts.append(OTHER_CLASS)
    return {"classes": len(counts), "train_images": train_images(counts)}


def build_on_meta(model: str, config: Any, num_classes: int) -> torch.nn.Module:
    """The preset's network on the meta device (shapes only; pretrained weights are not read)."""
    with torch.device("meta"):
        if model == "dit":
            from models.dit import DiT

            return DiT(**config.architecture(num_classes))
        from models.classifier import build_classifier

        return build_classifier(config.backbone, num_classes, None, config.small_input_stem)


def flops_per_image(model: str, config: Any, num_classes: int, batch: int = 2) -> float:
    """FLOPs of one training step's forward + backward, per image, at the preset's resolution.

    Counted on the meta device, where attention runs as two counted matmuls; on the CPU, torch's
    fused flash-attention kernel is not counted by FlopCounterMode, on CUDA it is.
    """
    net = build_on_meta(model, config, num_classes)
    size = getattr(config, "train_size", config.image_size)
    with torch.device("meta"):
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        if model == "dit":
            from models.flow_matching import flow_matching_loss

            loss = flow_matching_loss(net, x, y, config.time_schedule)
        else:
            loss = F.cross_entropy(net(x), y, label_smoothing=config.label_smoothing)
        loss.backward()
    return counter.get_total_flops() / batch


def preset_figures(model: str, preset: str = "gpu", gpu: str = DEFAULT_GPU) -> dict[str, Any]:
    """The table row of `model`'s `preset` on `gpu` (see the module docstring)."""
    from tasks.train import build_config

    config = build_config(model, preset)
    data = default_data(model)
    net = build_on_meta(model, config, data["classes"])
    params = sum(p.numel() for p in net.parameters())
    flops = flops_per_image(model, config, data["classes"])
    images_per_s = BF16_DENSE_TFLOPS[gpu] * 1e12 * ASSUMED_MFU[model] / flops

    def steps_in(minutes: float) -> int:
        return int(images_per_s * minutes * 60 * (1 - OVERHEAD) / config.batch_size)

    # The preset's own run ends at its time budget or at `steps`, whichever comes first.
    hour = steps_in(60.0)
    budget = config.time_budget_minutes
    run = min(config.steps, steps_in(budget)) if budget else config.steps
    per_epoch = data["train_images"] / config.batch_size
    return {
        "model": model,
        "preset": preset,
        "gpu": gpu,
        "params": params,
        "gflops_per_image": flops / 1e9,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "mfu": ASSUMED_MFU[model],
        "images_per_s": images_per_s,
        "steps_per_hour": hour,
        "epochs_per_hour": hour / per_epoch,
        "budget_minutes": config.time_budget_minutes,
        "run_steps": run,
        "run_epochs": run / per_epoch,
        "run_train_minutes": run * config.batch_size / images_per_s / 60,
        "train_images": data["train_images"],
        "params_per_image": params / data["train_images"],
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as the markdown table that docs/gpu_presets.md embeds verbatim."""
    gpu = rows[0]["gpu"]
    lines = [
        f"| preset | params | GFLOP/img (fwd+bwd) | batch × px | MFU | img/s on {gpu} "
        "| steps / 60 min | epochs / 60 min | its run: budget; steps, epochs, minutes of steps "
        "| train images | params / image |",
        "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} `{r['preset']}` | {r['params'] / 1e6:.1f}M "
            f"| {r['gflops_per_image']:.1f} | {r['batch_size']} × {r['image_size']} "
            f"| {r['mfu']:.0%} | {r['images_per_s']:,.0f} | {r['steps_per_hour']:,} "
            f"| {r['epochs_per_hour']:,.0f} "
            f"| {r['budget_minutes']:g} min; {r['run_steps']:,}, {r['run_epochs']:,.0f}, "
            f"{r['run_train_minutes']:.0f} "
            f"| {r['train_images']:,} | {r['params_per_image']:,.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", choices=sorted(BF16_DENSE_TFLOPS), default=DEFAULT_GPU)
    args = parser.parse_args(argv)
    rows = [preset_figures(model, "gpu", args.gpu) for model in ("dit", "classifier")]
    print(
        f"{args.gpu}: {BF16_DENSE_TFLOPS[args.gpu]:g} TFLOP/s dense bf16 (data sheet); "
        f"{OVERHEAD:.0%} of each budget assumed lost to start-up, compile, grids, checkpoints"
    )
    print(markdown_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
