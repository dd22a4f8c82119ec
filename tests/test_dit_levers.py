"""Issue 21 §3's DiT levers: RMSNorm, SwiGLU, 2-D RoPE, x-prediction, Muon, logit-normal location."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from models.blocks import Mlp, Rope2D, SwiGLU
from models.dit import X_PREDICTION_T_MIN, DiT
from models.flow_matching import sample_time
from tasks.exported import load_dit
from tasks.train_dit import PRESETS, DiTConfig, train_dit
from tasks.training.runtime import MuonAdamW, build_optimizer

TINY = PRESETS["cpu-tiny"].model_dump()
NANO = dict(input_size=16, patch_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=2)


def _nano(**overrides) -> DiT:
    torch.manual_seed(0)
    return DiT(**{**NANO, **overrides}).eval()  # eval: no random label dropout


def _wake(model: DiT) -> DiT:
    """Non-zero adaLN-Zero and output layers, so that every block and option affects the output."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.abs().sum() == 0 and param.ndim >= 1:
                param.normal_(0, 0.02)
    return model


@pytest.mark.parametrize(
    "option", [dict(norm="rms"), dict(mlp="swiglu"), dict(rope=True), dict(prediction="x")]
)
def test_each_option_changes_the_network_and_round_trips_through_its_config(option):
    plain, changed = _wake(_nano()), _wake(_nano(**option))
    assert changed.config == {**plain.config, **option}
    rebuilt = DiT(**changed.config)
    rebuilt.load_state_dict(changed.state_dict())  # same parameter names and shapes
    x, t, y = torch.randn(3, 3, 16, 16), torch.tensor([0.2, 0.5, 0.9]), torch.tensor([0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x, t, y), changed(x, t, y), rtol=0, atol=0)
        if "mlp" not in option:  # the same weights, used another way (SwiGLU has its own)
            plain.load_state_dict(changed.state_dict())
        assert (plain(x, t, y) - changed(x, t, y)).abs().max() > 1e-4


def test_defaults_keep_the_papers_config_so_old_exports_load():
    assert set(_nano().config) == {
        "input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
        "mlp_ratio", "num_classes", "class_dropout_prob", "qk_norm", "stem_channels",
        "long_skip", "final_conv",
    }  # fmt: skip


def test_swiglu_matches_the_gelu_mlps_size():
    gelu, gated = Mlp(192, 768), SwiGLU(192, 768)
    n_gelu = sum(p.numel() for p in gelu.parameters())
    n_gated = sum(p.numel() for p in gated.parameters())
    assert abs(n_gated - n_gelu) / n_gelu < 0.02
    assert gated(torch.randn(2, 5, 192)).shape == (2, 5, 192)


def test_rope_scores_depend_on_the_offset_between_patches_only():
    rope = Rope2D(head_dim=16, grid=4)
    torch.manual_seed(0)
    q, k = torch.randn(16), torch.randn(16)
    # The same query and key vector at every one of the 16 tokens (row-major 4 x 4 grid).
    rq = rope(q.expand(1, 1, 16, 16))[0, 0]
    rk = rope(k.expand(1, 1, 16, 16))[0, 0]
    scores = rq @ rk.T  # (16, 16): token i's query against token j's key

    def score(a: tuple[int, int], b: tuple[int, int]) -> float:
        return scores[a[0] * 4 + a[1], b[0] * 4 + b[1]].item()

    # Offset (1, 2) from two different places; and a different offset, which must differ.
    assert score((0, 0), (1, 2)) == pytest.approx(score((2, 1), (3, 3)), abs=1e-5)
    assert score((1, 0), (1, 1)) == pytest.approx(score((3, 2), (3, 3)), abs=1e-5)
    assert abs(score((0, 0), (1, 2)) - score((0, 0), (2, 1))) > 1e-3
    # Norms are kept: a rotation.
    torch.testing.assert_close(rq.norm(dim=-1), q.norm().expand(16), rtol=1e-5, atol=1e-5)


def test_rope_refuses_a_head_width_not_divisible_by_4():
    with pytest.raises(ValueError, match="divisible by 4"):
        _nano(hidden_size=24, num_heads=4, rope=True)
    with pytest.raises(ValidationError, match="rope needs a head width"):
        DiTConfig(**{**TINY, "hidden_size": 24, "num_heads": 4, "rope": True})


