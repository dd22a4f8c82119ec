"""Sampling-time levers (issue 21 §2): guidance in a limited interval, autoguidance with an early
EMA snapshot, and the SD3 time shift; from `models.flow_matching.sample` through a real tiny
training's export to `tasks.evaluate`'s command line and the recipe bench's sampler specs."""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from benchmarks.bench_recipes import _flags, _sampler, _sampler_words
from models.dit import dit_from_config
from models.flow_matching import sample, t_from_sigma, time_grid
from tasks.evaluate import evaluate
from tasks.evaluation.cli import run_cli as evaluate_cli
from tasks.evaluation.report import load_report
from tasks.exported import load_dit, load_guide
from tasks.exported import sample as sample_export
from tasks.train_dit import PRESETS, DiTConfig, train_dit
from tasks.training.config import build_parser, config_from_args
from tasks.training.config import run_cli as train_cli
from tasks.training.guide import SNAPSHOT

pytestmark = pytest.mark.usefixtures("single_thread")


def nano(seed: int) -> torch.nn.Module:
    """A DiT-Nano/4 at 16 px (16 tokens) with a null class, its zero-initialised adaLN and output
    layers perturbed so that its velocity depends on x, t and y."""
    torch.manual_seed(seed)
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=3, class_dropout_prob=0.1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


class Rows:
    """Counts the rows (images) and records the times of a DiT's forward passes, including the
    ones `forward_with_cfg` makes through `self.forward` (which module hooks would miss)."""

    def __init__(self, model: torch.nn.Module):
        self.rows, self.times = 0, []
        self._forward = model.forward
        model.forward = self  # an instance attribute shadows the method, for every caller

    def __call__(self, x, t, y, *args, **kwargs):
        self.rows += x.shape[0]
        self.times.append(float(t[0]))
        return self._forward(x, t, y, *args, **kwargs)


NOISE = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 2])


def test_full_interval_is_plain_cfg_and_an_interval_between_the_steps_is_the_conditional_ode():
    model = nano(0)
    counter = Rows(model)
    cfg = sample(model, NOISE, Y, steps=4, method="heun", cfg_scale=4.0)
    rows_cfg = counter.rows
    assert torch.equal(sample(model, NOISE, Y, 4, "heun", 4.0, guidance_interval=(0, 1)), cfg)

    cond = sample(model, NOISE, Y, steps=4, method="euler")
    counter.rows = 0
    # Euler at 4 steps evaluates t = 1, 0.75, 0.5, 0.25: none lies in [0.8, 0.9].
    empty = sample(model, NOISE, Y, 4, "euler", 4.0, guidance_interval=(0.8, 0.9))
    assert torch.equal(empty, cond)
    assert counter.rows == 4 * len(Y)  # one pass of B rows per step ...
    counter.rows = 0
    guided = sample(model, NOISE, Y, 4, "euler", 4.0)
    assert counter.rows == 2 * 4 * len(Y)  # ... where CFG runs B conditional + B null rows
    assert rows_cfg == 2 * 2 * 4 * len(Y)  # Heun: two velocities per step
    assert not torch.allclose(guided, cond, atol=1e-3)


def test_an_interval_guides_exactly_the_velocities_evaluated_inside_it():
    model = nano(1)
    counter = Rows(model)
    out = sample(model, NOISE, Y, 4, "euler", 3.0, guidance_interval=(0.4, 0.8))
    assert counter.rows == len(Y) * (1 + 2 + 2 + 1)  # t = 1 and 0.25 outside, 0.75 and 0.5 in
    x = NOISE  # the same ODE written out
    with torch.no_grad():
        for t0, t1 in [(1.0, 0.75), (0.75, 0.5), (0.5, 0.25), (0.25, 0.0)]:
            t = torch.full((2,), t0)
            v = model.forward_with_cfg(x, t, Y, 3.0) if 0.4 <= t0 <= 0.8 else model(x, t, Y)
            x = x + (t1 - t0) * v
    torch.testing.assert_close(out, x)
    assert not torch.allclose(out, sample(model, NOISE, Y, 4, "euler", 3.0), atol=1e-3)


