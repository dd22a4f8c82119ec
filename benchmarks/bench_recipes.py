"""Compare training recipes at a fixed wall-clock budget on the shared PetImages cats and dogs.

Each recipe is a preset plus overrides, trained from scratch in a fresh process with
`--time-budget`, then measured by the project's own evaluation (`tasks.evaluate`) on the
held-out split. This is the evidence behind the `cpu-small` presets (issue 6 §2-§4):

    # 1. classifiers: prints val accuracy per recipe; the export of each lands in --out
    .venv/bin/python -m benchmarks.bench_recipes classifier
    # 2. DiTs, judged by a classifier from step 1: cat-conditioned samples called "cat",
    #    conditional accuracy and Fréchet distance in the classifier's features
    .venv/bin/python -m benchmarks.bench_recipes dit --judge bench-runs/classifier-cpu-small
    # 3. REPA (issue 21 §3) aligns to a classifier export other than the judge, e.g. another
    #    recipe's from step 1; a repa recipe without --repa-teacher is a usage error
    .venv/bin/python -m benchmarks.bench_recipes dit --recipes cpu-small repa \
        --judge bench-runs/classifier-cpu-small --repa-teacher bench-runs/classifier-resnet10

`--recipes` picks a subset, `--budget` sets the minutes per training (10 = the issue's budget),
`--samples-per-class` the DiT samples per class. A recipe whose export already exists in --out is
measured again without retraining unless --retrain, so `--samplers` sweeps sampling-time levers
over one export (issue 21 §2), one report and one table row each:

    .venv/bin/python -m benchmarks.bench_recipes dit --recipes guide-25 --judge ... --samplers \
        heun:16:5 heun:16:5:interval=0.2-0.85 heun:16:5:shift=2 heun:16:2:guide=auto

Run it on an otherwise idle machine: with two busy cores torch's OpenMP threads spin-wait and
throughput collapses.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.dataset import DatasetRef, DatasetSpec  # noqa: E402
from data.download import ensure  # noqa: E402
from tasks.configs.classifier import PRESETS as CLASSIFIER_PRESETS  # noqa: E402
from tasks.train import build_config  # noqa: E402

PETIMAGES = REPO.parent / "shared" / "datasets" / "petimages" / "kagglecatsanddogs-180px.zip"
PETIMAGES_SHA256 = "8bbd2356c185cce16913e0db65c3c06162824687d9faae6487f69551adc79639"

# The REPA recipes' teacher: `--repa-teacher PATH` replaces this placeholder (`_use_teacher`)
# before anything trains; without the flag, choosing such a recipe is a usage error.
REPA_TEACHER = "<from --repa-teacher>"
# Issue 21's winner, the base of its repeats and retunings (the preset `cpu-small-repa`).
X_PRED_REPA: dict[str, Any] = dict(prediction="x", repa_teacher=REPA_TEACHER, repa_depth=2)

# name -> (preset, overrides). "cpu-small" is the preset as shipped; the others change one thing
# each, so the table reads as an ablation of it, except "plain", the issue's reference recipe.
DIT_RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    # Issue 6's baseline, spelled out in full so that changes to the preset never move it: the
    # reference DiT layout (width 256, depth 8, patch 4) at 32 px, logit-normal t, AdamW 3e-4
    # with an EMA warm-up, batch 64, fp32 and torch's default attention kernel.
    "plain": (
        "cpu-small",
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
    "cpu-small": ("cpu-small", {}),
    # Ablation: the preset without its three architecture additions.
    "no-additions": ("cpu-small", dict(stem_channels=0, long_skip=False, final_conv=False)),
    # Larger batches, fewer steps: 64 was the preset before 2026-12-02.
    "batch-64": ("cpu-small", dict(batch_size=64)),
    "batch-32": ("cpu-small", dict(batch_size=32)),
    "batch-8": ("cpu-small", dict(batch_size=8)),
    # Time sampling: uniform t instead of logit-normal (SD3 §3.1).
    "uniform-t": ("cpu-small", dict(time_schedule="uniform")),
    # The reference recipe's learning rate.
    "lr-3e-4": ("cpu-small", dict(lr=3e-4)),
    # The raw weights instead of an EMA (a decay of 0 makes the shadow a copy of the model).
    "no-ema": ("cpu-small", dict(ema_decay=0.0)),
    # Issue 21 §3, the 2024-2025 levers for small diffusion transformers, one at a time:
    # Muon for the blocks' matrices (AdamW for the rest), at the preset's learning rate.
    "muon": ("cpu-small", dict(optimizer="muon")),
    # x-prediction with a velocity loss (Li & He 2025).
    "x-pred": ("cpu-small", dict(prediction="x")),
    # LightningDiT's block details together: RMSNorm, SwiGLU, 2-D RoPE.
    "lightning-blocks": ("cpu-small", dict(norm="rms", mlp="swiglu", rope=True)),
    # Logit-normal centred below 0.5: more training weight near the data end, where a 32 px
    # image keeps its detail (SD3 §5.3.2 shifts the other way for large images).
    "t-loc-minus-0.5": ("cpu-small", dict(time_loc=-0.5)),
    # Representation alignment (REPA, Yu et al. 2025 §3) of block 2 of 6 to a classifier's
    # spatial features, lambda = 0.5 (the paper's); the teacher must not be the judge.
    "repa": ("cpu-small", dict(repa_teacher=REPA_TEACHER, repa_depth=2)),
    # The two levers that did not lose alone, together (issue 21 §3).
    "x-pred-repa": ("cpu-small", X_PRED_REPA),
    # The same with another seed (initialisation, batches, noise): is its win one draw's luck?
    "x-pred-repa-seed-1": ("cpu-small", {**X_PRED_REPA, "seed": 1}),
    # The winner's learning rate retuned (issue 21 §3), both ways from the preset's 1e-3.
    "x-pred-repa-lr-2e-3": ("cpu-small", {**X_PRED_REPA, "lr": 2e-3}),
    "x-pred-repa-lr-5e-4": ("cpu-small", {**X_PRED_REPA, "lr": 5e-4}),
    # x-prediction with the learning rate retuned (twice the preset's).
    "x-pred-lr-2e-3": ("cpu-small", dict(prediction="x", lr=2e-3)),
    # bf16 autocast on a CPU with AVX-512 bf16 dot products but no AMX (machine J): the same
    # recipe, more steps in the budget if the bf16 kernels pay (docs/recipes-round-two.md).
    "bf16": ("cpu-small", dict(precision="bf16")),
    "x-pred-repa-bf16": ("cpu-small", {**X_PRED_REPA, "precision": "bf16"}),
    "bf16-seed-1": ("cpu-small", dict(precision="bf16", seed=1)),
    # fp32 whatever the CPU: the afternoon's figures on machine J, where `auto` now means bf16.
    "fp32": ("cpu-small", dict(precision="fp32")),
    "x-pred-repa-bf16-seed-1": ("cpu-small", {**X_PRED_REPA, "precision": "bf16", "seed": 1}),
    # The reference layout's width and depth (256 x 8 instead of DiT-Ti's 192 x 6).
    "width-256-depth-8": ("cpu-small", dict(hidden_size=256, depth=8, num_heads=4)),
    # The preset plus an autoguidance guide (the EMA at 25 % of the steps, issue 21 §2), so that
    # --samplers ...:guide=auto can sweep it; its default sampling is the preset's.
    "guide-25": ("cpu-small", dict(guide_snapshot_fraction=0.25)),
    # A later, less "bad" guide: the 25 % snapshot traded precision for recall (Karras et al. 2024
    # §5 tune the guide's training length).
    "guide-50": ("cpu-small", dict(guide_snapshot_fraction=0.5)),
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
TRAINER_MODULES = {"dit": "tasks.train_dit", "classifier": "tasks.train_classifier"}


def _config(kind: str, name: str) -> dict[str, Any]:
    """The recipe's full config (preset + overrides, validated; a misspelt field fails here)."""
    preset, overrides = RECIPES[kind][name]
    return build_config(kind, preset, overrides).model_dump()


