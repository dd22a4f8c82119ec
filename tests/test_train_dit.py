"""DiT training on real photos: learning, exact resume (incl. SIGKILL), exports, budget, errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_inside_the_budget
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import load_file

from models.dit import DiT
from tasks.exported import load_dit, sample
from tasks.train_dit import PRESETS, DiTConfig, train_dit
from tasks.training.checkpoint import ResumeMismatchError, list_checkpoints
from tasks.training.schedule import WarmupCosine

REPO = Path(__file__).resolve().parents[1]


def tiny(**overrides) -> DiTConfig:
    """The cpu-tiny preset (DiT-Nano/4 at 32 px, 30 steps, checkpoints at 15 and 30)."""
    return DiTConfig.model_validate({**PRESETS["cpu-tiny"].model_dump(), **overrides})


def _python(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _weights_equal(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def trained(oxford_mini_species_ref, tmp_path_factory):
    """One finished cpu-tiny run on oxford-pets-mini (species), shared read-only by the tests."""
    rows: list[dict] = []
    run_dir = tmp_path_factory.mktemp("dit") / "run"
    result = train_dit(tiny(), oxford_mini_species_ref, run_dir, progress=rows.append)
    return result, rows


def test_loss_falls_and_run_exports_everything(trained, oxford_mini_species_ref):
    result, rows = trained
    json.dumps(result)  # JSON-able, as the Prefect and Modal adapters need
    assert result["dataset_version"] == oxford_mini_species_ref.version
    assert [r["step"] for r in rows] == [5, 10, 15, 20, 25, 30]
    assert set(rows[0]) == {"step", "total_steps", "loss", "lr", "images_per_s"}
    assert rows[-1]["loss"] < 0.85 * rows[0]["loss"], [r["loss"] for r in rows]
    run_dir = Path(result["run_dir"])
    for key in ("weights", "config", "metrics", "samples", "checkpoint"):
        assert Path(result["files"][key]).is_file(), key
    assert [p.name for p in list_checkpoints(run_dir)] == ["step_000000030.pt", "step_000000015.pt"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["classes"] == ["cat", "other"] and config["image_size"] == 32
    # Readable by whoever can read the config (safetensors alone would write 0600).
    modes = {
        (run_dir / name).stat().st_mode & 0o777 for name in ("config.json", "model.safetensors")
    }
    assert len(modes) == 1, modes
    assert config["arch"]["num_classes"] == 2 and config["arch"]["patch_size"] == 4
    # One row per class, samples_per_class columns of 32 px tiles with 1 px padding.
    grid = Image.open(result["files"]["samples"])
    assert grid.size == (4 * 33 + 1, 2 * 33 + 1)
    assert (run_dir / "samples" / "step_0000015.png").is_file()
    # The export holds the EMA weights, not the raw ones.
    state = torch.load(result["files"]["checkpoint"], weights_only=True)
    exported = load_file(result["files"]["weights"])
    assert all(torch.equal(exported[k], v) for k, v in state["ema"]["shadow"].items())
    assert not all(torch.equal(exported[k], v) for k, v in state["model"].items())


def test_load_dit_and_sample_in_a_fresh_process(trained, tmp_path):
    run_dir = trained[0]["run_dir"]
    out = tmp_path / "x.pt"
    proc = _python(
        f"""
        import torch
        from tasks.exported import sample
        torch.save(sample({run_dir!r}, ["other", "cat"], 2, steps=4, method="heun",
                          cfg_scale=1.5, seed=3), {str(out)!r})
        """
    )
    assert proc.returncode == 0, proc.stderr
    model = load_dit(run_dir)
    assert isinstance(model, DiT) and not model.training
    here = sample(model, ["other", "cat"], 2, steps=4, method="heun", cfg_scale=1.5, seed=3)
    there = torch.load(out, weights_only=True)
    assert here.shape == (4, 3, 32, 32) and here.dtype == torch.float32
    assert here.min() >= 0.0 and here.max() <= 1.0
    torch.testing.assert_close(here, there, rtol=0, atol=1e-6)
    assert not torch.equal(here, sample(model, ["other", "cat"], 2, steps=4, seed=4))
    with pytest.raises(ValueError, match=r"unknown class name\(s\) \['dog'\]"):
        sample(model, ["dog"], 1)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate-weights", r"model\.safetensors is not a readable safetensors file"),
        ("truncate-config", r"config\.json is not valid JSON"),
        ("patch-size", r"model\.safetensors does not fit the architecture in config\.json"),
        ("input-size", r"arch\.input_size vs image_size: 64 != 32"),
        ("classes", r"arch\.num_classes vs len\(classes\): 2 != 1"),
    ],
)
def test_a_damaged_or_inconsistent_export_fails_naming_the_file(trained, tmp_path, damage, message):
    """The old codebase's evaluation could not load its own checkpoints; here a broken export
    is refused with an error naming the file, never loaded at the wrong size or silently."""
    export = tmp_path / "export"
    export.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(Path(trained[0]["run_dir"]) / name, export / name)
    load_dit(export)  # the intact copy loads
    config = json.loads((export / "config.json").read_text())
    if damage == "truncate-weights":
        data = (export / "model.safetensors").read_bytes()
        (export / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "truncate-config":
        (export / "config.json").write_text((export / "config.json").read_text()[:80])
    else:
        if damage == "patch-size":
            config["arch"]["patch_size"] = 8
        elif damage == "input-size":
            config["arch"]["input_size"] = 64
        else:
            config["classes"] = config["classes"][:1]
        (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_dit(export)


def test_exact_resume_after_sigkill(trained, oxford_mini_species_ref, tmp_path):
    """30 steps in one go (the `trained` run) == 15 steps, SIGKILL at step 20, then a resume
    from the step-15 checkpoint by the command line in a new process."""
    ref_json = oxford_mini_species_ref.model_dump_json()
    straight, killed = Path(trained[0]["run_dir"]), tmp_path / "killed"
    cli = [sys.executable, "-m", "tasks.train_dit", "--dataset", ref_json, "--preset", "cpu-tiny"]
    # The child kills itself with SIGKILL from its progress callback after step 20: no cleanup,
    # no final checkpoint, exactly like a preempted container.
    proc = _python(
        f"""
        import os, signal
        from tasks.train_dit import PRESETS, train_dit
        def die(row):
            if row["step"] == 20:
                os.kill(os.getpid(), signal.SIGKILL)
        train_dit(PRESETS["cpu-tiny"], {ref_json!r}, {str(killed)!r}, progress=die)
        """
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert [p.name for p in list_checkpoints(killed)] == ["step_000000015.pt"]
    assert not (killed / "model.safetensors").exists()
    resumed = subprocess.run(
        [*cli, "--run-dir", str(killed)], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert result["metrics"]["resumed_from_step"] == 15
    assert result["metrics"]["steps_this_run"] == 15
    _weights_equal(straight / "model.safetensors", killed / "model.safetensors")
    a = torch.load(straight / "checkpoints/step_000000030.pt", weights_only=True)
    b = torch.load(killed / "checkpoints/step_000000030.pt", weights_only=True)
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=0, atol=1e-6)
    # metrics.jsonl reads as one run: the rows the killed process logged after step 15 are gone.
    steps = [
        json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    train_steps = steps[: steps.index(30) + 1]
    assert train_steps == sorted(set(train_steps))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(
    trained, oxford_mini_species_ref, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0]["run_dir"], run_dir)
    newest = run_dir / "checkpoints" / "step_000000030.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    (run_dir / "model.safetensors").unlink()
    with pytest.warns(RuntimeWarning, match="skipping unreadable checkpoint"):
        result = train_dit(tiny(), oxford_mini_species_ref, run_dir)
    assert result["metrics"]["resumed_from_step"] == 15
    _weights_equal(Path(trained[0]["files"]["weights"]), run_dir / "model.safetensors")


def test_resume_refuses_another_config_or_dataset_but_takes_more_steps(
    trained, oxford_mini_species_ref, tmp_path
):
    run_dir = tmp_path / "run"
    shutil.copytree(trained[0]["run_dir"], run_dir)
    with pytest.raises(ResumeMismatchError, match=r"lr: 0.001 -> 0.002"):
        train_dit(tiny(lr=2e-3), oxford_mini_species_ref, run_dir)
    other = oxford_mini_species_ref.model_copy(update={"version": "oxford-other"})
    with pytest.raises(ResumeMismatchError, match=r"dataset version '.*' -> 'oxford-other'"):
        train_dit(tiny(), other, run_dir)
    again = train_dit(tiny(), oxford_mini_species_ref, run_dir)  # finished: nothing to train
    assert again["metrics"]["steps_this_run"] == 0
    more = train_dit(tiny(steps=35, log_every=1), oxford_mini_species_ref, run_dir)
    assert more["metrics"]["steps"] == 35 and more["metrics"]["steps_this_run"] == 5


def test_cpu_small_recipe_features_train_in_bf16_and_export_fp32(oxford_mini_species_ref, tmp_path):
    """The cpu-small recipe (conv stem, U-ViT long skips, final conv, QK-norm, math attention)
    in bf16 autocast at cpu-tiny's width: it learns, exports fp32 weights and reloads."""
    small = PRESETS["cpu-small"]
    recipe = {k: getattr(small, k) for k in ("qk_norm", "long_skip", "final_conv", "sdpa_backend")}
    assert small.stem_channels > 0 and all(recipe.values())
    rows: list[dict] = []
    # 80 steps: the conv stem slows the first few dozen (it starts by shrinking the pixels).
    config = tiny(**recipe, stem_channels=8, depth=3, precision="bf16", sample_steps=4, steps=80)
    result = train_dit(config, oxford_mini_species_ref, tmp_path, progress=rows.append)
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"], [r["loss"] for r in rows]
    assert result["metrics"]["precision"] == "bf16"  # what the run computed in, logged
    weights = load_file(result["files"]["weights"])
    assert {w.dtype for w in weights.values()} == {torch.float32}
    assert any(k.startswith("skip_projections.") for k in weights)
    assert any(k.startswith("stem.") for k in weights) and "final_conv.weight" in weights
    model = load_dit(tmp_path)
    assert model.config["stem_channels"] == 8 and model.config["long_skip"]
    images = sample(model, ["cat", "other"], n_per_class=2, steps=2, seed=0)
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32


