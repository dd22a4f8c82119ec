"""REPA (Yu et al. 2025 §3) on real photos: a trained classifier export as the frozen teacher of a
DiT-Nano/4 (64 tokens); the alignment is learnt, resumes bit-identically, averages over ranks, and
bad teachers or depths fail in one line before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

import tasks.train_dit as train_dit_module
from models.classifier import build_classifier
from tasks.train_classifier import PRESETS as CLASSIFIER_PRESETS
from tasks.train_classifier import train_classifier
from tasks.train_dit import PRESETS, DiTConfig, train_dit
from tasks.training.checkpoint import list_checkpoints, load_latest
from tasks.training.export import write_export
from tasks.training.repa import AlignedDiT, load_teacher, repa_loss

REPO = Path(__file__).resolve().parents[1]


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def teacher_dir(oxford_mini_species_ref, tmp_path_factory) -> Path:
    """ResNet-8 with the CIFAR stem at 32 px, 12 steps: an 8x8 map of 256 channels, the
    DiT-Nano/4 token grid at 32 px."""
    config = {
        **CLASSIFIER_PRESETS["cpu-tiny"].model_dump(),
        "backbone": "resnet8",
        "small_input_stem": True,
        "steps": 12,
        "ckpt_every_steps": 12,
        "device": "cpu",
        "num_threads": 1,
    }
    run_dir = tmp_path_factory.mktemp("teacher") / "run"
    return Path(train_classifier(config, oxford_mini_species_ref, run_dir)["run_dir"])


def repa(teacher: Path, **overrides) -> DiTConfig:
    """cpu-tiny (DiT-Nano/4 at 32 px: 64 tokens, depth 2; 30 steps, checkpoints at 15 and 30)
    with REPA on block 1 of 2."""
    base = {**PRESETS["cpu-tiny"].model_dump(), "device": "cpu", "num_threads": 1}
    return DiTConfig.model_validate(
        {**base, "repa_teacher": str(teacher), "repa_depth": 1, **overrides}
    )


def _rows(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for line in lines if (row := json.loads(line))["kind"] == kind]


@pytest.fixture(scope="module")
def trained(teacher_dir, oxford_mini_species_ref, tmp_path_factory):
    """One 30-step REPA run, and the teacher object that run trained against."""
    seen = []

    def spy(spec):
        seen.append(load_teacher(spec))
        return seen[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_dit_module, "load_teacher", spy)
        run_dir = tmp_path_factory.mktemp("repa") / "run"
        result = train_dit(repa(teacher_dir), oxford_mini_species_ref, run_dir)
    (teacher,) = seen
    return result, teacher


def test_feature_map_pools_to_the_features():
    # The map is the last one before pooling: pooled (and, for MobileNetV3, passed through its
    # hidden layer) it gives forward_features, so no stage is skipped or added.
    x = torch.randn(2, 3, 32, 32)
    for backbone, stem in (("resnet8", True), ("resnet10", False), ("mobilenet_v3_small", True)):
        net = build_classifier(backbone, 2, small_input_stem=stem).eval()
        with torch.no_grad():
            fmap = net.forward_feature_map(x)
            pooled = torch.flatten(net.backbone.avgpool(fmap), 1)
            if backbone.startswith("mobilenet"):
                pooled = net.backbone.classifier(pooled)
            torch.testing.assert_close(pooled, net.forward_features(x), msg=backbone)
    assert fmap.shape == (2, 576, 2, 2)


def test_alignment_is_learnt_and_recorded_in_the_export(trained, teacher_dir):
    result, _ = trained
    run_dir = Path(result["run_dir"])
    rows = _rows(run_dir, "repa")
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    cosines = [r["repa_cosine"] for r in rows]
    # A fresh projector's tokens point anywhere; trained, they follow the teacher's features.
    assert cosines[-1] > cosines[0] + 0.2, cosines
    assert result["metrics"]["repa_cosine"] == cosines[-1]
    config = json.loads((run_dir / "config.json").read_text())
    teacher_config = json.loads((teacher_dir / "config.json").read_text())
    identity = config["repa_teacher"]
    assert identity["path"] == str(teacher_dir.resolve())
    assert identity["dataset_version"] == teacher_config["dataset_version"]
    assert identity["classes"] == teacher_config["classes"] == ["cat", "other"]
    assert config["train_config"]["repa_teacher"] == str(teacher_dir)
    # The projector is trained state, not part of the exported generator.
    assert all(not key.startswith("projector") for key in load_file(run_dir / "model.safetensors"))
    assert "projector" in load_latest(run_dir)


def test_the_teacher_stays_frozen(trained, teacher_dir):
    _, teacher = trained
    exported = load_file(teacher_dir / "model.safetensors")
    state = teacher.net.state_dict()  # BatchNorm running statistics included
    assert state.keys() == exported.keys()
    for key, value in exported.items():
        assert torch.equal(state[key], value), key
    assert not teacher.net.training and not any(p.requires_grad for p in teacher.parameters())
    assert not teacher.train().training  # a caller's train() cannot unfreeze BatchNorm


def test_targets_follow_the_evaluation_pipeline_and_the_token_order(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    norm = teacher.net.export_config["normalisation"]
    mean, std = (torch.tensor(norm[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        fmap = teacher.net.forward_feature_map(((x0 + 1) / 2 - mean) / std)
    targets = teacher(x0, 8)
    assert targets.shape == (2, 64, 256) and targets.dtype == torch.float32
    torch.testing.assert_close(targets[:, 9], fmap[:, :, 1, 1])  # row-major: token 9 = (1, 1)
    assert teacher(x0, 4).shape == (2, 16, 256)  # resampled to another DiT's grid
    assert teacher(x0[:, :, ::2, ::2], 8).shape == (2, 64, 256)  # 16 px images enlarged first


def test_the_hook_captures_the_chosen_block(teacher_dir):
    dit = train_dit_module.DiT(**repa(teacher_dir).architecture(num_classes=2)).eval()
    aligned = AlignedDiT(dit, 256, depth=2, hidden=32).eval()
    seen = []
    dit.blocks[1].register_forward_hook(lambda m, a, out: seen.append(out))
    x, t, y = torch.randn(2, 3, 32, 32), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(aligned(x, t, y), dit(x, t, y))
        torch.testing.assert_close(aligned.projected, aligned.projector(seen[0]))
    assert aligned.projected.shape == (2, 64, 256)
    assert repa_loss(aligned.projected, aligned.projected.detach()).item() == pytest.approx(-1)
    with pytest.raises(ValueError, match="repa_depth=3 must be between 1 and depth=2"):
        AlignedDiT(dit, 256, depth=3, hidden=32)


def test_exact_resume_with_repa(trained, teacher_dir, oxford_mini_species_ref, tmp_path):
    """30 steps in one go == 20 steps, interrupted (the step-15 checkpoint is the newest), then
    resumed: every weight, the projector's included, bit for bit."""
    straight = Path(trained[0]["run_dir"])

    def stop_at_20(row):
        if row["step"] == 20:
            raise _Stop

    with pytest.raises(_Stop):
        train_dit(repa(teacher_dir), oxford_mini_species_ref, tmp_path, progress=stop_at_20)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000015.pt"]
    result = train_dit(repa(teacher_dir), oxford_mini_species_ref, tmp_path)
    assert result["metrics"]["resumed_from_step"] == 15
    a, b = load_latest(straight), load_latest(tmp_path)
    for part in ("model", "projector"):
        for key, value in a[part].items():
            assert torch.equal(value, b[part][key]), f"{part}.{key}"
    exported = load_file(tmp_path / "model.safetensors")
    for key, value in load_file(straight / "model.safetensors").items():
        assert torch.equal(value, exported[key]), key
    assert _rows(tmp_path, "repa")[-1] == _rows(straight, "repa")[-1]


