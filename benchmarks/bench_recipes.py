"""Compare training recipes at a fixed wall-clock budget on the shared PetImages cats and dogs.

Each recipe (`benchmarks/recipes.py`) is a preset plus overrides, trained from scratch in a fresh
process with `--time-budget`, then measured by the project's own evaluation (`tasks.evaluate`)
on the held-out split. This is the evidence behind the `cpu-small` presets (issue 6 §2-§4):

    # 1. classifiers: prints val accuracy per recipe; the export of each lands in --out
    .venv/bin/python -m benchmarks.bench_recipes classifier
    # 2. DiTs, judged by a classifier from step 1: cat-conditioned samples called "cat",
    #    conditional accuracy and Fréchet distance in the classifier's features
    .venv/bin/python -m benchmarks.bench_recipes dit --judge bench-runs/classifier-cpu-small
    # 3. REPA (issue 21 §3) aligns to a classifier export other than the judge, e.g. another
    #    recipe's from step 1; a repa recipe without --repa-teacher is a usage error
    .venv/bin/python -m benchmarks.bench_recipes dit --recipes cpu-small repa \
        --judge bench-runs/classifier-cpu-small --repa-teacher bench-runs/classifier-resnet10

`--recipes` picks a subset, `--budget` sets the minutes per training (10 = the issue's budget;
another budget trains into `<kind>-<recipe>-<N>min`), `--judge` takes one or more classifier
exports (each DiT report lands in `report-<judge folder>`), `--samples-per-class` sets the DiT
samples per class. A recipe whose export already exists in --out is
measured again without retraining unless --retrain, so `--samplers` sweeps sampling-time levers
over one export (issue 21 §2), one report and one table row each:

    .venv/bin/python -m benchmarks.bench_recipes dit --recipes guide-25 --judge ... --samplers \
        heun:16:5 heun:16:5:interval=0.2-0.85 heun:16:5:shift=2 heun:16:2:guide=auto

Run it on an otherwise idle machine: with two busy cores torch's OpenMP threads spin-wait and
throughput collapses.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.recipes import DIT_RECIPES, RECIPES, REPA_TEACHER  # noqa: E402
from data.dataset import DatasetRef, DatasetSpec  # noqa: E402
from data.download import ensure  # noqa: E402
from tasks.configs import CONFIGS  # noqa: E402
from tasks.train import build_config  # noqa: E402

PETIMAGES = REPO.parent / "shared" / "datasets" / "petimages" / "kagglecatsanddogs-180px.zip"
PETIMAGES_SHA256 = "8bbd2356c185cce16913e0db65c3c06162824687d9faae6487f69551adc79639"

TRAINER_MODULES = {"dit": "tasks.train_dit", "classifier": "tasks.train_classifier"}


def _config(kind: str, name: str) -> dict[str, Any]:
    """The recipe's full config (preset + overrides, validated; a misspelt field fails here)."""
    preset, overrides = RECIPES[kind][name]
    return build_config(kind, preset, overrides).model_dump()


def _same_config(kind: str, stored: dict[str, Any], expected: dict[str, Any]) -> bool:
    """Whether a stored run trained `expected`: a recipe or preset edited since must train again,
    but a field added to the config since, at its default, changes nothing that was trained (it
    is filled in by validating the stored config). A field removed since: not the same."""
    config_type = CONFIGS[kind][0]
    try:
        return config_type.model_validate(stored) == config_type.model_validate(expected)
    except ValueError:  # pydantic's ValidationError: a field the config no longer has
        return False


def run_dir_for(out: Path, kind: str, name: str, budget: float) -> Path:
    """`<out>/<kind>-<name>`, with `-<budget>min` for a budget other than the issue's 10
    minutes, so that a longer run never replaces (or passes for) the 10-minute export."""
    return out / (f"{kind}-{name}" + ("" if budget == 10 else f"-{budget:g}min"))


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
        if _same_config(kind, result["config"], expected):
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


def report_dir_for(dit: Path, judge: Path, sampler: str | None) -> Path:
    """`<dit>/report-<judge folder>[-<sampler>]`: one folder per judge and sampler, so that
    judging an export again under another judge never overwrites a report."""
    suffix = "" if sampler is None else "-" + re.sub("[:=]", "-", sampler)
    return dit / f"report-{judge.name}{suffix}"


