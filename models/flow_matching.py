"""Flow matching with the linear (rectified-flow) interpolant: time sampling, loss, ODE samplers, EMA.

THE time convention of train-cats (docs/ARCHITECTURE.md), used by the loss and the samplers alike:

    x_t = (1 - t) * x0 + t * noise,    t in [0, 1],  noise ~ N(0, I)

so **t = 0 is data and t = 1 is noise**. The network regresses the constant velocity of each
straight path, ``v = dx_t/dt = noise - x0``, and samplers integrate dx/dt = v(x, t) from t = 1
(pure noise) down to t = 0 (data).

Sources:
- Liu, Gong & Liu 2022, "Flow Straight and Fast: Learning to Generate and Transfer Data with
  Rectified Flow" (arXiv:2209.03003), §2: the linear interpolant and its velocity target.
- Lipman et al. 2022, "Flow Matching for Generative Modeling" (arXiv:2210.02747), §3-4: the
  (conditional) flow-matching regression loss.
- Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis"
  (SD3, arXiv:2403.03206), §3.1: logit-normal time sampling, which puts more training weight on
  the hard middle of the path.
- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance" (arXiv:2207.12598): CFG.
- Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"
  (arXiv:2206.00364), §3 / Alg. 1: Heun's second-order sampler.
- Kynkäänniemi et al. 2024, "Applying Guidance in a Limited Interval Improves Sample and
  Distribution Quality in Diffusion Models" (arXiv:2404.07724), §3: guidance in a limited interval.
- Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself"
  (arXiv:2406.02507), §3: autoguidance.
- Esser et al. 2024 (SD3, above), §5.3.2: the time shift of the sampler's grid.
- EMA warm-up after the TensorFlow ``ExponentialMovingAverage(num_updates=...)`` rule.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TIME_SCHEDULES = ("uniform", "logit_normal")
SAMPLERS = ("euler", "heun")


def sample_time(
    batch: int,
    schedule: str,
    generator: torch.Generator | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw training times t.

    Args:
        batch: number of times B >= 1.
        schedule: ``"uniform"`` (t ~ U[0, 1)) or ``"logit_normal"`` (t = sigmoid(u),
            u ~ N(loc, scale^2); Esser et al. 2024 §3.1, where loc=0, scale=1 works best).
        generator: optional torch.Generator; the draw happens on its device, so the same
            generator state always gives the same times.
        loc, scale: logit-normal location and scale (scale > 0); ignored for ``"uniform"``.
        device: where to return the result (default: the generator's device, else CPU).

    Returns:
        (B,) float32 in [0, 1) (uniform) or (0, 1) (logit-normal).

    Raises:
        ValueError: unknown schedule, batch < 1 or scale <= 0.
    """
    if schedule not in TIME_SCHEDULES:
        raise ValueError(f"unknown time schedule {schedule!r}; valid: {', '.join(TIME_SCHEDULES)}")
    if batch < 1:
        raise ValueError(f"batch={batch} must be >= 1")
    if scale <= 0:
        raise ValueError(f"logit-normal scale={scale} must be > 0")
    draw_device = generator.device if generator is not None else device
    if schedule == "uniform":
        t = torch.rand(batch, generator=generator, device=draw_device)
    else:
        u = torch.randn(batch, generator=generator, device=draw_device) * scale + loc
        t = torch.sigmoid(u)
    return t.to(device) if device is not None else t


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The point on the straight path: ``x_t = (1 - t) * x0 + t * noise``.

    x0, noise: (B, ...) float, same shape; t: (B,) float in [0, 1]. Returns (B, ...).
    """
    t = t.reshape(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + t * noise


def _unwrapped(model: nn.Module) -> nn.Module:
    """The network inside torch.compile's and DistributedDataParallel's wrappers."""
    while isinstance(
        inner := getattr(model, "_orig_mod", getattr(model, "module", None)), nn.Module
    ):
        model = inner
    return model


def flow_matching_loss(
    model: nn.Module,
    x0: torch.Tensor,
    y: torch.Tensor,
    schedule: str = "logit_normal",
    generator: torch.Generator | None = None,
    loc: float = 0.0,
    scale: float = 1.0,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Conditional flow-matching loss ``E |model(x_t, t, y) - (noise - x0)|^2`` (Lipman et al. §4).

    Every random draw of the step (times, noise and, for a model in training mode with
    ``class_dropout_prob > 0``, the CFG label dropout) comes from ``generator`` when given, so
    restoring the generator's state reproduces the step exactly (resumable training). With data
    parallelism, ``x0`` is shard ``rank`` of a global batch of ``world_size * B`` rows: the draws
    are made for the global batch and sharded, so every world size draws the same numbers.

    Args:
        model: a velocity model ``model(x, t, y, force_drop_ids=None) -> (B, C, H, W)``
            such as ``DiT``.
        x0: (B, C, H, W) float data, scaled to about [-1, 1].
        y: (B,) int64 class labels.
        schedule: time schedule, see ``sample_time``.
        generator: optional torch.Generator on any device; draws happen on its device and move
            to ``x0.device`` (a generator on the data's device avoids that copy).
        loc, scale: logit-normal parameters.
        rank, world_size: this shard's place in the global batch (0, 1: no sharding).

    Returns:
        Scalar float32 mean squared error over this shard's pixels.

    Raises:
        ValueError: unknown schedule, or ``x0``/``y`` shapes that do not match.
    """
    if x0.dim() != 4 or y.shape != (x0.shape[0],):
        raise ValueError(
            f"expected x0 (B, C, H, W) and y (B,), got x0 {tuple(x0.shape)} and y {tuple(y.shape)}"
        )
    batch = x0.shape[0]
    rows = slice(rank * batch, (rank + 1) * batch)
    draw_device = generator.device if generator is not None else x0.device
    t = sample_time(batch * world_size, schedule, generator, loc, scale, device=x0.device)[rows]
    shape = (batch * world_size, *x0.shape[1:])
    noise = torch.randn(shape, generator=generator, device=draw_device)[rows].to(x0)
    drop_prob = getattr(_unwrapped(model), "class_dropout_prob", 0.0)
    force_drop_ids = None
    if model.training and drop_prob > 0:
        drops = torch.rand(batch * world_size, generator=generator, device=draw_device)[rows]
        force_drop_ids = (drops < drop_prob).to(x0.device)
    x_t = interpolate(x0, noise, t)
    pred = model(x_t, t, y, force_drop_ids=force_drop_ids)
    return F.mse_loss(pred.float(), (noise - x0).float())