def test_compiled_model_checkpoint_loads_into_a_plain_model(oxford_mini_species_ref, tmp_path):
    """Real torch.compile on the CPU (inductor, C++ codegen): the slowest test here (~30 s on 2
    loaded cores), kept to a one-block DiT and 2 steps."""
    config = tiny(compile=True, steps=2, ckpt_every_steps=1, sample_every=100, depth=1)
    result = train_dit(config, oxford_mini_species_ref, tmp_path)
    state = torch.load(result["files"]["checkpoint"], weights_only=True)
    assert not [k for k in state["model"] if "_orig_mod" in k]
    plain = DiT(**json.loads(Path(result["files"]["config"]).read_text())["arch"])
    plain.load_state_dict(state["model"], strict=True)
    plain.load_state_dict(load_file(result["files"]["weights"]), strict=True)
    # compile is an execution detail: a plain process may continue the compiled run.
    plain_config = config.model_copy(update={"compile": False, "steps": 3})
    more = train_dit(plain_config, oxford_mini_species_ref, tmp_path)
    assert more["metrics"]["resumed_from_step"] == 2 and more["metrics"]["steps"] == 3


def test_time_budget_finishes_with_exports_inside_it(oxford_mini_species_ref, tmp_path):
    budget_min = 0.25
    config = tiny(steps=1_000_000, time_budget_minutes=budget_min, log_every=20, sample_every=100)
    t0 = time.monotonic()
    result = train_dit(config, oxford_mini_species_ref, tmp_path)
    metrics = result["metrics"]
    assert_inside_the_budget(metrics, budget_min, time.monotonic() - t0)
    assert 5 <= metrics["steps"] < 1_000_000
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    if torch.get_num_threads() > 1:  # the thread count was measured, not assumed
        assert [r["threads"] for r in rows if r["kind"] == "threads"][:1] in ([1], [2])
    # The schedule followed the plan: the final plan is where training stopped, and the LR of the
    # last update had decayed close to its floor (the plan moves with the throughput, so this is
    # read from the final checkpoint rather than from the last logged row).
    schedule = WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 1, 0, 1)
    schedule.load_state_dict(torch.load(result["files"]["checkpoint"])["scheduler"])
    assert abs(schedule.total_steps - metrics["steps"]) <= 2
    assert schedule.lr_at(metrics["steps"] - 1) < 0.3 * config.lr
    assert train_rows and train_rows[-1]["lr"] <= config.lr
    for key in ("weights", "config", "samples"):
        assert Path(result["files"][key]).is_file()


