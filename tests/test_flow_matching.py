"""Flow matching: time sampling, the loss and its determinism, ODE samplers against an exact
solution, CFG in the sampler, EMA, and a tiny DiT overfitting a batch of real cat photos."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from models.dit import dit_from_config
from models.flow_matching import EMA, flow_matching_loss, interpolate, sample, sample_time

pytestmark = pytest.mark.usefixtures("single_thread")


class GaussianVelocity(nn.Module):
    """The exact flow-matching velocity when the data is x0 ~ N(mu, sigma^2) per pixel.

    Under x_t = (1-t) x0 + t e, x_t ~ N((1-t) mu, s_t^2) with s_t^2 = (1-t)^2 sigma^2 + t^2, and
    v(x, t) = E[e - x0 | x_t = x] = (t - (1-t) sigma^2) / s_t^2 * (x - (1-t) mu) - mu.
    Its ODE maps noise z at t=1 to mu + sigma z at t=0 along curved paths (when sigma != 1),
    which makes the discretisation error of a sampler measurable.
    """

    def __init__(self, mu: float, sigma: float):
        super().__init__()
        self.mu, self.sigma = mu, sigma

    def forward(self, x, t, y, force_drop_ids=None):
        t = t.reshape(-1, 1, 1, 1).double()
        a = 1 - t
        s2 = a * a * self.sigma**2 + t * t
        return ((t - a * self.sigma**2) / s2 * (x - a * self.mu) - self.mu).to(x.dtype)


class PointMassVelocity(nn.Module):
    """Exact velocity when all data sits at ``c``: v = (x_t - c) / t, constant along straight lines."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, y, force_drop_ids=None):
        return (x - self.c) / t.reshape(-1, 1, 1, 1)


def _sampler_error(model, steps, method, z):
    y = torch.zeros(z.shape[0], dtype=torch.long)
    exact = model.mu + model.sigma * z
    return (sample(model, z, y, steps, method) - exact).abs().max().item()


# --- time sampling ---------------------------------------------------------------------------


def test_logit_normal_times_are_inside_0_1_and_concentrated_mid_range():
    n = 200_000
    gen = torch.Generator().manual_seed(0)
    uniform = sample_time(n, "uniform", gen)
    logit_normal = sample_time(n, "logit_normal", gen)
    assert uniform.shape == logit_normal.shape == (n,)
    assert uniform.dtype == logit_normal.dtype == torch.float32
    assert logit_normal.min() > 0 and logit_normal.max() < 1
    assert uniform.min() >= 0 and uniform.max() < 1

    def mid(t):
        return ((t > 0.25) & (t < 0.75)).float().mean().item()

    # P(|u| < logit(0.75)) for u ~ N(0, 1) is 0.7275; uniform puts exactly half mid-range.
    assert mid(uniform) == pytest.approx(0.5, abs=0.01)
    assert mid(logit_normal) == pytest.approx(0.7275, abs=0.01)
    assert logit_normal.mean().item() == pytest.approx(0.5, abs=0.01)
    # loc shifts the mode towards noise (t -> 1), as SD3 does for high resolutions.
    assert sample_time(n, "logit_normal", gen, loc=1.0).median().item() == pytest.approx(
        torch.sigmoid(torch.tensor(1.0)).item(), abs=0.01
    )


def test_time_sampling_is_reproducible_from_the_generator():
    a = sample_time(16, "logit_normal", torch.Generator().manual_seed(7))
    b = sample_time(16, "logit_normal", torch.Generator().manual_seed(7))
    c = sample_time(16, "logit_normal", torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"schedule": "cosine"}, "unknown time schedule 'cosine'"),
        ({"schedule": "uniform", "batch": 0}, "batch=0"),
        ({"schedule": "logit_normal", "scale": 0.0}, "scale=0.0"),
    ],
)
def test_time_sampling_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_time(**({"batch": 4} | kwargs))


# --- interpolant and loss --------------------------------------------------------------------


def test_interpolant_follows_the_time_convention():
    x0, noise = torch.randn(3, 3, 4, 4), torch.randn(3, 3, 4, 4)
    assert torch.equal(interpolate(x0, noise, torch.zeros(3)), x0)  # t = 0 is data
    assert torch.equal(interpolate(x0, noise, torch.ones(3)), noise)  # t = 1 is noise
    t = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(
        interpolate(x0, noise, t), (1 - t.view(3, 1, 1, 1)) * x0 + t.view(3, 1, 1, 1) * noise
    )


