"""Train a class-conditional DiT with flow matching on a packed dataset; export it.

`train_dit(config, dataset, run_dir)` is the unit of work that the command line, the Prefect task
and the Modal function all call. The loop, in order: draw a batch from the packed cache, flip it,
compute the rectified-flow loss (`models.flow_matching`, t = 0 data, t = 1 noise) with CFG label
dropout, step AdamW under a warm-up + cosine LR, clip gradients, update the EMA, log, draw an EMA
sample grid every `sample_every` steps, checkpoint every `ckpt_every_steps` steps or
`ckpt_every_minutes` minutes. A run dir with checkpoints is resumed from the newest valid one.
With `repa_teacher`, representation alignment (REPA, `tasks.training.repa`) adds its term to the
loss and a projector to the trained parameters.
With `time_budget_minutes` the step count is planned from measured throughput (`tasks.training.budget`)
and the LR schedule, the EMA window and the checkpoint cadence follow that plan.

The export is `model.safetensors` (EMA weights) + `config.json`; `tasks.exported.load_dit`
rebuilds the model from them alone and `sample` turns class names into images in [0, 1].

    python -m tasks.train_dit --dataset <ref.json|folder> --run-dir runs/dit --preset cpu-small
"""

from __future__ import annotations

import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the command line checks its flags before the imports below load torch
    from importlib import import_module

    from tasks.configs.dit import PRESETS, DiTConfig
    from tasks.training.config import run_cli

    def load():  # this module by its own name: the training loop, and torch
        return import_module("tasks.train_dit").train_dit

    description = "Train a class-conditional DiT with flow matching."
    sys.exit(run_cli(DiTConfig, PRESETS, load, description, prog="python -m tasks.train_dit"))

import torch
from torchvision.utils import save_image

from data.dataset import DatasetRef, load_ref, open_split
from models.dit import DiT
from models.flow_matching import EMA, flow_matching_loss
from tasks.champions import missing_export
from tasks.configs.dit import PRESETS, DiTConfig
from tasks.exported import draw
from tasks.paths import SAMPLES_DIR
from tasks.training import checkpoint as ckpt
from tasks.training import distributed
from tasks.training.budget import TimeBudget
from tasks.training.config import check_cache
from tasks.training.distributed import mean_across
from tasks.training.export import (
    plain_state_dict,
    write_export,
)
from tasks.training.guide import GuideSnapshot
from tasks.training.repa import AlignedDiT, RepaLog, load_teacher, repa_loss
from tasks.training.run import TrainingRun
from tasks.training.run_log import Progress
from tasks.training.runtime import (
    autocast,
    build_optimizer,
    data_parallel,
    maybe_compile,
    pick_device,
    sdpa_backend,
    seed_everything,
    training_batches,
)
from tasks.training.schedule import WarmupCosine

log = logging.getLogger(__name__)

# Pixels are scaled to [-1, 1]: x = (u8 / 255 - 0.5) / 0.5, the DiT/ADM convention.
NORMALISATION = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}
TIME_CONVENTION = "x_t = (1 - t) * x0 + t * noise; t=0 data, t=1 noise; v = noise - x0"

__all__ = ["PRESETS", "DiTConfig", "train_dit"]  # the configs live in tasks.configs.dit