def test_autoguidance_mixes_the_guide_and_the_model_with_the_same_labels():
    model, guide = nano(2), nano(3)
    cond = sample(model, NOISE, Y, steps=3, method="heun")
    assert torch.equal(sample(model, NOISE, Y, 3, "heun", 5.0, guide=model), cond)

    seen = []
    guide.register_forward_hook(lambda m, args, out: seen.append(args[2].clone()))
    one = sample(model, NOISE, Y, steps=1, method="euler", cfg_scale=5.0, guide=guide)
    assert len(seen) == 1 and torch.equal(seen[0], Y)  # conditioned, no null class
    with torch.no_grad():
        t = torch.ones(2)
        v_guide = guide(NOISE, t, Y)
        expected = NOISE - (v_guide + 5.0 * (model(NOISE, t, Y) - v_guide))
    torch.testing.assert_close(one, expected)
    assert not torch.allclose(one, sample(model, NOISE, Y, 1, "euler", 5.0), atol=1e-3)


def test_time_shift_one_is_the_uniform_grid_and_a_shift_warps_it_by_the_sd3_formula():
    assert time_grid(8, 1.0) == torch.linspace(1.0, 0.0, 9).tolist()
    model = nano(4)
    x = NOISE  # the sampler before the levers: Euler on torch.linspace's grid
    with torch.no_grad():
        grid = torch.linspace(1.0, 0.0, 6).tolist()
        for t0, t1 in itertools.pairwise(grid):
            x = x + (t1 - t0) * model.forward_with_cfg(x, torch.full((2,), t0), Y, 2.0)
    assert torch.equal(sample(model, NOISE, Y, 5, "euler", 2.0, time_shift=1.0), x)

    uniform = torch.linspace(1.0, 0.0, 5).tolist()
    shifted = time_grid(4, 3.0)
    assert shifted == pytest.approx([3 * t / (1 + 2 * t) for t in uniform], abs=1e-12)
    assert shifted[0] == 1.0 and shifted[-1] == 0.0
    assert all(s > u for s, u in zip(shifted[1:-1], uniform[1:-1], strict=True))  # nearer noise
    counter = Rows(model)
    sample(model, NOISE, Y, 4, "euler", time_shift=3.0)
    assert counter.times == pytest.approx(shifted[:-1], abs=1e-6)
    assert t_from_sigma(1.0) == 0.5 and t_from_sigma(3.0) == pytest.approx(0.75)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"guidance_interval": (0.5, 0.5)}, r"guidance_interval=\(0.5, 0.5\) must have 0 <= lo"),
        ({"guidance_interval": (-0.1, 0.5)}, "must have 0 <= lo < hi <= 1"),
        ({"time_shift": 0.0}, "time_shift=0.0 must be > 0"),
    ],
)
def test_the_sampler_rejects_bad_levers_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        sample(nano(5), NOISE, Y, steps=2, cfg_scale=2.0, **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"guidance_interval": (0.9, 0.1)}, "guidance_interval=(0.9, 0.1) must have 0 <= lo"),
        ({"guidance_interval": (0.1, 1.5)}, "must have 0 <= lo < hi <= 1"),
        ({"time_shift": -1.0}, "time_shift"),
        ({"guidance": "auto"}, "guidance='auto' needs a guide: set guide_snapshot_fraction > 0"),
        ({"guide_snapshot_fraction": 1.0}, "guide_snapshot_fraction"),
    ],
)
def test_bad_sampler_defaults_fail_the_config_and_the_trainer_cli_in_one_line(
    overrides, message, capsys
):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        DiTConfig.model_validate({**PRESETS["cpu-tiny"].model_dump(), **overrides})
    flags = []
    for field, value in overrides.items():
        flag = "--" + field.replace("_", "-")
        flags += [flag, *map(str, value)] if isinstance(value, tuple) else [flag, str(value)]
    argv = ["--dataset", "unused", "--run-dir", "unused", *flags]
    assert train_cli(DiTConfig, PRESETS, lambda: None, "", "train_dit", argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_trainer_flags_take_an_interval_as_two_words():
    parser = build_parser(DiTConfig, PRESETS, "")
    args = parser.parse_args(
        ["--dataset", "d", "--run-dir", "r", "--guidance-interval", "0.2", "0.8", "--time-shift",
         "2", "--guidance", "auto", "--guide-snapshot-fraction", "0.25"]
    )  # fmt: skip
    config = config_from_args(DiTConfig, PRESETS, args)
    assert (config.guidance_interval, config.time_shift, config.guidance) == ((0.2, 0.8), 2, "auto")


@pytest.fixture(scope="module")
def guided_run(oxford_mini_species_ref, tmp_path_factory):
    """A real cpu-tiny run with a guide snapshot at 25 % of its 30 steps (step 8, the first at
    or past 7.5) and autoguidance as its default, checkpointing every 8 steps."""
    torch.set_num_threads(1)
    config = {
        **PRESETS["cpu-tiny"].model_dump(),
        "guide_snapshot_fraction": 0.25,
        "guidance": "auto",
        "cfg_scale": 2.0,
        "ckpt_every_steps": 8,
        "keep_checkpoints": 10,
    }
    run_dir = tmp_path_factory.mktemp("guided") / "run"
    train_dit(config, oxford_mini_species_ref, run_dir)
    return config, run_dir


def test_training_exports_the_early_ema_snapshot_as_the_guide(guided_run):
    _, run_dir = guided_run
    export = json.loads((run_dir / "config.json").read_text())
    assert export["guide"] == {"file": "guide.safetensors", "step": 8}
    assert export["sampler"]["guidance"] == "auto" and export["sampler"]["time_shift"] == 1.0
    guide = load_guide(run_dir)
    assert guide.guide_step == 8 and not guide.training
    # The guide is the EMA shadow of step 8, bit for bit (the checkpoint of step 8 holds it) ...
    shadow = torch.load(run_dir / "checkpoints" / "step_000000008.pt", weights_only=False)
    shadow = shadow["ema"]["shadow"]
    for key, value in guide.state_dict().items():
        assert torch.equal(value, shadow[key]), key
    # ... and not the final weights.
    final = load_file(str(run_dir / "model.safetensors"))
    assert any(not torch.equal(final[k], v) for k, v in guide.state_dict().items())
    # The export samples with its guide by default: not the CFG samples of the same model.
    auto = sample_export(run_dir, ["cat", "other"], 2, steps=2)
    cfg = sample_export(run_dir, ["cat", "other"], 2, steps=2, guidance="cfg")
    assert auto.shape == (4, 3, 32, 32) and not torch.allclose(auto, cfg, atol=1e-4)
    explicit = sample_export(load_dit(run_dir), ["cat", "other"], 2, steps=2, guide=guide)
    assert torch.equal(auto, explicit)


def test_the_snapshot_survives_a_resume_unchanged(guided_run, oxford_mini_species_ref):
    config, run_dir = guided_run
    snapshot = run_dir / SNAPSHOT
    before = hashlib.sha256(snapshot.read_bytes()).hexdigest(), snapshot.stat().st_mtime_ns
    # 40 steps: the run resumes at 30, past the new 25 % mark (10), with the snapshot on disk.
    result = train_dit({**config, "steps": 40}, oxford_mini_species_ref, run_dir)
    assert result["metrics"]["steps"] == 40
    assert (
        hashlib.sha256(snapshot.read_bytes()).hexdigest(),
        snapshot.stat().st_mtime_ns,
    ) == before
    assert json.loads((run_dir / "config.json").read_text())["guide"]["step"] == 8
    assert (run_dir / "guide.safetensors").read_bytes() == snapshot.read_bytes()


def test_an_export_without_a_guide_or_sampler_keys_still_loads_and_auto_says_the_fix(
    guided_run, tmp_path
):
    _, run_dir = guided_run
    old = tmp_path / "old-export"
    old.mkdir()
    for name in ("model.safetensors", "config.json"):
        shutil.copy(run_dir / name, old / name)
    export = json.loads((old / "config.json").read_text())
    del export["guide"]
    export["sampler"] = {k: export["sampler"][k] for k in ("method", "steps", "cfg_scale")}
    (old / "config.json").write_text(json.dumps(export))
    assert load_guide(old) is None
    plain = sample_export(old, ["cat"], 2, steps=2)
    explicit = sample_export(old, ["cat"], 2, steps=2, guidance="cfg", time_shift=1.0)
    assert torch.equal(plain, explicit)
    with pytest.raises(ValueError, match="retrain with guide_snapshot_fraction > 0") as info:
        sample_export(old, ["cat"], 2, steps=2, guidance="auto")
    assert "\n" not in str(info.value) and old.name in str(info.value)


def test_evaluate_flags_override_the_export_defaults_and_reach_the_report(
    guided_run, oxford_mini_species_ref, tmp_path, capsys
):
    _, run_dir = guided_run
    common = ["--dataset", oxford_mini_species_ref.root, "--dit", str(run_dir)]
    common += ["--samples-per-class", "2", "--steps", "2", "--no-inception-download"]
    out = tmp_path / "report"
    argv = [*common, "--out", str(out), "--guidance", "cfg", "--guidance-interval", "0.2", "0.8"]
    assert evaluate_cli(lambda: evaluate, [*argv, "--time-shift", "2"]) == 0
    s = load_report(out).sampling
    assert (s.guidance, s.guidance_interval, s.time_shift) == ("cfg", (0.2, 0.8), 2.0)
    md = (out / "report.md").read_text()
    assert "CFG scale 2 at t in [0.2, 0.8], time shift 2," in md
    # Without the flags: the export's defaults, autoguidance with the guide of step 8.
    evaluate(
        oxford_mini_species_ref, dit=run_dir, out=tmp_path / "d", samples_per_class=2, steps=2,
        inception_download=False,
    )  # fmt: skip
    report = load_report(tmp_path / "d")
    assert (report.sampling.guidance, report.sampling.guidance_interval) == ("auto", None)
    assert report.settings["autoguidance_guide_step"] == 8
    capsys.readouterr()
    bad = [*common, "--out", str(tmp_path / "bad"), "--guidance-interval", "0.9", "0.1"]
    assert evaluate_cli(lambda: evaluate, bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "guidance_interval=(0.9, 0.1) must have 0 <= lo" in err[0], err


def test_bench_sampler_specs_become_evaluate_flags_and_table_words():
    assert _sampler("heun:16:5:interval=0.2-0.85:shift=2:guide=auto") == [
        "--sampler", "heun", "--steps", "16", "--cfg-scale", "5.0", "--guidance-interval",
        "0.2", "0.85", "--time-shift", "2", "--guidance", "auto",
    ]  # fmt: skip
    assert _sampler("euler:25:2") == ["--sampler", "euler", "--steps", "25", "--cfg-scale", "2.0"]
    for bad in ("heun:16:5:bogus=1", "heun:16:5:interval=0.2", "heun:16:5:shift"):
        with pytest.raises(ValueError, match="heun:16:5"):
            _sampler(bad)
    drawn = {"method": "heun", "steps": 16, "cfg_scale": 5.0, "guidance": "auto",
             "guidance_interval": [0.2, 0.85], "time_shift": 2.0}  # fmt: skip
    assert _sampler_words(drawn) == "heun 16 steps, auto 5 in [0.2, 0.85], shift 2"
    older = {"method": "euler", "steps": 25, "cfg_scale": 2.0}  # a report from before the levers
    assert _sampler_words(older) == "euler 25 steps, CFG 2"
    assert _flags("cpu-small", {"guidance_interval": (0.2, 0.8)})[-3:] == [
        "--guidance-interval", "0.2", "0.8",
    ]  # fmt: skip
