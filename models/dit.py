"""Class-conditional Diffusion Transformer (DiT) that predicts a flow-matching velocity.

After Peebles & Xie, "Scalable Diffusion Models with Transformers", ICCV 2023 (arXiv:2212.09748),
and laid out like the reference facebookresearch/DiT ``models.py``: the model, then the named
configs in one table; its embedding layers, block and final layer live in ``models/blocks.py``.

Differences from the reference, each deliberate:
- pixels in, velocity out: ``out_channels == in_channels`` (no learned sigma, no VAE latents);
- the time ``t`` is a float in [0, 1] (flow-matching convention, see ``models/flow_matching.py``),
  scaled by 1000 inside ``TimestepEmbedder`` so the sinusoid frequencies cover the same band as in
  the reference, which was trained on integer steps 0..999;
- the null (unconditional) class index is ``num_classes``, read from ``DiT.null_class``;
- attention uses ``torch.nn.functional.scaled_dot_product_attention`` with optional QK-norm
  (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters", §3.1).

Optional additions for pixel-space training at small compute, all off by default (the paper's DiT):
- a convolutional stem before the patch embedding (Xiao et al. 2021, "Early Convolutions Help
  Transformers See Better", §3), giving the patches local features instead of raw pixels;
- U-ViT long skips between shallow and deep blocks (Bao et al. 2023, "All are Worth Words: A ViT
  Backbone for Diffusion Models", §3.1), which the U-ViT ablations found essential in pixel space;
- a 3x3 convolution after unpatchify (U-ViT §3.1), smoothing the seams between patches;
- LightningDiT's block details, RMSNorm, SwiGLU and 2-D RoPE (``models/blocks.py``);
- x-prediction with a velocity output (Li & He 2025, see ``DiT``'s ``prediction``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from models.blocks import (
    DiTBlock,
    FinalLayer,
    LabelEmbedder,
    MlpKind,
    Norm,
    Rope2D,
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
)

__all__ = ["DIT_CONFIGS", "DiT", "dit_from_config", "get_2d_sincos_pos_embed", "modulate"]
PREDICTIONS = ("velocity", "x")
# x-prediction divides by t: below this the division is clamped (Li & He 2025 §4 clip 1 - t at
# 0.05 in their convention, where t = 1 is data; here t = 0 is).
X_PREDICTION_T_MIN = 0.05


#################################################################################
#                                 Core DiT Model                                #
#################################################################################


class DiT(nn.Module):
    """Diffusion Transformer over pixels, predicting the flow-matching velocity.

    Args:
        input_size: image side S in pixels (square images).
        patch_size: patch side p; must divide ``input_size``. Tokens T = (S / p)^2.
        in_channels: image channels C (3 for RGB); the output has the same channels.
        hidden_size: token width D; divisible by ``num_heads`` and by 4 (2-D sin-cos embedding).
        depth: number of DiT blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        num_classes: number of real classes N >= 1. Index N is the null class (``null_class``).
        class_dropout_prob: probability of dropping a label to the null class while training
            (CFG training, Ho & Salimans 2022 §3.2), in [0, 1). With 0 there is no null class
            and CFG is unavailable.
        qk_norm: LayerNorm on queries and keys (see ``Attention``).
        stem_channels: 0 = none (the paper's patch embedding of raw pixels); C > 0 = two 3x3
            convolutions (in_channels -> C -> C, SiLU) at full resolution before the patch
            embedding.
        long_skip: U-ViT long skips: the output of block i (i < depth // 2) is concatenated with
            the input of block depth - 1 - i and projected back to D by a linear layer.
        final_conv: a residual 3x3 convolution on the unpatchified output, zero-initialised so the
            initial velocity stays exactly 0.
        norm, mlp, rope: block details (``models.blocks``): ``"layer"`` or ``"rms"`` norms,
            ``"gelu"`` or ``"swiglu"`` feed-forward, 2-D rotary position embeddings in attention
            instead of the added sin-cos embedding (head width must then be a multiple of 4).
        prediction: what the network's last layer outputs. ``"velocity"``: v directly (DiT with
            flow matching). ``"x"``: the clean image x0, turned into the velocity
            ``(x_t - x0) / t`` (t clamped at ``X_PREDICTION_T_MIN``) before it is returned, so
            the loss stays a velocity loss and the samplers are unchanged (Li & He 2025, "Back
            to Basics: Let Denoising Generative Models Denoise", §3-4: x lies on the image
            manifold while v and noise do not, which matters most for large patches).

    Raises:
        ValueError: a size that does not fit (patch size, heads, widths), naming the fix.
    """

    def __init__(
        self,
        input_size: int,
        patch_size: int,
        in_channels: int = 3,
        *,
        hidden_size: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        num_classes: int,
        class_dropout_prob: float = 0.1,
        qk_norm: bool = False,
        stem_channels: int = 0,
        long_skip: bool = False,
        final_conv: bool = False,
        norm: Norm = "layer",
        mlp: MlpKind = "gelu",
        rope: bool = False,
        prediction: str = "velocity",
    ):
        super().__init__()
        _check_sizes(input_size, patch_size, hidden_size, num_heads, depth, num_classes)
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob} must be in [0, 1)")
        if stem_channels < 0:
            raise ValueError(f"stem_channels={stem_channels} must be >= 0 (0 = no conv stem)")
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction={prediction!r} is unknown; choose one of {PREDICTIONS}")
        if norm not in ("layer", "rms") or mlp not in ("gelu", "swiglu"):
            raise ValueError(
                f"norm={norm!r}, mlp={mlp!r}: norm must be 'layer' or 'rms', mlp 'gelu' or 'swiglu'"
            )
        self.config = dict(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            num_classes=num_classes,
            class_dropout_prob=class_dropout_prob,
            qk_norm=qk_norm,
            stem_channels=stem_channels,
            long_skip=long_skip,
            final_conv=final_conv,
        )
        # The paper's defaults stay out of the config, so exports from before these options
        # existed have the same config (and load) as new ones with the defaults.
        extras = dict(norm=norm, mlp=mlp, rope=rope, prediction=prediction)
        defaults = dict(norm="layer", mlp="gelu", rope=False, prediction="velocity")
        self.config |= {k: v for k, v in extras.items() if v != defaults[k]}
        self.prediction = prediction
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.grid_size = input_size // patch_size

        self.stem = nn.Identity()
        if stem_channels:
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, stem_channels, 3, padding=1),
                nn.SiLU(),
                nn.Conv2d(stem_channels, stem_channels, 3, padding=1),
                nn.SiLU(),
            )
        # Patch embedding: a strided convolution == a linear map of each non-overlapping patch.
        embed_in = stem_channels or in_channels
        self.x_embedder = nn.Conv2d(embed_in, hidden_size, patch_size, stride=patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        # Fixed (not learned, not saved) 2-D sin-cos position embedding, as in DiT; with RoPE
        # the positions enter attention instead, and this is zero.
        pos_embed = get_2d_sincos_pos_embed(hidden_size, self.grid_size).unsqueeze(0)
        self.register_buffer("pos_embed", pos_embed * (not rope), persistent=False)
        rotary = Rope2D(hidden_size // num_heads, self.grid_size) if rope else None
        self.blocks = nn.ModuleList(
            [
                DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm, norm, mlp, rotary)
                for _ in range(depth)
            ]
        )
        # One projection per deep block that receives a skip: the second half of the blocks.
        self.skip_projections = nn.ModuleList(
            [nn.Linear(2 * hidden_size, hidden_size) for _ in range(depth // 2)]
            if long_skip
            else []
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels, norm)
        self.final_conv = (
            nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1) if final_conv else None
        )
        self.initialize_weights()

    @property
    def null_class(self) -> int:
        """Label index of the null (unconditional) class: always ``num_classes``."""
        return self.num_classes

    def initialize_weights(self) -> None:
        """DiT initialisation (Peebles & Xie 2023 §3.2, reference ``initialize_weights``)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                torch.nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)

        # Initialise the patch embedding like nn.Linear (as in ViT), not like a convolution.
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
        nn.init.constant_(self.x_embedder.bias, 0)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        # adaLN-Zero: zero the modulation regressors so every gate is 0 at the start. Each block
        # is then the identity, which the DiT paper found trains best (§3.2, Fig. 5), like
        # zero-initialising the last BN scale of ResNet blocks (Goyal et al. 2017).
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)

        # Zero the output layer too, so the initial velocity prediction is exactly 0: the first
        # loss is then E|noise - x0|^2 whatever the depth, and no block's noise reaches the output.
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)
        if self.final_conv is not None:  # residual, so zero keeps the initial output at 0
            nn.init.constant_(self.final_conv.weight, 0)
            nn.init.constant_(self.final_conv.bias, 0)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*C) -> (B, C, S, S): tokens in row-major order, each patch's pixels as
        (p, p, C), as in the reference DiT."""
        c, p, h = self.out_channels, self.patch_size, self.grid_size
        x = x.reshape(x.shape[0], h, h, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, h * p)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor,
        force_drop_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the velocity ``noise - x0`` at ``x``.

        Args:
            x: (B, C, S, S) float, the noisy image x_t (data scaled to about [-1, 1]).
            t: (B,) float in [0, 1]; 0 = data, 1 = noise.
            y: (B,) int64 labels in [0, num_classes]; ``num_classes`` = unconditional.
            force_drop_ids: optional (B,) bool, True = use the null class for that sample,
                instead of the random label dropout done in training mode.

        Returns:
            (B, C, S, S) velocity, dtype of the model's computation.

        Raises:
            ValueError: ``x`` does not have shape (B, in_channels, input_size, input_size).
        """
        if x.shape[1:] != (self.in_channels, self.input_size, self.input_size):
            raise ValueError(
                f"DiT expects x of shape (B, {self.in_channels}, {self.input_size}, "
                f"{self.input_size}), got {tuple(x.shape)}"
            )
        x_t = x
        x = self.x_embedder(self.stem(x)).flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)  # (B, D)
        x = self._blocks(x, c)
        out = self.unpatchify(self.final_layer(x, c))
        if self.final_conv is not None:
            out = out + self.final_conv(out)
        if self.prediction == "x":  # out is x0: v = (x_t - x0) / t on the straight path
            t_safe = t.clamp(min=X_PREDICTION_T_MIN).reshape(-1, 1, 1, 1).to(out.dtype)
            out = (x_t.to(out.dtype) - out) / t_safe
        return out

    def _blocks(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The DiT blocks, with U-ViT long skips when enabled: block i's output feeds block
        depth-1-i for i < depth // 2 (an odd middle block gets none). (B, T, D) -> (B, T, D)."""
        depth, skips = len(self.blocks), []
        first_deep = depth - len(self.skip_projections)
        for i, block in enumerate(self.blocks):
            if i >= first_deep:
                x = self.skip_projections[i - first_deep](torch.cat([x, skips.pop()], dim=-1))
            x = block(x, c)
            if i < len(self.skip_projections):
                skips.append(x)
        return x

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Classifier-free guided velocity (Ho & Salimans 2022, eq. 6, in velocity form).

        ``v = v_uncond + cfg_scale * (v_cond - v_uncond)``, where ``v_uncond`` uses
        ``null_class``. At ``cfg_scale == 1`` this is exactly the conditional prediction and the
        unconditional pass is skipped. Shapes as in ``forward``.

        Raises:
            ValueError: guidance requested from a model trained without a null class.
        """
        if cfg_scale == 1.0:
            return self.forward(x, t, y)
        if self.class_dropout_prob == 0:
            raise ValueError(
                "cfg_scale != 1 needs a null class; this DiT was built with "
                "class_dropout_prob=0. Use cfg_scale=1 or train with class_dropout_prob > 0"
            )
        y_null = torch.full_like(y, self.null_class)
        both = self.forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y_null]))
        cond, uncond = both.chunk(2, dim=0)
        return uncond + cfg_scale * (cond - uncond)


def _check_sizes(
    input_size: int, patch_size: int, hidden_size: int, num_heads: int, depth: int, num_classes: int
) -> None:
    if patch_size < 1 or input_size % patch_size:
        raise ValueError(
            f"patch_size={patch_size} must divide input_size={input_size}; choose an image size "
            f"that is a multiple of the patch size (e.g. {max(patch_size, 1) * 8})"
        )
    if num_heads < 1 or hidden_size % num_heads:
        raise ValueError(
            f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}; "
            "change one of them"
        )
    if hidden_size % 4:
        raise ValueError(
            f"hidden_size={hidden_size} must be a multiple of 4 for the 2-D sin-cos position "
            "embedding"
        )
    if depth < 1:
        raise ValueError(f"depth={depth} must be >= 1")
    if num_classes < 1:
        raise ValueError(f"num_classes={num_classes} must be >= 1")


#################################################################################
#                                   DiT Configs                                 #
#################################################################################
# Factories take the remaining DiT arguments (input_size, num_classes, ...) as keywords; a keyword
# that names an architecture field (depth, hidden_size, ...) overrides the config's value.
# S and B sizes are the DiT paper's Table 1; Ti (width 192, 3 heads, as DeiT-Ti) and Nano are CPU
# sizes for demos and tests.


def _factory(depth: int, hidden_size: int, num_heads: int, patch_size: int) -> Callable[..., DiT]:
    def build(**kwargs) -> DiT:
        arch = dict(
            depth=depth, hidden_size=hidden_size, num_heads=num_heads, patch_size=patch_size
        )
        return DiT(**{**arch, **kwargs})

    return build


DIT_CONFIGS: dict[str, Callable[..., DiT]] = {
    "DiT-B/2": _factory(depth=12, hidden_size=768, num_heads=12, patch_size=2),
    "DiT-B/4": _factory(depth=12, hidden_size=768, num_heads=12, patch_size=4),
    "DiT-B/8": _factory(depth=12, hidden_size=768, num_heads=12, patch_size=8),
    "DiT-S/2": _factory(depth=12, hidden_size=384, num_heads=6, patch_size=2),
    "DiT-S/4": _factory(depth=12, hidden_size=384, num_heads=6, patch_size=4),
    "DiT-S/8": _factory(depth=12, hidden_size=384, num_heads=6, patch_size=8),
    "DiT-Ti/2": _factory(depth=6, hidden_size=192, num_heads=3, patch_size=2),
    "DiT-Ti/4": _factory(depth=6, hidden_size=192, num_heads=3, patch_size=4),
    "DiT-Ti/8": _factory(depth=6, hidden_size=192, num_heads=3, patch_size=8),
    "DiT-Nano/2": _factory(depth=2, hidden_size=64, num_heads=4, patch_size=2),
    "DiT-Nano/4": _factory(depth=2, hidden_size=64, num_heads=4, patch_size=4),
}


def dit_from_config(name: str, **overrides) -> DiT:
    """Build the named DiT, e.g. ``dit_from_config("DiT-S/4", input_size=64, num_classes=13)``.

    ``overrides`` are ``DiT`` keyword arguments; architecture fields override the config's.

    Raises:
        ValueError: unknown ``name`` (the message lists the valid names), or bad sizes.
    """
    if name not in DIT_CONFIGS:
        raise ValueError(f"unknown DiT config {name!r}; valid names: {', '.join(DIT_CONFIGS)}")
    return DIT_CONFIGS[name](**overrides)