def t_from_sigma(sigma: float) -> float:
    """The EDM noise level ``sigma`` (Karras et al. 2022) as this module's time t.

    Dividing ``x_t = (1 - t) x0 + t noise`` by ``1 - t`` gives ``x0 + sigma noise`` with
    ``sigma = t / (1 - t)``, so ``t = sigma / (1 + sigma)``: sigma = 0 is t = 0 (data) and
    sigma -> inf is t -> 1 (noise). Use it to carry a guidance interval from the papers, which
    give it in sigma (Kynkäänniemi et al. 2024 §3: sigma in (0.28, 2.9] for EDM2-S, that is
    t in (0.22, 0.74]). Raises ValueError for sigma < 0.
    """
    if sigma < 0:
        raise ValueError(f"sigma={sigma} must be >= 0")
    return sigma / (1.0 + sigma)


def time_grid(steps: int, shift: float = 1.0) -> list[float]:
    """The sampler's ``steps + 1`` times, from 1 (noise) down to 0 (data).

    The uniform grid ``1, 1 - 1/steps, ..., 0`` warped by the SD3 time shift (Esser et al. 2024
    §5.3.2) ``t' = s t / (1 + (s - 1) t)``. The end points stay; s = 1 is the uniform grid
    exactly; s > 1 moves every inner time towards 1, so more (and smaller) steps are spent near
    noise, where the global layout is decided, and fewer near data.

    Raises:
        ValueError: steps < 1 or shift <= 0.
    """
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    if not shift > 0:
        raise ValueError(f"time_shift={shift} must be > 0 (1 = the uniform grid)")
    grid = torch.linspace(1.0, 0.0, steps + 1).tolist()
    if shift == 1.0:  # skip the arithmetic, so that today's grid stays bit-identical
        return grid
    return [shift * t / (1.0 + (shift - 1.0) * t) for t in grid]


def _checked_interval(interval: tuple[float, float] | None) -> tuple[float, float] | None:
    if interval is None:
        return None
    lo, hi = (float(v) for v in interval)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(
            f"guidance_interval=({lo:g}, {hi:g}) must have 0 <= lo < hi <= 1 (t = 1 is noise)"
        )
    return lo, hi


