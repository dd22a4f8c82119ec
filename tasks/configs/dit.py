"""The DiT training config (`DiTConfig`) and its named presets (`PRESETS`).

Kept apart from the training loop (`tasks.train_dit`) so that the command lines, the flow's
parameter checks and the deployments can read and validate a config without building a model,
and without importing torch (seconds): the named architectures are plain data here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from tasks.champions import PREFIX as CHAMPION_PREFIX
from tasks.training.config import TrainConfig

# `models.dit.DIT_CONFIGS` as plain data, the ARCH_FIELDS per name, so that a config is checked
# without torch; tests/test_first_contact.py checks that the two tables agree.
ARCH_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")
ARCHS: dict[str, tuple[int, int, int, int]] = {
    "DiT-B/2": (12, 768, 12, 2),
    "DiT-B/4": (12, 768, 12, 4),
    "DiT-B/8": (12, 768, 12, 8),
    "DiT-S/2": (12, 384, 6, 2),
    "DiT-S/4": (12, 384, 6, 4),
    "DiT-S/8": (12, 384, 6, 8),
    "DiT-Ti/2": (6, 192, 3, 2),
    "DiT-Ti/4": (6, 192, 3, 4),
    "DiT-Ti/8": (6, 192, 3, 8),
    "DiT-Nano/2": (2, 64, 4, 2),
    "DiT-Nano/4": (2, 64, 4, 4),
}


def check_interval(interval: tuple[float, float] | None) -> None:
    """Raise a one-line ValueError unless `interval` is None or (lo, hi), 0 <= lo < hi <= 1
    (`models.flow_matching.sample` checks the same, without this torch-free module)."""
    if interval is not None and not 0.0 <= interval[0] < interval[1] <= 1.0:
        lo, hi = interval
        raise ValueError(
            f"guidance_interval=({lo:g}, {hi:g}) must have 0 <= lo < hi <= 1 (t = 1 is noise)"
        )


class DiTConfig(TrainConfig):
    """Everything that defines a DiT training run (see `TrainConfig` for the shared fields).

    The architecture is a named `models.dit.DIT_CONFIGS` entry (`arch`, one of `ARCHS`) with
    optional overrides of its width, depth, heads and patch size; `image_size` is the DiT's input
    size.
    """

    arch: str = Field("DiT-Nano/4", description="named DiT config, e.g. DiT-Ti/4, DiT-S/4")
    hidden_size: int | None = Field(None, ge=4, description="override of the arch's width")
    depth: int | None = Field(None, ge=1, description="override of the arch's depth")
    num_heads: int | None = Field(None, ge=1, description="override of the arch's heads")
    patch_size: int | None = Field(None, ge=1, description="override of the arch's patch size")
    mlp_ratio: float = Field(4.0, gt=0)
    qk_norm: bool = False
    stem_channels: int = Field(0, ge=0, description="conv stem width before patchify; 0 = none")
    long_skip: bool = Field(False, description="U-ViT long skips between shallow and deep blocks")
    final_conv: bool = Field(False, description="residual 3x3 conv after unpatchify")
    norm: Literal["layer", "rms"] = Field("layer", description="LayerNorm or RMSNorm in blocks")
    mlp: Literal["gelu", "swiglu"] = Field("gelu", description="GELU MLP or SwiGLU")
    rope: bool = Field(False, description="2-D RoPE in attention instead of sin-cos embeddings")
    prediction: Literal["velocity", "x"] = Field(
        "velocity", description="network output: the velocity, or x0 turned into it (Li & He)"
    )
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' matrices, AdamW for the rest"
    )
    class_dropout_prob: float = Field(0.1, ge=0, lt=1, description="CFG label dropout")
    time_schedule: Literal["uniform", "logit_normal"] = "logit_normal"
    time_loc: float = Field(0.0, description="logit-normal location (SD3: 0; > 0 favours noise)")
    time_scale: float = Field(1.0, gt=0, description="logit-normal scale (SD3: 1)")
    flip: bool = Field(True, description="random horizontal flips")
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    ema_max_window: float = Field(
        0.1,
        gt=0,
        le=1,
        description="cap the EMA window 1/(1-decay) at this fraction of the planned steps",
    )
    sample_every: int = Field(500, ge=1, description="steps between EMA sample grids")
    samples_per_class: int = Field(8, ge=1, description="grid columns (one row per class)")
    sample_steps: int = Field(25, ge=1, description="ODE steps for grids")
    sample_method: Literal["euler", "heun"] = "euler"
    cfg_scale: float = Field(2.0, ge=1.0, description="CFG scale for grids and default sampling")
    # Sampling levers (issue 21 §2; models.flow_matching.sample): the export's defaults.
    guidance: Literal["cfg", "auto"] = Field(
        "cfg", description="guidance: classifier-free (null class) or auto (the guide snapshot)"
    )
    guidance_interval: tuple[float, float] | None = Field(
        None, description="guide only at t in [LO, HI] (t = 1 is noise); default: every step"
    )
    time_shift: float = Field(1.0, gt=0, description="SD3 shift of the sampler's time grid")
    guide_snapshot_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="export the EMA at this share of the planned steps as the autoguidance "
        "guide; 0 = none",
    )
    sdpa_backend: Literal["auto", "math"] = Field(
        "auto", description="attention kernel in training: torch's choice, or the unfused math path"
    )
    # Representation alignment (REPA, Yu et al. 2025 §3; tasks/training/repa.py), off without a
    # teacher. Never the evaluation's judge: the FD is measured in its features.
    repa_teacher: str | None = Field(
        None,
        min_length=1,
        description="REPA: classifier export folder or champion:<deployment> whose spatial "
        "features an early block is aligned to; default: no REPA",
    )
    repa_weight: float = Field(0.5, gt=0, description="REPA: lambda, the alignment loss weight")
    repa_depth: int = Field(2, ge=1, description="REPA: the block (1-based) whose tokens align")
    repa_projector_dim: int = Field(256, ge=1, description="REPA: projector MLP hidden width")
    # Where a champion teacher is missing (none promoted yet) or, in a flow run, is the only
    # classifier that could judge this DiT: fail, or train without REPA predicting this.
    # x-prediction won only together with REPA (docs/recipes-round-two.md), hence the pairing.
    # A missing folder is a mistake, not a state: it always fails.
    repa_fallback: Literal["error", "velocity", "x"] = Field(
        "error",
        description="without the champion named by repa_teacher: fail (error), or train "
        "without REPA with this prediction (velocity, x)",
    )

    @model_validator(mode="after")
    def _architecture_fits(self) -> DiTConfig:
        # The sizes `models.dit.DiT` accepts, in the user's words (image_size, not input_size).
        if self.arch not in ARCHS:
            raise ValueError(f"arch={self.arch!r} is unknown; choose one of {sorted(ARCHS)}")
        if self.guidance == "cfg" and self.cfg_scale != 1.0 and self.class_dropout_prob == 0:
            raise ValueError("cfg_scale != 1 needs class_dropout_prob > 0 (a trained null class)")
        check_interval(self.guidance_interval)
        if self.guidance == "auto" and self.guide_snapshot_fraction == 0:
            raise ValueError(
                "guidance='auto' needs a guide: set guide_snapshot_fraction > 0 (e.g. 0.25)"
            )
        arch = self.architecture(num_classes=1)
        patch, width, heads = arch["patch_size"], arch["hidden_size"], arch["num_heads"]
        if self.image_size % patch:
            raise ValueError(
                f"patch_size={patch} must divide image_size={self.image_size}; choose an image "
                f"size that is a multiple of the patch size (e.g. {patch * 8})"
            )
        if width % heads:
            raise ValueError(
                f"hidden_size={width} must be divisible by num_heads={heads}; change one of them"
            )
        if width % 4:
            raise ValueError(
                f"hidden_size={width} must be a multiple of 4 for the 2-D sin-cos position "
                "embedding"
            )
        if self.rope and (width // heads) % 4:
            raise ValueError(
                f"rope needs a head width (hidden_size / num_heads = {width // heads}) divisible "
                "by 4; change hidden_size or num_heads, or turn rope off"
            )
        return self

    @model_validator(mode="after")
    def _repa_block_exists(self) -> DiTConfig:
        depth = self.architecture(num_classes=1)["depth"]
        if self.repa_teacher is not None and self.repa_depth > depth:
            raise ValueError(
                f"repa_depth={self.repa_depth} exceeds the DiT's depth={depth}; align an early "
                f"block (e.g. repa_depth={max(1, depth // 3)})"
            )
        return self

    @property
    def repa_optional(self) -> bool:
        """Whether this run may train without its REPA teacher: a `repa_fallback` is set and the
        teacher is a champion (`champion:<deployment>`), which exists once one is promoted."""
        teacher = self.repa_teacher or ""
        return self.repa_fallback != "error" and teacher.startswith(CHAMPION_PREFIX)

    def without_repa(self) -> DiTConfig:
        """This config with REPA off and `prediction` set to `repa_fallback`: what the run trains
        where its teacher is missing. Raises ValueError when `repa_fallback` is "error"."""
        return self.model_copy(update=self.without_repa_fields())

    def without_repa_fields(self) -> dict[str, Any]:
        """The fields `without_repa` changes, as overrides (what a flow run pins). Raises
        ValueError when `repa_fallback` is "error"."""
        if self.repa_fallback == "error":
            raise ValueError(
                f"repa_teacher={self.repa_teacher!r} has no fallback (repa_fallback='error')"
            )
        return dict(repa_teacher=None, prediction=self.repa_fallback, repa_fallback="error")

    def architecture(self, num_classes: int) -> dict[str, Any]:
        """The `DiT(**kwargs)` arguments for `num_classes` classes: the named arch's sizes with
        this config's overrides (the same dict as the built model's `config`)."""
        named = dict(zip(ARCH_FIELDS, ARCHS[self.arch], strict=True))
        sizes = {k: v if (v := getattr(self, k)) is not None else named[k] for k in ARCH_FIELDS}
        return dict(
            input_size=self.image_size,
            patch_size=sizes["patch_size"],
            in_channels=3,
            hidden_size=sizes["hidden_size"],
            depth=sizes["depth"],
            num_heads=sizes["num_heads"],
            mlp_ratio=self.mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=self.class_dropout_prob,
            qk_norm=self.qk_norm,
            stem_channels=self.stem_channels,
            long_skip=self.long_skip,
            final_conv=self.final_conv,
            # As `models.dit.DiT.config`: the block options only where they leave the paper's.
            **{k: getattr(self, k) for k, v in _BLOCK_DEFAULTS.items() if getattr(self, k) != v},
        )


_BLOCK_DEFAULTS = dict(norm="layer", mlp="gelu", rope=False, prediction="velocity")

# The 2-core demo: DiT-Ti/4 at 32 px, 10 minutes; why: docs/recipes.md.
_CPU_SMALL = DiTConfig(
    arch="DiT-Ti/4",
    image_size=32,
    steps=100_000,
    time_budget_minutes=10.0,
    batch_size=16,
    lr=1e-3,
    warmup_steps=100,
    weight_decay=0.0,
    qk_norm=True,
    stem_channels=32,
    long_skip=True,
    final_conv=True,
    sdpa_backend="math",
    log_every=20,
    sample_every=500,
    ckpt_every_steps=500,
    ckpt_every_minutes=2.0,
    ema_decay=0.999,
    cfg_scale=5.0,
    sample_method="heun",
    sample_steps=16,
)

PRESETS: dict[str, DiTConfig] = {
    # Tests and CI: 64 tokens of width 64, seconds on one core.
    "cpu-tiny": DiTConfig(
        arch="DiT-Nano/4",
        image_size=32,
        steps=30,
        batch_size=16,
        lr=1e-3,
        warmup_steps=5,
        log_every=5,
        sample_every=15,
        samples_per_class=4,
        sample_steps=8,
        ckpt_every_steps=15,
        ema_decay=0.99,
        progress_bar=False,
    ),
    # Issue 21's winner (docs/recipes-round-two.md): x-prediction and REPA of block 2 to the
    # `classifier` deployment's champion, where there is one that another classifier can replace
    # as this DiT's judge (`tasks.adapters.lifecycle.choose_repa`); else the best recipe without
    # a teacher, `cpu-small-no-teacher`.
    "cpu-small": DiTConfig.model_validate(
        _CPU_SMALL.model_dump()
        | dict(
            prediction="x",
            repa_teacher="champion:classifier",
            repa_depth=2,
            repa_fallback="velocity",
        )
    ),
    # The 2-core demo without a teacher, whatever champions exist: `cpu-small` as it trains
    # where REPA is off, and the base of `benchmarks/recipes.py`'s ablations.
    "cpu-small-no-teacher": _CPU_SMALL,
    # The Modal default: DiT-S/4 + the cpu-small additions at 128 px, batch 128, one hour; why,
    # with the arithmetic (benchmarks/gpu_presets.py): docs/gpu_presets.md.
    "gpu": DiTConfig(
        arch="DiT-S/4",
        image_size=128,
        steps=100_000,
        time_budget_minutes=60.0,
        batch_size=128,
        lr=5e-4,
        warmup_steps=500,
        weight_decay=0.0,
        qk_norm=True,
        stem_channels=32,
        long_skip=True,
        final_conv=True,
        log_every=100,
        sample_every=2_000,
        ckpt_every_steps=2_000,
        ckpt_every_minutes=10.0,
        ema_decay=0.9999,
        ema_max_window=0.1,
        compile=True,
        cfg_scale=3.0,
        sample_method="heun",
        sample_steps=32,
    ),
}