def _to_model_input(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> float32 in [-1, 1], contiguous (channels-first), on its device."""
    return images.contiguous().float().div_(127.5).sub_(1.0)


def _ema_decay(config: DiTConfig, total_steps: int) -> float:
    """The configured decay, capped so that the EMA window 1/(1-d) is at most `ema_max_window`
    of the planned steps: an EMA longer than the run would export half-trained weights."""
    window = max(1.0, config.ema_max_window * total_steps)
    return min(config.ema_decay, 1.0 - 1.0 / window)


def _teacher_or_fallback(config: DiTConfig) -> DiTConfig:
    """`config`, or where its REPA teacher is an unpromoted champion and `repa_fallback` allows
    it (`DiTConfig.repa_optional`), the config without REPA (`DiTConfig.without_repa`), saying
    so. A flow run has pinned this choice already (`tasks.adapters.lifecycle.choose_repa`); here
    it serves the command line."""
    if not config.repa_optional:
        return config
    why = missing_export(config.repa_teacher, "classifier")
    if why is None:
        return config
    log.warning(
        "REPA off, predicting %s: teacher %r: %s", config.repa_fallback, config.repa_teacher, why
    )
    return config.without_repa()


def _grid_labels(num_classes: int, per_class: int, device: torch.device) -> torch.Tensor:
    return torch.arange(num_classes, device=device).repeat_interleave(per_class)


def _save_grid(
    model: DiT, config: DiTConfig, num_classes: int, path: Path, guide: DiT | None = None
) -> Path:
    device = next(model.parameters()).device
    labels = _grid_labels(num_classes, config.samples_per_class, device)
    # guidance="auto" before its snapshot exists: the conditional model alone (scale 1), since
    # there is nothing to guide with yet and the null class may not be trained.
    auto = config.guidance == "auto"
    images = draw(
        model, labels, config.sample_steps, config.sample_method,
        1.0 if auto and guide is None else config.cfg_scale, config.seed,
        guide=guide if auto else None, guidance_interval=config.guidance_interval,
        time_shift=config.time_shift,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    save_image(images, tmp, nrow=config.samples_per_class, padding=1)
    tmp.replace(path)
    return path


def train_dit(
    config: DiTConfig | dict[str, Any],
    dataset: str | Path | DatasetRef,
    run_dir: str | Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train (or resume) a DiT in `run_dir`; return `{run_dir, metrics, files, dataset_version,
    config}` (JSON-able).

    Args:
        config: a `DiTConfig` or its dict form (validated).
        dataset: a DatasetRef, its JSON, or a path accepted by `data.dataset.load_ref`.
        run_dir: created if missing; if it holds checkpoints, training resumes from the newest
            valid one.
        progress: optional callable receiving {"step", "total_steps", "loss", "lr",
            "images_per_s"} every `log_every` steps.

    Raises:
        pydantic.ValidationError / ValueError: a bad config (naming the field), or a dataset
            without a cache at `image_size`; both before any image is read.
        tasks.training.checkpoint.ResumeMismatchError: the run dir's checkpoint has another config or
            dataset version.
        FloatingPointError: the loss diverged.
    """
    config = DiTConfig.model_validate(config if isinstance(config, dict) else config.model_dump())
    # The budget's clock starts here: loading data and building the model count against it.
    budget = TimeBudget(config.time_budget_minutes, config.steps)
    ref = load_ref(dataset)
    check_cache(config, ref)
    # REPA's teacher (Yu et al. 2025 §3): a missing or unusable export fails here, in one line,
    # unless the config names a fallback for a missing one (`cpu-small`: no champion yet).
    config = _teacher_or_fallback(config)
    teacher = load_teacher(config.repa_teacher) if config.repa_teacher else None
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device, config.num_threads)
    num_classes = len(ref.classes)

    world_size = distributed.world_size_for(config)
    if world_size > 1 and not distributed.current().enabled:  # this process launches the ranks
        return distributed.launch(train_dit, (config, ref, run_dir), world_size, progress)
    ranks = distributed.current()

    seed_everything(config.seed)
    model = DiT(**config.architecture(num_classes)).to(device)
    ema = EMA(model, decay=_ema_decay(config, config.steps))
    trained = model  # what the optimizer, the gradient clip and DDP see
    if teacher is not None:  # + REPA's projector, so that DDP averages its gradients too
        teacher = teacher.to(device)
        trained = AlignedDiT(model, teacher.channels, config.repa_depth, config.repa_projector_dim)
        trained, repa_log = trained.to(device), RepaLog(config.log_every, ranks)
    optimizer = build_optimizer(trained, config.optimizer, config.lr, config.weight_decay)
    schedule = WarmupCosine(
        optimizer, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio
    )
    loader = training_batches(open_split(ref, config.image_size, "train"), config, device, ranks)
    # Times, noise, flips and CFG label dropout all draw from this one generator, which the
    # checkpoints carry: that is what makes a resumed run bit-identical.
    generator = torch.Generator(device).manual_seed(config.seed)
    parts = {
        "model": model,
        "ema": ema,
        "optimizer": optimizer,
        "loader": loader,
        "generator": ckpt.GeneratorState(generator),
        **({"projector": trained.projector} if teacher is not None else {}),
    }
    run = TrainingRun(config, ref.version, run_dir, budget, schedule, parts, progress, "dit", ranks)
    run.resume()  # every part from the newest valid checkpoint, if there is one
    # DDP after the restore: it broadcasts rank 0's weights, which every rank has restored alike.
    train_model = maybe_compile(data_parallel(trained, device, ranks), config.compile)
    trained.train()
    samples = run_dir / SAMPLES_DIR
    guide = GuideSnapshot(run_dir, config.guide_snapshot_fraction)  # kept from before a resume

    while run.active():
        images, labels = loader.next()  # this rank's shard, already on the device
        x0 = _to_model_input(images)
        if config.flip:  # drawn for the global batch, so any world size flips the same images
            flips = torch.rand(config.batch_size, generator=generator, device=device) < 0.5
            x0 = torch.where(ranks.shard(flips)[:, None, None, None], x0.flip(3), x0)
        lr = run.lr()
        with autocast(device, run.precision), sdpa_backend(config.sdpa_backend):
            loss = flow_matching_loss(
                train_model,
                x0,
                labels,
                config.time_schedule,
                generator,
                loc=config.time_loc,
                scale=config.time_scale,
                rank=ranks.rank,
                world_size=ranks.world_size,
            )
            total = loss
            if teacher is not None:
                align = repa_loss(trained.projected, teacher(x0, model.grid_size))
                total = loss + config.repa_weight * align
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # DDP averages the gradients over the ranks here
        torch.nn.utils.clip_grad_norm_(trained.parameters(), config.grad_clip)
        optimizer.step()
        if ranks.is_main:
            ema.update(model)

        # The logged loss stays the flow-matching one, comparable across recipes; REPA has rows.
        run.step_done(mean_across(loss, ranks), lr)
        if teacher is not None:
            repa_log.step(run, align)
        ema.decay = _ema_decay(config, run.total)
        if ranks.is_main and guide.due(run.step, run.total):  # before the checkpoint of this step
            guide.take(ema.shadow, run.step)
        if run.evaluation_due(config.sample_every):
            grid = samples / f"step_{run.step:07d}.png"
            draw_guide = guide.model(ema.shadow)
            run.evaluate(partial(_save_grid, ema.shadow, config, num_classes, grid, draw_guide))
        run.maybe_save()
    run.end_training()
    if not ranks.is_main:
        return {}

    final_grid = _save_grid(
        ema.shadow, config, num_classes, samples / "final.png", guide.model(ema.shadow)
    )
    export_config = {
        "kind": "dit",
        "arch": dict(ema.shadow.config),
        "classes": list(ref.classes),
        "image_size": config.image_size,
        "normalisation": NORMALISATION,
        "time_convention": TIME_CONVENTION,
        "sampler": {
            "method": config.sample_method,
            "steps": config.sample_steps,
            "cfg_scale": config.cfg_scale,
            "guidance": config.guidance,
            "guidance_interval": config.guidance_interval,
            "time_shift": config.time_shift,
        },
        # guide.safetensors is in place before write_export writes config.json naming it.
        **guide.export(run_dir),
        "dataset_version": ref.version,
        "train_config": config.model_dump(),
        "steps_trained": run.step,
        **({"repa_teacher": teacher.identity} if teacher is not None else {}),
    }
    files = write_export(run_dir, plain_state_dict(ema.shadow), export_config)
    extra = {"repa_cosine": repa_log.last} if teacher is not None else {}
    return run.result({**files, "samples": str(final_grid)}, {"ema_decay": ema.decay, **extra})