@torch.no_grad()
def sample(
    model: nn.Module,
    noise: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    method: str = "euler",
    cfg_scale: float = 1.0,
    guidance_interval: tuple[float, float] | None = None,
    guide: nn.Module | None = None,
    time_shift: float = 1.0,
) -> torch.Tensor:
    """Integrate the learned ODE dx/dt = v(x, t) from t = 1 (noise) to t = 0 (data).

    Steps follow ``time_grid(steps, time_shift)``. Euler: one velocity per step, first-order
    accurate. Heun (Karras et al. 2022 Alg. 1, the deterministic sampler): an Euler predictor,
    then the trapezoid corrector, two velocities per step, second-order accurate; unlike Alg. 1
    the corrector also runs on the last step, because a velocity is well defined at t = 0.
    The models are put in ``eval()`` mode for the call (so no label dropout) and restored after.

    Guidance, at ``cfg_scale = w != 1``: classifier-free, ``v_null + w (v - v_null)`` with the
    null class, or with ``guide`` autoguidance (Karras et al. 2024 §3, ``D_w = D_1 + w (D_0 -
    D_1)``), ``v_guide + w (v - v_guide)`` with the guide conditioned on the same ``y``. The
    velocity ``(x - D(x)) / t`` is affine in the denoiser D, so mixing velocities is the papers'
    mixing of denoisers. With ``guidance_interval = (lo, hi)`` (Kynkäänniemi et al. 2024 §3)
    only velocities evaluated at a t in [lo, hi] are guided; the others are the conditional
    velocity alone, one model pass instead of two. The paper defines the guided denoiser
    piecewise in sigma, so Heun's corrector decides by its own t. Convert the paper's sigma
    with ``t_from_sigma`` (t = sigma / (1 + sigma)).

    Args:
        model: velocity model ``model(x, t, y)``; for CFG (``cfg_scale != 1``, no ``guide``) it
            must also have ``forward_with_cfg(x, t, y, cfg_scale)`` (``DiT`` does, using its
            ``null_class``).
        noise: (B, C, H, W) float, x at t = 1, usually ``torch.randn``.
        y: (B,) int64 class labels.
        steps: number of integration steps >= 1.
        method: ``"euler"`` or ``"heun"``.
        cfg_scale: guidance weight w; 1 = plain conditional prediction (one pass).
        guidance_interval: (lo, hi) with 0 <= lo < hi <= 1 in this module's t; None = guide at
            every step (``(0, 1)`` gives the same samples).
        guide: the "bad" model for autoguidance, same signature and input shape as ``model``
            (e.g. an early EMA snapshot of the same run); None = classifier-free guidance.
        time_shift: s > 0 of ``time_grid``; 1 = uniform steps.

    Returns:
        (B, C, H, W) float, the sample x0 (same dtype as ``noise``), about [-1, 1] when trained.

    Raises:
        ValueError: steps < 1, unknown method, mismatched shapes, a guidance interval outside
            0 <= lo < hi <= 1, or time_shift <= 0.
    """
    times = time_grid(steps, time_shift)
    if method not in SAMPLERS:
        raise ValueError(f"unknown sampler {method!r}; valid: {', '.join(SAMPLERS)}")
    if y.shape != (noise.shape[0],):
        raise ValueError(f"y must have shape ({noise.shape[0]},), got {tuple(y.shape)}")
    interval = _checked_interval(guidance_interval)

    def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
        t_batch = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
        if cfg_scale == 1.0 or (interval is not None and not interval[0] <= t <= interval[1]):
            return model(x, t_batch, y)
        if guide is None:
            return model.forward_with_cfg(x, t_batch, y, cfg_scale)
        v_guide = guide(x, t_batch, y)
        return v_guide + cfg_scale * (model(x, t_batch, y) - v_guide)

    modes = [(m, m.training) for m in (model, guide) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        x = noise
        for t_cur, t_next in itertools.pairwise(times):
            dt = t_next - t_cur  # negative: we walk from noise to data
            v = velocity(x, t_cur)
            if method == "heun":
                # Trapezoid rule: average the slope here and at the Euler predictor's end point.
                v = 0.5 * (v + velocity(x + dt * v, t_next))
            x = x + dt * v
        return x
    finally:
        for m, was_training in modes:
            m.train(was_training)


class EMA:
    """Exponential moving average of a model's weights, with warm-up (Polyak averaging).

    After ``n`` previous updates, ``update`` uses the decay
    ``d_n = min(decay, (1 + n) / (10 + n))`` and sets ``shadow = d_n * shadow + (1 - d_n) * param``.
    The warm-up stops the random initial weights from dominating the average for the first
    ~1/(1-decay) steps. Floating-point buffers are averaged too; integer buffers are copied.

    ``shadow`` is a full, frozen ``eval()`` copy of the model: sample from it directly, or export
    its ``state_dict()``. A ``torch.compile`` wrapper is unwrapped, so keys never carry
    ``_orig_mod.``.

    Args:
        model: the model being trained (its current weights seed the shadow).
        decay: the final decay in [0, 1); DiT uses 0.9999 at batch 256, short runs want less.
        warmup: apply the warm-up rule (False = constant ``decay`` from the first step).

    Raises:
        ValueError: decay outside [0, 1).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.shadow = copy.deepcopy(_unwrap(model)).eval().requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next ``update`` will use."""
        if not self.warmup:
            return self.decay
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the shadow (call after each optimizer step)."""
        d = self.current_decay()
        source = _unwrap(model).state_dict()
        for name, ema_value in self.shadow.state_dict().items():
            value = source[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - d)
            else:
                ema_value.copy_(value)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture)."""
        _unwrap(model).load_state_dict(self.shadow.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """Plain dict for checkpoints: shadow weights, decay, warm-up flag and update count."""
        return {
            "shadow": self.shadow.state_dict(),
            "decay": self.decay,
            "warmup": self.warmup,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from ``state_dict()``; the shadow keeps its device and dtype."""
        self.shadow.load_state_dict(state["shadow"])
        self.decay = float(state["decay"])
        self.warmup = bool(state["warmup"])
        self.num_updates = int(state["num_updates"])


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under a ``torch.compile`` wrapper (``OptimizedModule._orig_mod``), else itself."""
    return getattr(model, "_orig_mod", model)