def test_loss_draws_time_then_noise_from_the_generator():
    # With the adaLN-Zero init the model predicts 0, so the loss is exactly E|noise - x0|^2 with
    # the noise replayed from a copy of the generator: the draws come from it and nowhere else.
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=3).eval()
    x0 = torch.rand(4, 3, 16, 16) * 2 - 1
    y = torch.tensor([0, 1, 2, 0])
    loss = flow_matching_loss(model, x0, y, "logit_normal", torch.Generator().manual_seed(3))
    replay = torch.Generator().manual_seed(3)
    sample_time(4, "logit_normal", replay)
    noise = torch.randn(x0.shape, generator=replay)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, (noise - x0).pow(2).mean())


def test_loss_is_reproducible_in_training_mode_including_label_dropout():
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=3, class_dropout_prob=0.5)
    with torch.no_grad():  # leave the zero init, so predictions depend on the labels
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.train()
    x0, y = torch.randn(8, 3, 16, 16), torch.arange(8) % 3

    def loss(seed):
        torch.manual_seed(seed + 100)  # the global RNG must not matter
        return flow_matching_loss(model, x0, y, "uniform", torch.Generator().manual_seed(seed))

    assert torch.equal(loss(1), loss(1))
    assert not torch.equal(loss(1), loss(2))


def test_loss_rejects_mismatched_labels():
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=3)
    with pytest.raises(ValueError, match="y"):
        flow_matching_loss(model, torch.zeros(4, 3, 16, 16), torch.zeros(3, dtype=torch.long))


# --- samplers --------------------------------------------------------------------------------


def test_euler_one_step_is_exact_for_straight_paths():
    model = PointMassVelocity(c=0.7)
    z = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    y = torch.zeros(5, dtype=torch.long)
    for steps in (1, 7):
        torch.testing.assert_close(sample(model, z, y, steps), torch.full_like(z, 0.7))


def test_euler_with_many_steps_lands_on_the_exact_solution():
    model = GaussianVelocity(mu=2.0, sigma=0.25)
    z = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert _sampler_error(model, 200, "euler", z) < 0.02
    # First order: 4x the steps gives about 1/4 of the error.
    ratio = _sampler_error(model, 50, "euler", z) / _sampler_error(model, 200, "euler", z)
    assert 3.0 < ratio < 5.0


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    model = GaussianVelocity(mu=2.0, sigma=0.25)
    z = torch.randn(256, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for steps in (5, 10, 50):
        assert (
            _sampler_error(model, steps, "heun", z) < _sampler_error(model, steps, "euler", z) / 5
        )
    # Second order: 5x the steps gives about 1/25 of the error.
    ratio = _sampler_error(model, 10, "heun", z) / _sampler_error(model, 50, "heun", z)
    assert ratio > 12
    assert _sampler_error(model, 50, "heun", z) < 2e-3


class LabelSpy(nn.Module):
    """A DiT that records the labels it is called with."""

    def __init__(self):
        super().__init__()
        self.dit = dit_from_config("DiT-Nano/4", input_size=16, num_classes=3)
        with torch.no_grad():
            for p in self.dit.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        self.null_class = self.dit.null_class
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, y, force_drop_ids=None):
        assert not self.training
        self.seen.append(y.clone())
        return self.dit(x, t, y)

    def forward_with_cfg(self, x, t, y, cfg_scale):
        self.seen.append(torch.cat([y, torch.full_like(y, self.null_class)]))
        return self.dit.forward_with_cfg(x, t, y, cfg_scale)


def test_sampler_cfg_scale_one_is_the_conditional_ode_and_guidance_uses_the_null_class():
    spy = LabelSpy().train()
    noise = torch.randn(2, 3, 16, 16)
    y = torch.tensor([0, 2])
    plain = sample(spy, noise, y, steps=3, method="heun", cfg_scale=1.0)
    assert spy.training  # mode restored
    assert len(spy.seen) == 6 and all(torch.equal(s, y) for s in spy.seen)

    x = noise  # the same ODE written out: Heun on the conditional velocity
    with torch.no_grad():
        spy.dit.eval()
        for t0, t1 in [(1.0, 2 / 3), (2 / 3, 1 / 3), (1 / 3, 0.0)]:
            v0 = spy.dit(x, torch.full((2,), t0), y)
            v1 = spy.dit(x + (t1 - t0) * v0, torch.full((2,), t1), y)
            x = x + (t1 - t0) * 0.5 * (v0 + v1)
    torch.testing.assert_close(plain, x)

    spy.seen.clear()
    guided = sample(spy, noise, y, steps=3, method="euler", cfg_scale=3.0)
    assert len(spy.seen) == 3 and all((s[2:] == spy.null_class).all() for s in spy.seen)
    assert not torch.allclose(guided, sample(spy, noise, y, steps=3, method="euler"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"steps": 0}, "steps=0 must be >= 1"), ({"method": "rk4"}, "unknown sampler 'rk4'")],
)
def test_sampler_rejects_bad_arguments(kwargs, message):
    args = {"steps": 4, "method": "euler"} | kwargs
    with pytest.raises(ValueError, match=message):
        sample(PointMassVelocity(0.0), torch.randn(2, 3, 4, 4), torch.zeros(2).long(), **args)