def _use_teacher(path: Path) -> None:
    """Give the REPA recipes `path` as their teacher (it replaces `REPA_TEACHER`)."""
    for name, (preset, overrides) in DIT_RECIPES.items():
        if overrides.get("repa_teacher") == REPA_TEACHER:
            DIT_RECIPES[name] = (preset, {**overrides, "repa_teacher": str(path)})


def _flags(preset: str, overrides: dict[str, Any]) -> list[str]:
    flags = ["--preset", preset]
    for field, value in overrides.items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + flag[2:])
        elif isinstance(value, tuple | list):  # a pair such as guidance_interval: --flag LO HI
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def _dataset(data_dir: Path, sizes: set[int]) -> DatasetRef:
    """The PetImages species dataset with caches at `sizes`, published once into `data_dir`."""
    spec = DatasetSpec(
        source=str(PETIMAGES),
        checksum=f"sha256:{PETIMAGES_SHA256}",
        labels="species",
        image_sizes=sorted(sizes),
    )
    return ensure(spec, data_dir)


def _train(kind: str, name: str, ref_path: Path, run_dir: Path, budget: float, retrain: bool):
    """Train one recipe in a fresh process (unless its export exists); returns the result JSON."""
    result_file = run_dir / "bench_result.json"
    expected = {**_config(kind, name), "time_budget_minutes": budget, "progress_bar": False}
    if result_file.exists() and not retrain:
        result = json.loads(result_file.read_text())
        if result["config"] == expected:  # a recipe or preset edited since must train again
            return result
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a fresh start: never resume another recipe's checkpoints
    preset, overrides = RECIPES[kind][name]
    cmd = [sys.executable, "-m", TRAINER_MODULES[kind], "--dataset", str(ref_path)]
    cmd += ["--run-dir", str(run_dir), *_flags(preset, overrides), "--time-budget", str(budget)]
    cmd += ["--no-progress-bar"]
    print(f"[{kind} {name}] training for {budget} min", flush=True)
    out = subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result_file.write_text(json.dumps(result))
    return result


