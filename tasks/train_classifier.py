"""Train an image classifier (species or breed) on a packed dataset; export it (load it with `tasks.exported.load_classifier`).

`train_classifier(config, dataset, run_dir)` is the unit of work that the command line, the Prefect
task and the Modal function all call. The loop, in order: draw a batch from the packed cache,
augment each image (random resized crop, horizontal flip, colour jitter; torchvision
transforms v2 on uint8 tensors), normalise with the ImageNet statistics, step AdamW on the
label-smoothed cross-entropy under a warm-up + cosine LR with gradient clipping, log, measure
validation accuracy every `eval_every_epochs` epochs, checkpoint every `ckpt_every_steps` steps or
`ckpt_every_minutes` minutes. A run dir with checkpoints is resumed from the newest valid one;
`time_budget_minutes` plans the step count from measured throughput (`tasks.training.budget`).
With `train_image_size` below `image_size` the crops are smaller than the validation images,
which trains faster; the model is then validated and exported with its BatchNorm statistics
re-estimated at `image_size` (`recalibrate_batchnorm`, after FixRes). With
`test_size_finetune_fraction` the last part of the run trains on `image_size` crops instead
(`CropSizeSchedule`): FixRes's fine-tuning at the test resolution, folded into the run.

The export is `model.safetensors` + `config.json`; `load_classifier` rebuilds the model from them.

    python -m tasks.train_classifier --dataset <ref.json|folder> --run-dir runs/clf --preset cpu-small
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the command line checks its flags before the imports below load torch
    from importlib import import_module

    from tasks.configs.classifier import PRESETS, ClassifierConfig
    from tasks.training.config import run_cli

    def load():  # this module by its own name: the training loop, and torch
        return import_module("tasks.train_classifier").train_classifier

    description = "Train an image classifier on a packed dataset."
    sys.exit(
        run_cli(
            ClassifierConfig, PRESETS, load, description, prog="python -m tasks.train_classifier"
        )
    )

import torch
import torch.nn.functional as F
from torchmetrics.functional.classification import multiclass_accuracy

from data.dataset import DatasetRef, load_ref, open_split
from data.loader import Split, iter_batches
from models.classifier import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Classifier,
)
from tasks.configs.classifier import PRESETS, ClassifierConfig
from tasks.training import checkpoint as ckpt
from tasks.training import distributed
from tasks.training.augment import CropFlipJitter, LowResolution
from tasks.training.budget import TimeBudget
from tasks.training.config import check_cache
from tasks.training.distributed import mean_across
from tasks.training.export import (
    plain_state_dict,
    write_export,
)
from tasks.training.pretrained import build_classifier
from tasks.training.resolution import CropSizeSchedule, recalibrate_batchnorm, standardise
from tasks.training.resolution import normalise as _normalise
from tasks.training.run import TrainingRun
from tasks.training.run_log import Progress
from tasks.training.runtime import (
    Precision,
    autocast,
    build_adamw,
    data_parallel,
    maybe_compile,
    pick_device,
    seed_everything,
    training_batches,
)
from tasks.training.schedule import WarmupCosine

NORMALISATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}

__all__ = ["PRESETS", "ClassifierConfig", "train_classifier"]  # configs: tasks.configs.classifier


def _augmentation(config: ClassifierConfig) -> CropFlipJitter:
    """The training augmentation, batched on the device (`tasks.training.augment`)."""
    return CropFlipJitter(config.crop_scale_min, config.flip, config.color_jitter)


@torch.no_grad()
def validation_metrics(
    model: Classifier,
    split: Split,
    batch_size: int,
    device: torch.device,
    precision: Precision = "auto",
    resize_to: int | None = None,
) -> dict[str, float]:
    """Validation loss and accuracy over every image of `split` (no augmentation).

    `resize_to`: enlarge the images to this side first (bilinear, antialiased, as
    `tasks.evaluation.measure` does before judging), for a split cached below the model's size.

    Returns {"val_loss", "val_accuracy" (micro, fraction correct), "val_balanced_accuracy"
    (macro: mean per-class recall, robust to the cat/other imbalance), "val_class_accuracy"
    (per-class recall, in the dataset's class order)}; values in [0, 1] except the loss (nats).
    """
    was_training = model.training
    model.eval()
    logits, targets = [], []
    for images, labels in iter_batches(split, batch_size):
        x = _normalise(images, device)
        if resize_to is not None:
            x = standardise(_enlarge(images.to(device).float().div_(255.0), resize_to))
        with autocast(device, precision):
            logits.append(model(x).float().cpu())
        targets.append(labels)
    model.train(was_training)
    logit, target = torch.cat(logits), torch.cat(targets)
    num_classes = logit.shape[1]
    return {
        "val_loss": F.cross_entropy(logit, target).item(),
        "val_accuracy": multiclass_accuracy(logit, target, num_classes, average="micro").item(),
        "val_balanced_accuracy": multiclass_accuracy(
            logit, target, num_classes, average="macro"
        ).item(),
        "val_class_accuracy": multiclass_accuracy(
            logit, target, num_classes, average="none"
        ).tolist(),
    }


def _enlarge(x: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, h, w) float in [0, 1] -> (B, 3, size, size), bilinear with antialiasing."""
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def train_classifier(
    config: ClassifierConfig | dict[str, Any],
    dataset: str | Path | DatasetRef,
    run_dir: str | Path,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Train (or resume) a classifier in `run_dir`; return `{run_dir, metrics, files,
    dataset_version, config}` (JSON-able). Metrics include the final validation accuracy.

    Args:
        config: a `ClassifierConfig` or its dict form (validated).
        dataset: a DatasetRef, its JSON, or a path accepted by `data.dataset.load_ref`.
        run_dir: created if missing; if it holds checkpoints, training resumes from the newest
            valid one.
        progress: optional callable receiving {"step", "total_steps", "loss", "lr",
            "images_per_s"} every `log_every` steps.

    Raises:
        pydantic.ValidationError / ValueError: a bad config (naming the field), or a dataset
            without a cache at `image_size`; both before any image is read.
        tasks.training.pretrained.PretrainedWeightsUnavailable: `pretrained=True` offline without a cache.
        tasks.training.checkpoint.ResumeMismatchError: the run dir's checkpoint has another config or
            dataset version.
        FloatingPointError: the loss diverged.
    """
    config = ClassifierConfig.model_validate(
        config if isinstance(config, dict) else config.model_dump()
    )
    # The budget's clock starts here: loading data and building the model count against it.
    budget = TimeBudget(config.time_budget_minutes, config.steps)
    ref = load_ref(dataset)
    check_cache(config, ref)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(config.device, config.num_threads)
    num_classes = len(ref.classes)

    world_size = distributed.world_size_for(config)
    if world_size > 1 and not distributed.current().enabled:  # this process launches the ranks
        return distributed.launch(train_classifier, (config, ref, run_dir), world_size, progress)
    ranks = distributed.current()

    seed_everything(config.seed)
    model = build_classifier(
        config.backbone,
        num_classes,
        config.pretrained,
        config.small_input_stem,
        config.test_time_flip,
    ).to(device, memory_format=torch.channels_last)
    optimizer = build_adamw(model, config.lr, config.weight_decay)
    schedule = WarmupCosine(
        optimizer, config.lr, config.warmup_steps, config.steps, config.min_lr_ratio
    )
    train_split = open_split(ref, config.image_size, "train")
    loader = training_batches(train_split, config, device, ranks)
    val_split = open_split(ref, config.image_size, "val")
    crop_sizes = CropSizeSchedule(config)
    # Crops, flips and jitter draw from this generator, which the checkpoints carry.
    generator = torch.Generator(device).manual_seed(config.seed)
    parts = {
        "model": model,
        "optimizer": optimizer,
        "loader": loader,
        "crop_sizes": crop_sizes,
        "generator": ckpt.GeneratorState(generator),
    }
    run = TrainingRun(
        config, ref.version, run_dir, budget, schedule, parts, progress, "classifier", ranks
    )
    run.resume()  # every part from the newest valid checkpoint, if there is one
    augment = _augmentation(config)
    low_res = LowResolution(config.low_res_fraction, config.low_res_size or 0, config.image_size)
    # The low resolution's own held-out images, when the dataset has a cache there: the
    # accuracy a judge of low-resolution samples has on real ones (its ceiling).
    low_res_val = None
    if config.low_res_size is not None and config.low_res_size in ref.caches:
        low_res_val = open_split(ref, config.low_res_size, "val")
    # DDP after the restore: it broadcasts rank 0's weights, which every rank has restored alike.
    train_model = maybe_compile(data_parallel(model, device, ranks), config.compile)
    model.train()
    eval_every = loader.steps_per_epoch * config.eval_every_epochs

    def test_model() -> Classifier:
        """The model as validated and exported: with statistics at the test resolution."""
        if crop_sizes.size(run.step, run.total) == config.image_size:
            return model
        return recalibrate_batchnorm(
            model, train_split, config.eval_batch_size, device, run.precision
        )

    def named(metrics: dict[str, Any], suffix: str = "") -> dict[str, float]:
        """Scalars only (metrics tables and logs): the per-class list as one key per class."""
        per_class = metrics.pop("val_class_accuracy")
        names = {f"val_accuracy.{c}": a for c, a in zip(ref.classes, per_class, strict=True)}
        return {f"{k}{suffix}": v for k, v in (metrics | names).items()}

    def validate(net: Classifier) -> dict[str, float]:
        metrics = named(
            validation_metrics(net, val_split, config.eval_batch_size, device, run.precision)
        )
        if low_res_val is not None:
            at_low = validation_metrics(
                net,
                low_res_val,
                config.eval_batch_size,
                device,
                run.precision,
                resize_to=config.image_size,
            )
            metrics |= named(at_low, f"_at_{config.low_res_size}px")
        epoch = run.step / loader.steps_per_epoch
        run.log.write({"kind": "eval", "step": run.step, "epoch": epoch, **metrics})
        return metrics

    while run.active():
        images, labels = loader.next()  # this rank's shard, already on the device
        crop_size = crop_sizes.size(run.step, run.total)
        if crop_sizes.switch_step == run.step:
            run.log.write({"kind": "crop_size", "step": run.step, "crop_size": crop_size})
        # Drawn for the global batch, applied to this rank's shard: any world size augments alike.
        params = augment.draw(config.batch_size, *images.shape[2:], generator)
        x = augment.apply(images, ranks.shard(params), crop_size)
        if config.low_res_fraction > 0:  # drawn only then, so other recipes' streams are unchanged
            x = low_res.apply(x, ranks.shard(low_res.draw(config.batch_size, generator)))
        x = standardise(x)
        lr = run.lr()
        with autocast(device, run.precision):
            logits = train_model(x)
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        run.step_done(mean_across(loss, ranks), lr)
        if run.evaluation_due(eval_every):
            run.evaluate(lambda: validate(test_model()))
        run.maybe_save()
    run.end_training()
    if not ranks.is_main:
        return {}

    final_model = test_model()
    final_eval = validate(final_model)
    export_config = {
        "kind": "classifier",
        "backbone": config.backbone,
        "small_input_stem": config.small_input_stem,
        "test_time_flip": config.test_time_flip,
        "num_classes": num_classes,
        "classes": list(ref.classes),
        "image_size": config.image_size,
        "normalisation": NORMALISATION,
        "dataset_version": ref.version,
        "train_config": config.model_dump(),
        "steps_trained": run.step,
        "metrics": final_eval,
    }
    files = write_export(run_dir, plain_state_dict(final_model), export_config)
    return run.result(files, final_eval)