def test_bad_configs_fail_early_naming_the_field(oxford_mini_species_ref, tmp_path):
    with pytest.raises(ValidationError, match=r"patch_size=3 must divide image_size=32"):
        tiny(patch_size=3)
    with pytest.raises(ValidationError, match=r"steps\n.*greater than or equal to 1"):
        tiny(steps=0)
    with pytest.raises(ValidationError, match=r"arch='DiT-Q/4' is unknown"):
        tiny(arch="DiT-Q/4")
    # No cache at 48 px: refused before any work (not even the run dir is created).
    with pytest.raises(ValueError, match=r"image_size=48: dataset .* has caches at \[32, 64\]"):
        train_dit(tiny(image_size=48), oxford_mini_species_ref, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_help_and_bad_override():
    helped = subprocess.run(
        [sys.executable, "-m", "tasks.train_dit", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert helped.returncode == 0
    for flag in ("--dataset", "--run-dir", "--preset", "--steps", "--time-budget", "--patch-size"):
        assert flag in helped.stdout
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tasks.train_dit",
            "--dataset",
            "{}",
            "--run-dir",
            "x",
            "--steps",
            "0",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    # A usage error: status 2 and argparse's one-line message naming the field, no traceback.
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    # One line, naming field and bound.
    (line,) = bad.stderr.strip().splitlines()
    assert line.endswith("error: steps: Input should be greater than or equal to 1")
