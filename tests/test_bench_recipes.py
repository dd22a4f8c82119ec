"""The recipe comparison's recipes: valid configs, passed intact through the trainers' CLI, and a
baseline that stays the issue's plain recipe whatever the presets become."""

from __future__ import annotations

import json

import pytest

from benchmarks.bench_recipes import RECIPES, _config, _flags, main, report_dir_for, run_dir_for
from tasks.train import TRAINERS
from tasks.train_dit import PRESETS as DIT_PRESETS
from tasks.train_dit import DiTConfig
from tasks.training.config import build_parser, config_from_args


@pytest.mark.parametrize(("kind", "name"), [(k, n) for k in RECIPES for n in RECIPES[k]])
def test_recipe_flags_give_the_recipe_config(kind, name):
    config_cls, presets = TRAINERS[kind].config_type, TRAINERS[kind].presets
    preset, overrides = RECIPES[kind][name]
    parser = build_parser(config_cls, presets, "")
    args = parser.parse_args(["--dataset", "d", "--run-dir", "r", *_flags(preset, overrides)])
    assert config_from_args(config_cls, presets, args) == config_cls.model_validate(
        _config(kind, name)
    )


def test_plain_dit_recipe_is_the_issue_baseline_and_not_the_preset():
    plain = DiTConfig.model_validate(_config("dit", "plain"))
    arch = plain.architecture(num_classes=2)
    assert (arch["hidden_size"], arch["depth"], arch["patch_size"]) == (256, 8, 4)
    assert (plain.image_size, plain.batch_size, plain.lr) == (32, 64, 3e-4)
    assert plain.time_schedule == "logit_normal" and plain.precision == "fp32"
    # None of the small-compute additions leak in from the cpu-small preset it is based on.
    assert (arch["stem_channels"], arch["long_skip"], arch["final_conv"]) == (0, False, False)
    assert not arch["qk_norm"] and plain.sdpa_backend == "auto"
    # The "before" of every DiT table: cpu-small as it trains without a teacher.
    assert _config("dit", "cpu-small") == DIT_PRESETS["cpu-small"].without_repa().model_dump()
    assert _config("dit", "cpu-small") == DIT_PRESETS["cpu-small-no-teacher"].model_dump()


def test_cpu_small_is_the_measured_winner_with_the_classifier_champion_as_teacher():
    """`cpu-small` must be what round two measured as x-pred-repa, field for field, with the
    `classifier` deployment's champion in the teacher's place (the recipe takes a folder), and
    without a teacher exactly the recipe it beat (velocity, no REPA)."""
    preset = DIT_PRESETS["cpu-small"].model_dump()
    recipe = _config("dit", "x-pred-repa")
    assert preset.pop("repa_teacher") == "champion:classifier"
    assert preset.pop("repa_fallback") == "velocity"
    recipe.pop("repa_teacher")
    recipe.pop("repa_fallback")
    assert preset == recipe
    assert (preset["prediction"], preset["repa_depth"]) == ("x", 2)


def _export(folder):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")


@pytest.mark.parametrize(
    ("judges", "teacher", "message"),
    [
        # REPA pulls the DiT towards the teacher's features: as a judge it would flatter it.
        (["a/clf-a", "b/clf-b"], "b/clf-b", "--repa-teacher must not be the --judge"),
        # Their reports would land in the same report-<folder>.
        (["a/clf", "b/clf"], "t/teacher", "two judges share a folder name"),
        (["a/clf-a", "missing"], "t/teacher", "not classifier exports"),
        ([], "t/teacher", "dit needs --judge"),
    ],
)
def test_bad_judges_are_usage_errors_before_any_work(tmp_path, capsys, judges, teacher, message):
    for name in ("a/clf-a", "b/clf-b", "a/clf", "b/clf", "t/teacher"):
        _export(tmp_path / name)
    argv = ["dit", "--recipes", "x-pred-repa", "--out", str(tmp_path / "out")]
    argv += ["--repa-teacher", str(tmp_path / teacher)]
    if judges:
        argv += ["--judge", *(str(tmp_path / j) for j in judges)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing prepared, nothing trained


def test_each_judge_sampler_and_budget_gets_its_own_folder(tmp_path):
    dit = run_dir_for(tmp_path, "dit", "x-pred-repa", 10)
    assert dit == tmp_path / "dit-x-pred-repa"  # the issue's budget: the folder the docs cite
    assert run_dir_for(tmp_path, "dit", "x-pred-repa", 30) == tmp_path / "dit-x-pred-repa-30min"
    reports = {
        report_dir_for(dit, tmp_path / judge, sampler)
        for judge in ("classifier-cpu-small", "classifier-bf16")
        for sampler in (None, "heun:16:5:interval=0.2-0.8")
    }
    assert len(reports) == 4 and all(r.parent == dit for r in reports)
    assert dit / "report-classifier-bf16-heun-16-5-interval-0.2-0.8" in reports


def test_a_run_from_before_a_config_field_existed_is_reused_not_retrained(tmp_path):
    """A stored run whose config predates a field (here `repa_fallback`, added 2026-12-05) trained
    exactly what the field's default says: measured again, never deleted and retrained. An edited
    recipe, or a field the config no longer has, trains again."""
    from benchmarks.bench_recipes import _same_config, _train

    expected = {**_config("dit", "bf16"), "time_budget_minutes": 10, "progress_bar": False}
    stored = {k: v for k, v in expected.items() if k != "repa_fallback"}
    run_dir = tmp_path / "dit-bf16"
    run_dir.mkdir()
    (run_dir / "model.safetensors").write_bytes(b"the export the docs cite")
    (run_dir / "bench_result.json").write_text(json.dumps({"config": stored, "steps": 3617}))
    result = _train("dit", "bf16", tmp_path / "ref.json", run_dir, 10, retrain=False)
    assert result["steps"] == 3617
    assert (run_dir / "model.safetensors").read_bytes() == b"the export the docs cite"
    assert not _same_config("dit", {**stored, "lr": 5e-4}, expected)
    assert not _same_config("dit", {**stored, "retired_field": 1}, expected)
    # A field added since, at another value than its default, is a different recipe.
    winner = DIT_PRESETS["cpu-small"].model_dump()
    before_the_field = {k: v for k, v in winner.items() if k != "repa_fallback"}
    assert winner["repa_fallback"] != "error"
    assert not _same_config("dit", before_the_field, winner)
