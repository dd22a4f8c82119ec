"""The recipes that `benchmarks/bench_recipes.py` compares: name -> (preset, overrides).

Each recipe is a preset of `tasks/configs/` plus the fields it changes, so that a table row reads
as one change against the preset; the comments say what each one tests and which docs table
measured it (docs/recipes.md, docs/recipes-round-two.md). A recipe keeps its meaning when the
presets move: those that describe an old preset spell it out in full (`plain`, `_issue_6`).
"""

from __future__ import annotations

from typing import Any

from tasks.configs.classifier import PRESETS as CLASSIFIER_PRESETS

# The REPA recipes' teacher: `--repa-teacher PATH` replaces this placeholder (`_use_teacher`)
# before anything trains; without the flag, choosing such a recipe is a usage error.
REPA_TEACHER = "<from --repa-teacher>"
# Issue 21's winner, the base of its repeats and retunings (the preset `cpu-small` where its
# teacher is usable; the recipes keep the teacher-less preset as their base).
X_PRED_REPA: dict[str, Any] = dict(prediction="x", repa_teacher=REPA_TEACHER, repa_depth=2)

# name -> (preset, overrides). "cpu-small" is the DiT preset `cpu-small` as it trains without a
# teacher (the preset `cpu-small-no-teacher`); the others change one thing each, so the table reads
# as an ablation of it, except "plain", the issue's reference recipe.
DIT_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    # Issue 6's baseline, spelled out in full so that changes to the preset never move it: the
    # reference DiT layout (width 256, depth 8, patch 4) at 32 px, logit-normal t, AdamW 3e-4
    # with an EMA warm-up, batch 64, fp32 and torch's default attention kernel.
    "plain": (
        "cpu-small-no-teacher",
        dict(
            arch="DiT-Ti/4",
            hidden_size=256,
            depth=8,
            num_heads=4,
            patch_size=4,
            qk_norm=False,
            stem_channels=0,
            long_skip=False,
            final_conv=False,
            image_size=32,
            time_schedule="logit_normal",
            lr=3e-4,
            warmup_steps=50,
            weight_decay=0.0,
            batch_size=64,
            ema_decay=0.999,
            precision="fp32",
            sdpa_backend="auto",
            sample_method="euler",
            sample_steps=25,
            cfg_scale=2.0,
        ),
    ),
    "cpu-small": ("cpu-small-no-teacher", {}),
    # Ablation: the preset without its three architecture additions.
    "no-additions": (
        "cpu-small-no-teacher",
        dict(stem_channels=0, long_skip=False, final_conv=False),
    ),
    # Larger batches, fewer steps: 64 was the preset before 2026-12-02.
    "batch-64": ("cpu-small-no-teacher", dict(batch_size=64)),
    "batch-32": ("cpu-small-no-teacher", dict(batch_size=32)),
    "batch-8": ("cpu-small-no-teacher", dict(batch_size=8)),
    # Time sampling: uniform t instead of logit-normal (SD3 §3.1).
    "uniform-t": ("cpu-small-no-teacher", dict(time_schedule="uniform")),
    # The reference recipe's learning rate.
    "lr-3e-4": ("cpu-small-no-teacher", dict(lr=3e-4)),
    # The raw weights instead of an EMA (a decay of 0 makes the shadow a copy of the model).
    "no-ema": ("cpu-small-no-teacher", dict(ema_decay=0.0)),
    # Issue 21 §3, the 2024-2025 levers for small diffusion transformers, one at a time:
    # Muon for the blocks' matrices (AdamW for the rest), at the preset's learning rate.
    "muon": ("cpu-small-no-teacher", dict(optimizer="muon")),
    # x-prediction with a velocity loss (Li & He 2025).
    "x-pred": ("cpu-small-no-teacher", dict(prediction="x")),
    # LightningDiT's block details together: RMSNorm, SwiGLU, 2-D RoPE.
    "lightning-blocks": ("cpu-small-no-teacher", dict(norm="rms", mlp="swiglu", rope=True)),
    # Logit-normal centred below 0.5: more training weight near the data end, where a 32 px
    # image keeps its detail (SD3 §5.3.2 shifts the other way for large images).
    "t-loc-minus-0.5": ("cpu-small-no-teacher", dict(time_loc=-0.5)),
    # Representation alignment (REPA, Yu et al. 2025 §3) of block 2 of 6 to a classifier's
    # spatial features, lambda = 0.5 (the paper's); the teacher must not be the judge.
    "repa": ("cpu-small-no-teacher", dict(repa_teacher=REPA_TEACHER, repa_depth=2)),
    # The two levers that did not lose alone, together (issue 21 §3).
    "x-pred-repa": ("cpu-small-no-teacher", X_PRED_REPA),
    # The same with another seed (initialisation, batches, noise): is its win one draw's luck?
    "x-pred-repa-seed-1": ("cpu-small-no-teacher", {**X_PRED_REPA, "seed": 1}),
    # The winner's learning rate retuned (issue 21 §3), both ways from the preset's 1e-3.
    "x-pred-repa-lr-2e-3": ("cpu-small-no-teacher", {**X_PRED_REPA, "lr": 2e-3}),
    "x-pred-repa-lr-5e-4": ("cpu-small-no-teacher", {**X_PRED_REPA, "lr": 5e-4}),
    # x-prediction with the learning rate retuned (twice the preset's).
    "x-pred-lr-2e-3": ("cpu-small-no-teacher", dict(prediction="x", lr=2e-3)),
    # bf16 autocast on a CPU with AVX-512 bf16 dot products but no AMX (machine J): the same
    # recipe, more steps in the budget if the bf16 kernels pay (docs/recipes-round-two.md).
    "bf16": ("cpu-small-no-teacher", dict(precision="bf16")),
    "x-pred-repa-bf16": ("cpu-small-no-teacher", {**X_PRED_REPA, "precision": "bf16"}),
    "bf16-seed-1": ("cpu-small-no-teacher", dict(precision="bf16", seed=1)),
    # fp32 whatever the CPU: the afternoon's figures on machine J, where `auto` now means bf16.
    "fp32": ("cpu-small-no-teacher", dict(precision="fp32")),
    "x-pred-repa-bf16-seed-1": (
        "cpu-small-no-teacher",
        {**X_PRED_REPA, "precision": "bf16", "seed": 1},
    ),
    # A third seed of each, since seed to seed the FD moves by 0.1-0.2 at this budget.
    "bf16-seed-2": ("cpu-small-no-teacher", dict(precision="bf16", seed=2)),
    "x-pred-repa-bf16-seed-2": (
        "cpu-small-no-teacher",
        {**X_PRED_REPA, "precision": "bf16", "seed": 2},
    ),
    # The reference layout's width and depth (256 x 8 instead of DiT-Ti's 192 x 6).
    "width-256-depth-8": ("cpu-small-no-teacher", dict(hidden_size=256, depth=8, num_heads=4)),
    # The preset plus an autoguidance guide (the EMA at 25 % of the steps, issue 21 §2), so that
    # --samplers ...:guide=auto can sweep it; its default sampling is the preset's.
    "guide-25": ("cpu-small-no-teacher", dict(guide_snapshot_fraction=0.25)),
    # A later, less "bad" guide: the 25 % snapshot traded precision for recall (Karras et al. 2024
    # §5 tune the guide's training length).
    "guide-50": ("cpu-small-no-teacher", dict(guide_snapshot_fraction=0.5)),
}