def _evaluate(
    ref_path: Path, judge: Path, dit: Path, per_class: int, sampler: str | None
) -> dict[str, Any]:
    """Run `tasks.evaluate` on one DiT export (with the export's sampler, or `sampler`).

    The report lands in `report_dir_for(dit, judge, sampler)`."""
    out = report_dir_for(dit, judge, sampler)
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


def _dit_row(name: str, judge: Path, result: dict, report: dict) -> dict[str, Any]:
    m, metrics, s = report["metrics"], result["metrics"], report["sampling"]
    return {
        "recipe": name,
        "judge": judge.name,
        "sampler": _sampler_words(s),
        "steps": metrics["steps"],
        "img/s": round(metrics["images_per_s"]),
        "final loss": round(metrics["final_loss"], 4),
        "spent s": round(metrics["budget_spent_s"], 1),
        "cat→cat": m.get("generator.conditional_accuracy.cat"),
        # The same classifier on real held-out cats at the DiT's size: the ceiling of cat→cat.
        "real cat→cat": m.get("classifier.class_accuracy_at_dit_size.cat"),
        "other→other": m.get("generator.conditional_accuracy.other"),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(RECIPES))
    parser.add_argument("--recipes", nargs="+", help="default: all of the kind's recipes")
    parser.add_argument("--budget", type=float, default=10.0, help="minutes per training")
    parser.add_argument("--out", type=Path, default=REPO / "bench-runs")
    parser.add_argument(
        "--judge",
        type=Path,
        nargs="+",
        default=[],
        help="classifier export(s) judging the DiT samples; each export is judged by each",
    )
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
    args = parser.parse_args(argv)

    recipes = args.recipes or list(RECIPES[args.kind])
    unknown = sorted(set(recipes) - set(RECIPES[args.kind]))
    if unknown:
        parser.error(f"unknown {args.kind} recipes {unknown}; known: {sorted(RECIPES[args.kind])}")
    if args.kind == "dit" and not args.judge:
        parser.error("dit needs --judge: a classifier export (run the classifier bench first)")
    if missing := [str(j) for j in args.judge if not (j / "config.json").is_file()]:
        parser.error(f"--judge {missing}: not classifier exports (no config.json)")
    if len({j.name for j in args.judge}) < len(args.judge):
        parser.error("--judge: two judges share a folder name, and so would their reports")
    if need := [n for n in recipes if RECIPES[args.kind][n][1].get("repa_teacher") == REPA_TEACHER]:
        teacher = args.repa_teacher
        if not (teacher and (teacher / "config.json").is_file()):
            parser.error(f"recipes {need} need --repa-teacher: a classifier export (not --judge)")
        # REPA trains the DiT towards the teacher's features and the FD is measured in the
        # judge's: the same network in both roles would game the figures.
        if any(teacher.resolve() == judge.resolve() for judge in args.judge):
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
    for judge in args.judge:
        sizes.add(json.loads((judge / "config.json").read_text())["image_size"])
    ref = _dataset(args.out / "data", sizes)
    ref_path = Path(ref.root) / "reference.json"

    rows = []
    for name in recipes:
        run_dir = run_dir_for(args.out, args.kind, name, args.budget)
        result = _train(args.kind, name, ref_path, run_dir, args.budget, args.retrain)
        if args.kind == "classifier":
            rows.append(_classifier_row(name, result))
        else:
            # Evaluate on the version the DiT was trained on (the held-out split is per version).
            trained_on = json.loads((run_dir / "config.json").read_text())["dataset_version"]
            dit_ref = args.out / "data" / trained_on / "reference.json"
            for judge, sampler in itertools.product(args.judge, args.samplers or [None]):
                report = _evaluate(dit_ref, judge, run_dir, args.samples_per_class, sampler)
                rows.append(_dit_row(name, judge, result, report))
                print(json.dumps(rows[-1]), flush=True)
                print(f"grid: {Path(report['report_dir']) / report['files']['grid']}", flush=True)
            continue
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{args.kind} recipes, {args.budget:g} min each, PetImages species ({ref.version}):\n")
    print(_table(rows))


if __name__ == "__main__":
    main()