# The optional `key=value` items of a --samplers spec -> the `tasks.evaluate` flag they set.
SAMPLER_KEYS = {"interval": "--guidance-interval", "shift": "--time-shift", "guide": "--guidance"}


def _sampler(text: str) -> list[str]:
    """A --samplers spec as `tasks.evaluate` flags: 'heun:16:3' -> method, steps, guidance scale;
    optional items after them: 'interval=LO-HI' (guide only at t in [LO, HI], 1 = noise),
    'shift=S' (SD3 time shift), 'guide=cfg|auto' (auto = the export's autoguidance guide).

    Raises ValueError naming the spec for a malformed one."""
    method, steps, scale, *items = text.split(":")
    flags = ["--sampler", method, "--steps", str(int(steps)), "--cfg-scale", str(float(scale))]
    for item in items:
        key, sep, value = item.partition("=")
        if key not in SAMPLER_KEYS or not sep:
            raise ValueError(f"{text!r}: {item!r} is not one of {sorted(SAMPLER_KEYS)} =VALUE")
        words = value.split("-") if key == "interval" else [value]
        if key == "interval" and len(words) != 2:
            raise ValueError(f"{text!r}: interval={value} must be LO-HI, e.g. interval=0.2-0.8")
        flags += [SAMPLER_KEYS[key], *words]
    return flags


def _evaluate(
    ref_path: Path, judge: Path, dit: Path, per_class: int, sampler: str | None
) -> dict[str, Any]:
    """Run `tasks.evaluate` on one DiT export (with the export's sampler, or `sampler`)."""
    out = dit / ("report" if sampler is None else "report-" + re.sub("[:=]", "-", sampler))
    cmd = [sys.executable, "-m", "tasks.evaluate", "--dataset", str(ref_path)]
    cmd += ["--classifier", str(judge), "--dit", str(dit), "--out", str(out), "--overwrite"]
    cmd += ["--samples-per-class", str(per_class), "--no-inception-download"]
    if sampler is not None:
        cmd += _sampler(sampler)
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
    return {**json.loads((out / "report.json").read_text()), "report_dir": str(out)}


def _sampler_words(s: dict[str, Any]) -> str:
    """A report's sampling section in the table's words, the levers only where they are used."""
    words = f"{s['method']} {s['steps']} steps, "
    words += f"{'auto' if s.get('guidance') == 'auto' else 'CFG'} {s['cfg_scale']:g}"
    if (interval := s.get("guidance_interval")) is not None:
        words += f" in [{interval[0]:g}, {interval[1]:g}]"
    if s.get("time_shift", 1.0) != 1.0:
        words += f", shift {s['time_shift']:g}"
    return words


def _dit_row(name: str, result: dict, report: dict) -> dict[str, Any]:
    m, metrics, s = report["metrics"], result["metrics"], report["sampling"]
    return {
        "recipe": name,
        "sampler": _sampler_words(s),
        "steps": metrics["steps"],
        "img/s": round(metrics["images_per_s"]),
        "final loss": round(metrics["final_loss"], 4),
        "spent s": round(metrics["budget_spent_s"], 1),
        "cat→cat": m.get("generator.conditional_accuracy.cat"),
        # The same classifier on real held-out cats at the DiT's size: the ceiling of cat→cat.
        "real cat→cat": m.get("classifier.class_accuracy_at_dit_size.cat"),
        "cond. acc": m["generator.conditional_accuracy"],
        "FD (clf)": m.get("generator.classifier_fd"),
        "KID (clf)": m.get("generator.classifier_kid"),
        "precision": m.get("generator.precision"),
        "recall": m.get("generator.recall"),
    }