# --- EMA -------------------------------------------------------------------------------------


def test_ema_warmup_decay_and_average():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.5)
    expected_decays = [min(0.5, (1 + n) / (10 + n)) for n in range(12)]
    assert expected_decays[:3] == [0.1, 2 / 11, 3 / 12] and expected_decays[-1] == 0.5
    shadow = 0.0
    with torch.no_grad():
        model.weight.fill_(1.0)
    for d in expected_decays:
        assert ema.current_decay() == pytest.approx(d)
        ema.update(model)
        shadow = d * shadow + (1 - d) * 1.0
        assert ema.shadow.weight.item() == pytest.approx(shadow, rel=1e-6)
    assert ema.num_updates == 12
    assert model.weight.item() == 1.0  # the trained model is untouched


def test_ema_without_warmup_uses_the_constant_decay():
    model = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)
    assert ema.shadow.weight.item() == pytest.approx(0.1)


def test_ema_state_dict_round_trip_and_copy_to():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema = EMA(model, decay=0.99)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        model.train()(torch.randn(8, 4))  # moves BatchNorm statistics and its int counter
        ema.update(model)
    restored = EMA(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), decay=0.5, warmup=False)
    restored.load_state_dict(ema.state_dict())
    assert (restored.decay, restored.warmup, restored.num_updates) == (0.99, True, 3)
    for key, value in ema.shadow.state_dict().items():
        assert torch.equal(restored.shadow.state_dict()[key], value), key
    assert restored.shadow[1].num_batches_tracked.item() == 3
    assert not any(p.requires_grad for p in restored.shadow.parameters())

    target = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    ema.copy_to(target)
    assert torch.equal(target[0].weight, ema.shadow[0].weight)


def test_ema_of_a_compiled_model_has_plain_keys():
    # torch.compile is lazy: wrapping costs nothing until the first call, and none is made here.
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2)
    compiled = torch.compile(model)
    ema = EMA(compiled, decay=0.9)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(1.0)
    ema.update(compiled)
    keys = list(ema.state_dict()["shadow"])
    assert keys == list(model.state_dict()) and not any("_orig_mod" in k for k in keys)
    assert ema.shadow.final_layer.linear.bias[0].item() == pytest.approx(0.9)
    target = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2)
    ema.copy_to(torch.compile(target))
    assert torch.equal(target.final_layer.linear.bias, ema.shadow.final_layer.linear.bias)


def test_ema_rejects_bad_decay():
    with pytest.raises(ValueError, match=r"decay=1\.0"):
        EMA(nn.Linear(1, 1), decay=1.0)


# --- a real tiny training run ----------------------------------------------------------------


def _cat_batch(shared_datasets, n: int, size: int) -> torch.Tensor:
    """n real cat photos from the shared PetImages archive, (n, 3, size, size) in [-1, 1]."""
    images = []
    with zipfile.ZipFile(shared_datasets / "petimages" / "kagglecatsanddogs-180px.zip") as archive:
        for i in range(n):
            with Image.open(io.BytesIO(archive.read(f"PetImages/Cat/{i}.jpg"))) as im:
                images.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)))
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def test_tiny_dit_overfits_one_batch_of_real_cats(shared_datasets):
    torch.manual_seed(0)
    x0 = _cat_batch(shared_datasets, 8, 16)
    y = torch.tensor([0, 1] * 4)
    model = dit_from_config("DiT-Nano/4", input_size=16, num_classes=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(200):
        loss = flow_matching_loss(model, x0, y, "uniform", gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = np.mean(losses[:10]), np.mean(losses[-20:])
    # At zero init the loss is E|noise - x0|^2 = 1 + E[x0^2]. A predictor blind to x_t can reach
    # no less than 1 + Var(x0 | y) >= 1, so ending well below 1 means the model uses x_t.
    assert first > 1.0
    assert last < 0.5, (first, last)
