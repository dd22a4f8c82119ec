"""DiT: shapes, adaLN-Zero initialisation, CFG, patchify, the null class, configs and errors."""

from __future__ import annotations

import pytest
import torch

from models.dit import DIT_CONFIGS, DiT, dit_from_config, get_2d_sincos_pos_embed

pytestmark = pytest.mark.usefixtures("single_thread")


def _randomized(model: DiT, seed: int = 0) -> DiT:
    """Give every weight a random value, so outputs are not trivially zero as after init."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _inputs(model: DiT, batch: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=gen)
    t = torch.rand(batch, generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return x, t, y


@pytest.mark.parametrize(
    ("name", "input_size", "overrides"),
    [
        ("DiT-Nano/2", 16, {}),
        ("DiT-Nano/4", 32, {"in_channels": 1}),
        ("DiT-Ti/8", 32, {"qk_norm": True}),
        ("DiT-Ti/4", 24, {"mlp_ratio": 2.0}),
        ("DiT-Nano/4", 16, {"stem_channels": 8, "long_skip": True, "final_conv": True}),
        ("DiT-Nano/4", 16, {"long_skip": True, "depth": 3}),
    ],
)
def test_output_has_input_shape(name, input_size, overrides):
    model = _randomized(dit_from_config(name, input_size=input_size, num_classes=4, **overrides))
    x, t, y = _inputs(model)
    out = model(x, t, y)
    assert out.shape == x.shape
    assert out.dtype == torch.float32
    assert model.grid_size**2 == (input_size // model.patch_size) ** 2
    assert torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize(("name", "params_m"), [("DiT-S/2", 33), ("DiT-B/4", 130)])
def test_paper_table1_sizes(name, params_m):
    # Paper set-up (Peebles & Xie 2023 Table 1): 32x32x4 latents, 1000 classes. Built on the meta
    # device, so no memory is spent. Ours lacks the learned-sigma channels, a negligible difference.
    with torch.device("meta"):
        model = dit_from_config(name, input_size=32, in_channels=4, num_classes=1000)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - params_m) / params_m < 0.02, n


def test_every_named_config_builds_and_tiny_one_is_under_1m_params():
    with torch.device("meta"):
        sizes = {
            name: sum(p.numel() for p in factory(input_size=64, num_classes=13).parameters())
            for name, factory in DIT_CONFIGS.items()
        }
    for p in (2, 4, 8):
        assert {f"DiT-S/{p}", f"DiT-B/{p}"} <= set(sizes)
    assert sizes["DiT-S/4"] < sizes["DiT-B/4"]
    assert 1e6 < sizes["DiT-Ti/4"] < 6e6
    assert sizes["DiT-Nano/4"] < 1e6


def test_adaln_zero_init_outputs_exact_zeros_and_blocks_are_identity():
    model = dit_from_config("DiT-Nano/2", input_size=16, num_classes=3)
    x, t, y = _inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    tokens = torch.randn(3, model.grid_size**2, 64)
    c = torch.randn(3, 64)
    for block in model.blocks:
        assert torch.equal(block(tokens, c), tokens)


def test_small_compute_additions_keep_the_zero_initial_output():
    model = dit_from_config(
        "DiT-Nano/4",
        input_size=16,
        num_classes=3,
        stem_channels=8,
        long_skip=True,
        final_conv=True,
    )
    x, t, y = _inputs(model)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))


@pytest.mark.parametrize(("depth", "pairs"), [(4, [(1, 2), (0, 3)]), (5, [(1, 3), (0, 4)])])
def test_long_skips_pair_shallow_and_deep_blocks_u_vit_style(depth, pairs):
    # U-ViT §3.1: block i's output is concatenated into the input of block depth-1-i. Record
    # each block's output and input to check the wiring, not just the shapes.
    model = _randomized(
        dit_from_config("DiT-Nano/4", input_size=16, num_classes=2, depth=depth, long_skip=True)
    )
    assert len(model.skip_projections) == depth // 2
    outputs, inputs = {}, {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: outputs.__setitem__(i, out))
        block.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
    model(*_inputs(model))
    first_deep = depth - depth // 2
    for shallow, deep in pairs:
        previous = outputs[deep - 1]
        projection = model.skip_projections[deep - first_deep]
        expected = projection(torch.cat([previous, outputs[shallow]], dim=-1))
        torch.testing.assert_close(inputs[deep], expected)
    if depth % 2:  # the middle block of an odd depth takes its predecessor's output unchanged
        assert torch.equal(inputs[depth // 2], outputs[depth // 2 - 1])


def test_adaln_zero_init_still_learns():
    # Zero gates must not block learning: after a few steps the output moves off zero.
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, y = _inputs(model)
    for _ in range(3):
        opt.zero_grad()
        (model(x, t, y) - 1.0).pow(2).mean().backward()
        opt.step()
    assert model(x, t, y).abs().mean() > 1e-3
    assert model.blocks[0].adaLN_modulation[-1].weight.abs().sum() > 0


def test_cfg_scale_one_equals_conditional_prediction():
    model = _randomized(dit_from_config("DiT-Nano/4", input_size=16, num_classes=5))
    x, t, y = _inputs(model, batch=4)
    cond = model(x, t, y)
    assert torch.equal(model.forward_with_cfg(x, t, y, cfg_scale=1.0), cond)
    # The guided path (conditional and null-class rows in one batch) agrees at scale -> 1, so
    # the scale-1 shortcut is the same function, not a different one.
    near_one = model.forward_with_cfg(x, t, y, cfg_scale=1.0 + 1e-6)
    torch.testing.assert_close(near_one, cond, rtol=1e-4, atol=1e-5)


def test_cfg_combines_conditional_and_null_class_predictions():
    model = _randomized(dit_from_config("DiT-Nano/4", input_size=16, num_classes=5))
    x, t, y = _inputs(model, batch=4)
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, model.null_class))
    guided = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
    torch.testing.assert_close(guided, uncond + 4.0 * (cond - uncond), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(guided, cond)


def test_cfg_without_null_class_is_an_error():
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2, class_dropout_prob=0.0)
    x, t, y = _inputs(model)
    with pytest.raises(ValueError, match="class_dropout_prob"):
        model.forward_with_cfg(x, t, y, cfg_scale=2.0)


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """The reference layout, written independently: (B, C, S, S) -> (B, T, p*p*C), patches in
    row-major order, pixels as (p, p, C)."""
    B, C, H, W = imgs.shape
    x = torch.einsum("nchpwq->nhwpqc", imgs.reshape(B, C, H // p, p, W // p, p))
    return x.reshape(B, (H // p) * (W // p), p * p * C)


@pytest.mark.parametrize(("patch", "channels", "size"), [(2, 3, 8), (4, 1, 16), (8, 3, 32)])
def test_patchify_unpatchify_round_trip(patch, channels, size):
    model = DiT(size, patch, channels, hidden_size=32, depth=1, num_heads=2, num_classes=2)
    imgs = torch.randn(2, channels, size, size)
    tokens = patchify(imgs, patch)
    assert tokens.shape == (2, (size // patch) ** 2, patch * patch * channels)
    assert torch.equal(model.unpatchify(tokens), imgs)
    # Row-major token order: token 1 is the patch right of the top-left one, pixels as (p, p, C).
    expected = imgs[:, :, 0:patch, patch : 2 * patch].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(tokens[:, 1], expected)
    tokens2 = torch.randn_like(tokens)
    assert torch.equal(patchify(model.unpatchify(tokens2), patch), tokens2)


@pytest.mark.parametrize("num_classes", [1, 2, 13])
def test_null_class_is_num_classes(num_classes):
    model = _randomized(dit_from_config("DiT-Nano/4", input_size=8, num_classes=num_classes))
    assert model.null_class == num_classes
    assert model.y_embedder.embedding_table.num_embeddings == num_classes + 1
    x, t, _ = _inputs(model, batch=2)
    null = torch.full((2,), num_classes)
    assert model(x, t, null).shape == x.shape
    with pytest.raises(IndexError):
        model(x, t, null + 1)


def test_forced_label_drop_equals_null_class():
    model = _randomized(dit_from_config("DiT-Nano/4", input_size=16, num_classes=3))
    x, t, y = _inputs(model, batch=4)
    drop = torch.tensor([True, False, True, False])
    expected = model(x, t, torch.where(drop, model.null_class, y))
    model.train()
    torch.testing.assert_close(model(x, t, y, force_drop_ids=drop), expected)


def test_training_mode_drops_labels_at_the_configured_rate():
    model = dit_from_config("DiT-Nano/4", input_size=8, num_classes=3, class_dropout_prob=0.3)
    torch.manual_seed(0)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = model.y_embedder.token_drop(labels) == model.null_class
    assert abs(dropped.float().mean().item() - 0.3) < 0.02


def test_position_embedding_is_fixed_and_distinct_per_token():
    model = dit_from_config("DiT-Nano/2", input_size=16, num_classes=2)
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()
    pe = get_2d_sincos_pos_embed(64, 8)
    assert pe.shape == (64, 64)
    assert torch.equal(model.pos_embed[0], pe)
    assert torch.cdist(pe, pe).add(torch.eye(64) * 10).min() > 0.1


@pytest.mark.parametrize("extra", [{}, {"stem_channels": 8, "long_skip": True, "final_conv": True}])
def test_config_rebuilds_the_same_architecture(extra):
    model = _randomized(
        dit_from_config("DiT-Nano/4", input_size=16, num_classes=3, qk_norm=True, **extra)
    )
    clone = DiT(**model.config).eval()
    clone.load_state_dict(model.state_dict())
    x, t, y = _inputs(model)
    assert torch.equal(clone(x, t, y), model(x, t, y))


def test_overrides_replace_config_fields():
    model = dit_from_config("DiT-Ti/4", input_size=16, num_classes=2, depth=1, hidden_size=96)
    assert len(model.blocks) == 1 and model.config["hidden_size"] == 96


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_size": 30, "patch_size": 4}, "patch_size=4 must divide input_size=30"),
        ({"hidden_size": 100, "num_heads": 3}, "hidden_size=100 must be divisible by num_heads=3"),
        ({"num_classes": 0}, "num_classes=0"),
        ({"class_dropout_prob": 1.0}, "class_dropout_prob"),
        ({"stem_channels": -1}, "stem_channels=-1 must be >= 0"),
    ],
)
def test_bad_sizes_raise_clear_errors(kwargs, message):
    args = (
        dict(input_size=32, patch_size=4, hidden_size=64, depth=1, num_heads=4, num_classes=2)
        | kwargs
    )
    with pytest.raises(ValueError, match=message):
        DiT(**args)


def test_unknown_config_lists_valid_names():
    with pytest.raises(ValueError, match=r"DiT-S/2.*DiT-Nano/4"):
        dit_from_config("DiT-XXL/2", input_size=32, num_classes=2)


def test_wrong_input_shape_is_an_error():
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2)
    with pytest.raises(ValueError, match=r"\(B, 3, 16, 16\)"):
        model(torch.zeros(1, 3, 32, 32), torch.zeros(1), torch.zeros(1, dtype=torch.long))