def _classifier_row(name: str, result: dict) -> dict[str, Any]:
    metrics = result["metrics"]
    return {
        "recipe": name,
        "steps": metrics["steps"],
        "img/s": round(metrics["images_per_s"]),
        "val acc": metrics["val_accuracy"],
        "balanced": metrics["val_balanced_accuracy"],
        "val loss": round(metrics["val_loss"], 4),
        # On the real held-out images at the DiT's 32 px, enlarged as the judge enlarges samples.
        **{
            label: metrics.get(key)
            for label, key in (
                ("acc@32", "val_accuracy_at_32px"),
                ("cat@32", "val_accuracy.cat_at_32px"),
                ("other@32", "val_accuracy.other_at_32px"),
            )
        },
        "spent s": round(metrics["budget_spent_s"], 1),
    }


def _table(rows: list[dict[str, Any]]) -> str:
    def fmt(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    head = list(rows[0])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(row[k]) for k in head) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(RECIPES))
    parser.add_argument("--recipes", nargs="+", help="default: all of the kind's recipes")
    parser.add_argument("--budget", type=float, default=10.0, help="minutes per training")
    parser.add_argument("--out", type=Path, default=REPO / "bench-runs")
    parser.add_argument("--judge", type=Path, help="classifier export judging the DiT samples")
    parser.add_argument("--samples-per-class", type=int, default=200)
    parser.add_argument(
        "--samplers",
        nargs="+",
        metavar="METHOD:STEPS:CFG[:KEY=VALUE...]",
        help="DiT only: evaluate each export with these samplers (e.g. euler:25:2 heun:16:3, "
        "heun:16:5:interval=0.2-0.85:shift=2:guide=auto) instead of its own default",
    )
    parser.add_argument(
        "--repa-teacher",
        type=Path,
        help="DiT only: the classifier export that the REPA recipes align to; not the --judge",
    )
    parser.add_argument("--retrain", action="store_true")
    args = parser.parse_args()

    recipes = args.recipes or list(RECIPES[args.kind])
    unknown = sorted(set(recipes) - set(RECIPES[args.kind]))
    if unknown:
        parser.error(f"unknown {args.kind} recipes {unknown}; known: {sorted(RECIPES[args.kind])}")
    if args.kind == "dit" and not (args.judge and (args.judge / "config.json").is_file()):
        parser.error("dit needs --judge: a classifier export (run the classifier bench first)")
    if need := [n for n in recipes if RECIPES[args.kind][n][1].get("repa_teacher") == REPA_TEACHER]:
        teacher = args.repa_teacher
        if not (teacher and (teacher / "config.json").is_file()):
            parser.error(f"recipes {need} need --repa-teacher: a classifier export (not --judge)")
        # REPA trains the DiT towards the teacher's features and the FD is measured in the
        # judge's: the same network in both roles would game the figures.
        if args.judge and teacher.resolve() == args.judge.resolve():
            parser.error("--repa-teacher must not be the --judge: pass another classifier export")
        _use_teacher(teacher.resolve())
    if not PETIMAGES.is_file():
        parser.error(f"{PETIMAGES} is missing; it comes with ../shared/datasets")
    for spec in args.samplers or []:
        try:
            _sampler(spec)
        except ValueError as exc:
            parser.error(f"--samplers {exc}")

    # One dataset version for both benches (every recipe's size), so that the DiTs and their
    # judge share a version and its held-out split.
    sizes = {int(_config(kind, name)["image_size"]) for kind in RECIPES for name in RECIPES[kind]}
    if args.judge:
        sizes.add(json.loads((args.judge / "config.json").read_text())["image_size"])
    ref = _dataset(args.out / "data", sizes)
    ref_path = Path(ref.root) / "reference.json"

    rows = []
    for name in recipes:
        run_dir = args.out / f"{args.kind}-{name}"
        result = _train(args.kind, name, ref_path, run_dir, args.budget, args.retrain)
        if args.kind == "classifier":
            rows.append(_classifier_row(name, result))
        else:
            # Evaluate on the version the DiT was trained on (the held-out split is per version).
            trained_on = json.loads((run_dir / "config.json").read_text())["dataset_version"]
            dit_ref = args.out / "data" / trained_on / "reference.json"
            for sampler in args.samplers or [None]:
                report = _evaluate(dit_ref, args.judge, run_dir, args.samples_per_class, sampler)
                rows.append(_dit_row(name, result, report))
                print(json.dumps(rows[-1]), flush=True)
                print(f"grid: {Path(report['report_dir']) / report['files']['grid']}", flush=True)
            continue
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.kind} recipes, {args.budget:g} min each, PetImages species ({ref.version}):\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