def _issue_6(*bases: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """Overrides on today's `cpu-small` classifier that give back its issue-6 form (the preset
    until 2026-12-04: full-size crops throughout, no low-resolution share), then `bases` and
    `overrides` in order; so the issue-6 recipes keep meaning what their tables in
    docs/recipes.md measured. The flags cannot set a field to None: `train_image_size` equal to
    `image_size` is the same as None, and `low_res_size` stays, which only adds the accuracy at
    32 px to the table."""
    changes: dict[str, Any] = {}
    for base in (*bases, overrides):
        changes |= base
    size = changes.get("image_size", CLASSIFIER_PRESETS["cpu-small"].image_size)
    return dict(train_image_size=size, test_size_finetune_fraction=0.0, low_res_fraction=0.0) | (
        changes
    )


# ResNet-10 at 64 px with the mirror: the preset from 2026-12-02 until ResNet-8 replaced it.
_RESNET10 = dict(backbone="resnet10")
# Validation on the single view is cheap enough to run every epoch.
_EVERY_EPOCH = dict(eval_every_epochs=1)
# ResNet-18 at 48 px, single view: the preset from 2026-12-02 until ResNet-10 replaced it.
_RESNET18 = dict(backbone="resnet18", image_size=48, test_time_flip=False, **_EVERY_EPOCH)
# Issue 21 §1's winner, spelled out so that it never moves with the preset (which it is since
# 2026-12-04): a quarter of the images shrunk to the DiT's 32 px, FixRes's 48 px crops, then the
# last 20 % of the steps on 64 px ones.
_LOW_RES_FIXRES = dict(
    low_res_fraction=0.25, low_res_size=32, train_image_size=48, test_size_finetune_fraction=0.2
)

CLASSIFIER_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "cpu-small": ("cpu-small", {}),
    # The preset until 2026-12-04: ResNet-8 on 64 px crops throughout.
    "issue-6": ("cpu-small", _issue_6()),
    # More detail, fewer epochs.
    "80px": ("cpu-small", _issue_6(image_size=80)),
    "lr-4e-3": ("cpu-small", _issue_6(lr=4e-3)),
    # Half the batch: twice the optimizer steps for the same images.
    "batch-32": ("cpu-small", _issue_6(batch_size=32)),
    # Training crops smaller than the 64 px images; validated and exported at 64 px with the
    # BatchNorm statistics re-estimated there (FixRes).
    "train-40px": ("cpu-small", _issue_6(train_image_size=40)),
    "train-48px": ("cpu-small", _issue_6(train_image_size=48)),
    "train-56px": ("cpu-small", _issue_6(train_image_size=56)),
    # The same with crops down to half the area: more augmentation for the longer run.
    "train-48px-crops-50": ("cpu-small", _issue_6(train_image_size=48, crop_scale_min=0.5)),
    # 48 px crops, then the last 20% of the steps on 64 px ones: FixRes's fine-tuning at the test
    # resolution, which also re-learns the BatchNorm statistics there.
    "train-48px-finetune-20": (
        "cpu-small",
        _issue_6(train_image_size=48, test_size_finetune_fraction=0.2),
    ),
    # Low-resolution augmentation (issue 21 §1): a share of the training images shrunk to the
    # DiT's 32 px and enlarged back, so that the judge is fair to 32 px samples.
    "low-res-25": ("cpu-small", _issue_6(low_res_fraction=0.25, low_res_size=32)),
    "low-res-50": ("cpu-small", _issue_6(low_res_fraction=0.5, low_res_size=32)),
    # A quarter shrunk, on FixRes's faster crops: more epochs for the native accuracy that the
    # low-resolution share costs. The preset since 2026-12-04.
    "low-res-25-fixres": ("cpu-small", _LOW_RES_FIXRES),
    # The same at half the batch (twice the optimizer steps), and on ResNet-10 (the capacity that
    # FixRes's faster crops might pay for): two tries at the native 0.90 it missed; both lost.
    "low-res-25-fixres-batch-32": ("cpu-small", _LOW_RES_FIXRES | dict(batch_size=32)),
    "low-res-25-fixres-resnet10": ("cpu-small", _LOW_RES_FIXRES | _RESNET10),
    # The preset in bf16 autocast (AVX-512 bf16 without AMX: 1.5x a ResNet-8 step on machine J).
    "bf16": ("cpu-small", dict(precision="bf16")),
    "bf16-seed-1": ("cpu-small", dict(precision="bf16", seed=1)),
    # fp32 whatever the CPU: the afternoon's figures on machine J, where `auto` now means bf16.
    "fp32": ("cpu-small", dict(precision="fp32")),
    # ResNet-8 plus the last stage: more capacity, half the images per second on AVX2.
    "resnet10": ("cpu-small", _issue_6(_RESNET10)),
    # The same without averaging over the mirror at test time.
    "resnet10-no-flip-tta": (
        "cpu-small",
        _issue_6(_RESNET10, _EVERY_EPOCH, test_time_flip=False),
    ),
    "resnet10-48px": ("cpu-small", _issue_6(_RESNET10, image_size=48)),
    "resnet10-80px": ("cpu-small", _issue_6(_RESNET10, image_size=80)),
    "resnet10-lr-4e-3": ("cpu-small", _issue_6(_RESNET10, lr=4e-3)),
    "resnet18-48px": ("cpu-small", _issue_6(_RESNET18)),
    # ResNet-18 at 64 px: the preset before 2026-12-02.
    "resnet18-64px": ("cpu-small", _issue_6(_RESNET18, image_size=64)),
    # ResNet-18 at 64 px with crops down to 35% of the area and colour jitter 0.2 (the preset
    # before 2026-11-29): too strong for a model that underfits in its few epochs.
    "resnet18-heavy-aug": (
        "cpu-small",
        _issue_6(_RESNET18, image_size=64, crop_scale_min=0.35, color_jitter=0.2),
    ),
    "resnet18-96px": ("cpu-small", _issue_6(_RESNET18, image_size=96)),
    # Half the batch: more steps for the same images (what won for the DiT).
    "resnet18-batch-32": ("cpu-small", _issue_6(_RESNET18, batch_size=32)),
}

RECIPES = {"dit": DIT_RECIPES, "classifier": CLASSIFIER_RECIPES}
