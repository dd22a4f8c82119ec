"""The `gpu` presets validate and build, and docs/gpu_presets.md shows this code's arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import gpu_presets
from tasks.train import build_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "gpu_presets.md"


@pytest.mark.parametrize("model", ["dit", "classifier"])
def test_gpu_preset_validates_and_builds(model: str):
    config = build_config(model, "gpu")
    # The dumped preset passes its own validators again (what a Modal call receives).
    type(config).model_validate(config.model_dump())
    classes = gpu_presets.default_data(model)["classes"]
    net = gpu_presets.build_on_meta(model, config, classes)
    params = sum(p.numel() for p in net.parameters())
    assert 20e6 < params < 40e6, params
    assert config.time_budget_minutes and config.compile
    if model == "dit":
        assert net.grid_size**2 == 1024 and config.lr == 5e-4 and config.batch_size == 128


def test_doc_table_matches_the_script():
    rows = [gpu_presets.preset_figures(model) for model in ("dit", "classifier")]
    table = gpu_presets.markdown_table(rows)
    assert table in DOC.read_text(), (
        "docs/gpu_presets.md's table differs from the presets' arithmetic; regenerate it with "
        "`.venv/bin/python -m benchmarks.gpu_presets` and revise the text around it:\n" + table
    )