def test_two_ranks_average_the_projector_too(teacher_dir, oxford_mini_species_ref, tmp_path):
    # Rank 0 alone saves: had its projector seen only its own 8 images' gradients, it would
    # differ from one process on all 16 by far more than the all-reduce's rounding (see
    # tests/test_distributed.py for the tolerance).
    # fp32 for float32's tolerance (see tests/test_distributed.py's _config).
    short = dict(steps=4, ckpt_every_steps=4, sample_every=1000, precision="fp32")
    train_dit(repa(teacher_dir, **short), oxford_mini_species_ref, tmp_path / "one")
    train_dit(repa(teacher_dir, world_size=2, **short), oxford_mini_species_ref, tmp_path / "two")
    a, b = load_latest(tmp_path / "one"), load_latest(tmp_path / "two")
    for part in ("projector", "model"):
        for key, value in a[part].items():
            torch.testing.assert_close(value, b[part][key], rtol=0, atol=1e-6, msg=key)


def _cli(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tasks.train_dit", "--preset", "cpu-tiny", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_bad_teachers_and_depths_fail_in_one_line_before_any_work(
    trained, teacher_dir, oxford_mini_species_ref, tmp_path
):
    ref = oxford_mini_species_ref.model_dump_json()
    proc = _cli("--dataset", ref, "--run-dir", str(tmp_path / "run"), "--repa-teacher", "nope")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "repa_teacher='nope'" in proc.stderr and "model.safetensors not found" in proc.stderr
    assert not (tmp_path / "run").exists()
    flags = ("--repa-teacher", str(teacher_dir), "--repa-depth", "3")
    proc = _cli("--dataset", ref, "--run-dir", str(tmp_path / "run"), *flags)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "repa_depth=3 exceeds the DiT's depth=2" in proc.stderr
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValidationError, match="repa_depth=3 exceeds"):
        repa(teacher_dir, repa_depth=3)
    repa(teacher_dir, repa_depth=3, depth=3)  # fits a deeper DiT
    # Another kind of export, a deployment without a champion, a map with nothing spatial.
    flat = tmp_path / "flat"
    net = build_classifier("mobilenet_v3_small", 2)  # stride 32: 1x1 at 32 px
    write_export(flat, net.state_dict(), _classifier_config(teacher_dir))
    cases = {
        trained[0]["run_dir"]: "holds a 'dit' export, expected 'classifier'",
        "champion:nowhere": "deployment 'nowhere' has no classifier champion",
        str(flat): "is 1x1 (mobilenet_v3_small, small_input_stem=False), nothing spatial",
    }
    for spec, message in cases.items():
        with pytest.raises(ValueError, match=r"^repa_teacher=") as caught:
            train_dit(repa(spec), oxford_mini_species_ref, tmp_path / "run")
        assert message in str(caught.value) and "\n" not in str(caught.value)
        assert not (tmp_path / "run").exists()


