"""The recipe comparison's recipes: valid configs, passed intact through the trainers' CLI, and a
baseline that stays the issue's plain recipe whatever the presets become."""

from __future__ import annotations

import pytest

from benchmarks.bench_recipes import RECIPES, _config, _flags
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
    assert _config("dit", "cpu-small") == DIT_PRESETS["cpu-small"].model_dump()


def test_the_repa_preset_is_the_measured_winner_with_the_classifier_champion_as_teacher():
    """`cpu-small-repa` must be what round two measured as x-pred-repa, field for field, with the
    `classifier` deployment's champion in the teacher's place (the recipe takes a folder)."""
    preset = DIT_PRESETS["cpu-small-repa"].model_dump()
    recipe = _config("dit", "x-pred-repa")
    assert preset.pop("repa_teacher") == "champion:classifier"
    recipe.pop("repa_teacher")
    assert preset == recipe
    assert (preset["prediction"], preset["repa_depth"]) == ("x", 2)