def test_x_prediction_returns_the_velocity_of_its_x0_estimate():
    """Same weights: the x-model's output is (x_t - raw) / max(t, t_min), raw = the network's
    last layer, which the velocity model returns as is."""
    v_model = _wake(_nano())
    x_model = _nano(prediction="x")
    x_model.load_state_dict(v_model.state_dict())
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    t = torch.tensor([0.0, 0.01, 0.5, 1.0])
    with torch.no_grad():
        raw, v = v_model(x, t, y), x_model(x, t, y)
    expected = (x - raw) / t.clamp(min=X_PREDICTION_T_MIN).view(-1, 1, 1, 1)
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(v).all()  # t = 0 is clamped, not divided by


def test_x_prediction_recovers_x0_from_an_exact_estimate():
    """On the straight path x_t = (1 - t) x0 + t noise, an x0 estimate equal to x0 gives exactly
    the flow-matching target noise - x0 (for t above the clamp)."""
    x0, noise, t = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.tensor([0.3, 0.8])
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise
    v = (x_t - x0) / t.view(-1, 1, 1, 1)
    torch.testing.assert_close(v, noise - x0, rtol=1e-5, atol=1e-5)


def test_muon_takes_the_block_matrices_and_adamw_the_rest():
    model = _nano(long_skip=True, depth=4, stem_channels=8)
    opt = build_optimizer(model, "muon", 1e-3, 0.0)
    assert isinstance(opt, MuonAdamW)
    muon = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    adamw = {id(p) for g in opt.adamw.param_groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    assert muon.isdisjoint(adamw) and muon | adamw == set(names)
    assert {names[i].split(".")[0] for i in muon} == {"blocks", "skip_projections"}
    assert all(p.ndim == 2 for g in opt.muon.param_groups for p in g["params"])
    # The embedders, final layer and stem convolutions stay with AdamW.
    for prefix in ("x_embedder", "t_embedder", "y_embedder", "final_layer", "stem"):
        assert any(names[i].startswith(prefix) for i in adamw), prefix
    # One schedule drives both.
    for group in opt.param_groups:
        group["lr"] = 0.123
    assert opt.muon.param_groups[0]["lr"] == opt.adamw.param_groups[0]["lr"] == 0.123


def test_muon_refuses_a_model_without_hidden_matrices():
    with pytest.raises(ValueError, match="use optimizer=adamw"):
        build_optimizer(torch.nn.Conv2d(3, 3, 3), "muon", 1e-3, 0.0)


def test_logit_normal_location_moves_the_median_time():
    g = torch.Generator().manual_seed(0)
    for loc in (-0.5, 0.0, 0.7):
        t = sample_time(20_000, "logit_normal", g, loc=loc)
        expected = torch.sigmoid(torch.tensor(loc)).item()
        assert t.median().item() == pytest.approx(expected, abs=0.01)
    with pytest.raises(ValidationError, match="time_scale"):
        DiTConfig(**{**TINY, "time_scale": 0})


def test_a_lever_recipe_trains_resumes_exactly_and_exports(oxford_mini_species_ref, tmp_path):
    """Every lever at once in a real tiny run: 10 steps straight equal 5 steps, then 5 resumed
    (the Muon state is checkpointed), and the export loads into the same network."""
    levers = dict(
        optimizer="muon", norm="rms", mlp="swiglu", rope=True, prediction="x", time_loc=-0.5
    )
    base = {**PRESETS["cpu-tiny"].model_dump(), **levers, "ckpt_every_steps": 5}
    straight = train_dit({**base, "steps": 10}, oxford_mini_species_ref, tmp_path / "a")
    train_dit({**base, "steps": 5}, oxford_mini_species_ref, tmp_path / "b")
    resumed = train_dit({**base, "steps": 10}, oxford_mini_species_ref, tmp_path / "b")
    assert resumed["metrics"]["resumed_from_step"] == 5
    wa = load_file(straight["files"]["weights"])
    wb = load_file(resumed["files"]["weights"])
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6, msg=key)
    model = load_dit(tmp_path / "a")
    assert {k: model.config[k] for k in ("norm", "mlp", "rope", "prediction")} == {
        k: levers[k] for k in ("norm", "mlp", "rope", "prediction")
    }
