"""`cpu-small` trains issue 21's winner (x-prediction + REPA to the `classifier` deployment's
champion) where that champion exists and another classifier can judge the DiT, and the recipe it
beat (velocity, no REPA) where not: the choice, in the flow with real champions and trainings,
and on the trainer's command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from conftest import OXFORD_MINI, REPO

from flows.train_cats import train_cats
from tasks.adapters.lifecycle import choose_repa, find_judge
from tasks.configs.dit import PRESETS, DiTConfig
from tasks.training.export import WEIGHTS

# cpu-small's REPA fields on the seconds-long cpu-tiny (a 2-block DiT: block 1 aligns).
OPTIONAL_REPA = dict(
    prediction="x", repa_teacher="champion:classifier", repa_fallback="velocity", repa_depth=1
)
# A classifier with a spatial last feature map at 32 px (8x8, ResNet-8 with the CIFAR stem): a
# teacher REPA can align to (MobileNetV3's is 1x1 there).
TEACHER = dict(backbone="resnet8", small_input_stem=True, steps=12, ckpt_every_steps=12)
DATASET = {"source": str(OXFORD_MINI), "labels": "species", "image_sizes": [32], "max_other": 40}


def test_cpu_small_without_its_teacher_is_the_recipe_it_beat():
    small = PRESETS["cpu-small"]
    assert small.repa_optional and small.prediction == "x"
    assert small.without_repa() == PRESETS["cpu-small-no-teacher"]
    assert small.without_repa().repa_teacher is None
    assert small.without_repa().prediction == "velocity"
    # A folder is a mistake when missing, never a state: no fallback for it.
    folder = small.model_copy(update={"repa_teacher": "/some/export"})
    assert not folder.repa_optional
    required = small.model_copy(update={"repa_fallback": "error"})
    assert not required.repa_optional
    with pytest.raises(ValueError, match="has no fallback"):
        required.without_repa()
    with pytest.raises(ValueError, match="repa_fallback"):
        DiTConfig.model_validate(small.model_dump() | {"repa_fallback": "noise"})


def test_nothing_to_choose_without_an_optional_teacher(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path))
    for name in ("cpu-tiny", "cpu-small-no-teacher", "gpu"):
        assert choose_repa(PRESETS[name], models=["dit"], backend="local", judged=True) is None
    missing = PRESETS["cpu-small"]
    pinned, line = choose_repa(missing, models=["dit"], backend="local", judged=True)
    assert pinned == {"repa_teacher": None, "prediction": "velocity", "repa_fallback": "error"}
    assert line.startswith("REPA off, predicting velocity: teacher 'champion:classifier'")
    assert "deployment 'classifier' has no classifier champion yet" in line
    # The pinned config is exactly the teacher-less preset.
    pinned_config = DiTConfig.model_validate(missing.model_dump() | pinned)
    assert pinned_config == PRESETS["cpu-small-no-teacher"]


def _run(deployment: str, models: list[str], seed: int = 0):
    state = train_cats(
        dataset=DATASET,
        models=models,
        classifier={"preset": "cpu-tiny", "overrides": {**TEACHER, "seed": seed}},
        dit={"preset": "cpu-tiny", "overrides": OPTIONAL_REPA},
        evaluation={"deployment": deployment, "samples_per_class": 4},
        return_state=True,
    )
    assert state.is_completed(), state.message
    return state.name, state.result()


def _export_config(run_dir: str) -> dict:
    return json.loads((Path(run_dir) / "config.json").read_text())


def test_the_flow_aligns_to_the_champion_only_where_another_classifier_judges(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path / "runs"))

    # The `classifier` deployment promotes its first champion (seed 0): the teacher from now on.
    name, first = _run("classifier", ["classifier"])
    assert name == "Promoted" and first["repa"] is None  # no DiT, nothing to choose
    teacher_dir = Path(first["run_dirs"]["classifier"])

    # A run that trains its own judge with the teacher's seed could train the teacher again.
    config_dit = DiTConfig.model_validate(PRESETS["cpu-tiny"].model_dump() | OPTIONAL_REPA)
    choose = partial(choose_repa, config_dit, backend="local", judged=True, labels="species")
    pinned, line = choose(models=["classifier", "dit"], classifier_seed=0)
    assert pinned["repa_teacher"] is None and "has the teacher's seed 0" in line
    pinned, line = choose(models=["classifier", "dit"], classifier_seed=1)
    assert pinned == {"repa_fallback": "error"} and line.startswith("REPA on")
    with pytest.raises(ValueError, match="pass classifier_seed"):
        choose(models=["classifier", "dit"])
    # Nothing to judge, nothing in the way.
    unjudged = choose_repa(config_dit, models=["dit"], backend="local", judged=False)
    assert unjudged[0] == {"repa_fallback": "error"}

    # The `dit` deployment: that champion is the only classifier that could judge its DiT, so
    # the judge wins and the DiT trains the teacher-less recipe, judged by the champion.
    _, alone = _run("dit", ["dit"])
    assert alone["repa"].startswith("REPA off, predicting velocity: teacher 'champion:classifier'")
    assert "the only classifier champion" in alone["repa"]
    config = _export_config(alone["run_dirs"]["dit"])
    assert "repa_teacher" not in config and "prediction" not in config["arch"]  # velocity
    assert config["train_config"]["repa_teacher"] is None
    report = json.loads((Path(alone["report"]["report_dir"]) / "report.json").read_text())
    assert Path(report["classifier"]["path"]).resolve() == teacher_dir.resolve()
    assert 0 <= report["metrics"]["generator.conditional_accuracy"] <= 1

    # The `all` deployment trains its own judge (seed 1): the DiT aligns to the `classifier`
    # champion, and the new classifier judges it.
    _, both = _run("all", ["classifier", "dit"], seed=1)
    assert both["repa"].startswith("REPA on: block 1 aligns to 'champion:classifier' (run ")
    config = _export_config(both["run_dirs"]["dit"])
    assert config["arch"]["prediction"] == "x"
    assert config["repa_teacher"]["path"] == str(teacher_dir.resolve())
    report = json.loads((Path(both["report"]["report_dir"]) / "report.json").read_text())
    judge_dir = Path(both["run_dirs"]["classifier"]).resolve()
    assert Path(report["classifier"]["path"]).resolve() == judge_dir
    assert 0 <= report["metrics"]["generator.conditional_accuracy"] <= 1

    # The same with the teacher's seed: the flow passes the classifier's seed, and REPA is off.
    name, same_seed = _run("all", ["classifier", "dit"], seed=0)
    assert "has the teacher's seed 0" in same_seed["repa"]
    assert "repa_teacher" not in _export_config(same_seed["run_dirs"]["dit"])
    # Here (fixed steps, same data and seed) its classifier IS the teacher, bit for bit: the
    # `all` DiT champion, aligned to it, cannot be re-evaluated by it, so it stays unseen.
    assert name == "Challenger" and not same_seed["promoted"]["dit"]

    # Now `all` has a classifier champion too: a `dit` run may use the teacher, judged by it;
    # not when the DiT's labels are other than those that champion was trained on.
    assert choose(models=["dit"])[1].startswith("REPA on")
    breed = choose(models=["dit"], labels="breed")[1]
    assert "the only classifier champion trained on breed labels" in breed
    judge = find_judge(report["classifier"]["classes"], "local", "champion:classifier")
    assert judge.deployment == "all"


def test_the_trainer_command_line_falls_back_in_one_warning(oxford_mini_species_ref, tmp_path):
    """`python -m tasks.train_dit --preset cpu-small` before any classifier is promoted trains
    the teacher-less recipe and says so; a required teacher fails instead."""
    base = [sys.executable, "-m", "tasks.train_dit", "--dataset", oxford_mini_species_ref.model_dump_json(),
            "--preset", "cpu-tiny", "--steps", "4", "--sample-every", "4", "--ckpt-every-steps",
            "4", "--prediction", "x", "--repa-teacher", "champion:classifier", "--repa-depth", "1"]  # fmt: skip
    env = {"TRAIN_CATS_RUNS_DIR": str(tmp_path / "runs")}
    done = _cli([*base, "--run-dir", str(tmp_path / "a"), "--repa-fallback", "velocity"], env)
    assert done.returncode == 0, done.stderr
    (warning,) = [line for line in done.stderr.splitlines() if "REPA off" in line]
    assert "predicting velocity: teacher 'champion:classifier': deployment 'classifier'" in warning
    config = _export_config(str(tmp_path / "a"))
    assert "repa_teacher" not in config and "prediction" not in config["arch"]  # velocity

    done = _cli([*base, "--run-dir", str(tmp_path / "b")], env)  # repa_fallback: error
    assert done.returncode == 2 and "no classifier champion yet" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "b" / WEIGHTS).exists()


def _cli(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        argv, cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, **env}
    )


def test_a_champion_without_a_spatial_feature_map_cannot_teach(
    oxford_mini_species_ref, tmp_path, monkeypatch
):
    """A `cpu-tiny` classifier (MobileNetV3 at 32 px: a 1x1 last feature map) promoted for a quick
    try would fail the DiT's training after the dataset and any classifier training: the choice
    sees it first, from the export's config alone, and trains without REPA."""
    from tasks.champions import Champion, write_champion
    from tasks.train_classifier import PRESETS as CLASSIFIER_PRESETS
    from tasks.train_classifier import train_classifier
    from tasks.training.repa import flat_feature_map

    monkeypatch.setenv("TRAIN_CATS_RUNS_DIR", str(tmp_path))
    config = CLASSIFIER_PRESETS["cpu-tiny"].model_copy(update={"steps": 4, "ckpt_every_steps": 4})
    run_dir = Path(train_classifier(config, oxford_mini_species_ref, tmp_path / "r1")["run_dir"])
    write_champion(
        Champion(
            deployment="classifier", kind="classifier", run_name="r1", report="r1/report",
            classes=["cat", "other"], dataset_version="v", fingerprint={"configs": {}},
            promoted_at="2026-12-05T00:00:00+00:00",
        )
    )  # fmt: skip
    pinned, line = choose_repa(PRESETS["cpu-small"], models=["dit"], backend="local", judged=False)
    assert pinned["repa_teacher"] is None
    assert "its last feature map at its 32 px is 1x1 (mobilenet_v3_small" in line
    export = json.loads((run_dir / "config.json").read_text())
    assert flat_feature_map({**export, "small_input_stem": True}) is None  # 2x2 with the stem