def _classifier_config(like: Path) -> dict:
    config = json.loads((like / "config.json").read_text())
    config.pop("train_config", None)
    return {**config, "backbone": "mobilenet_v3_small", "small_input_stem": False}


def test_the_repa_recipe_needs_a_teacher_that_is_not_the_judge(teacher_dir, monkeypatch):
    bench = [sys.executable, "-m", "benchmarks.bench_recipes", "dit", "--recipes", "cpu-small"]
    for flags, message in (
        ([], "recipes ['repa'] need --repa-teacher"),
        (["--repa-teacher", str(teacher_dir)], "--repa-teacher must not be the --judge"),
    ):
        proc = subprocess.run(
            [*bench, "repa", "--judge", str(teacher_dir), *flags],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    import benchmarks.bench_recipes as recipes

    monkeypatch.setattr(recipes, "DIT_RECIPES", dict(recipes.DIT_RECIPES))
    recipes._use_teacher(teacher_dir)
    assert recipes.DIT_RECIPES["repa"] == (
        "cpu-small-no-teacher",
        {"repa_teacher": str(teacher_dir), "repa_depth": 2},
    )


def test_the_evaluation_refuses_the_dits_teacher_as_its_judge(
    trained, teacher_dir, oxford_mini_species_ref, tmp_path
):
    """The DiT was pulled towards the teacher's features: judged in them it would look better
    than it is. The evaluation refuses the pair before any model runs and writes nothing; a copy
    of the teacher's weights elsewhere is the same judge, and is refused too."""
    from tasks.evaluate import evaluate

    result, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(teacher_dir, copy)
    for judge in (teacher_dir, copy):
        out = tmp_path / f"report-{judge.name}"
        with pytest.raises(ValueError, match="is the REPA teacher of the DiT"):
            evaluate(oxford_mini_species_ref, classifier=judge, dit=result["run_dir"], out=out)
        assert not out.exists()
