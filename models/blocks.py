"""The DiT's parts: attention, feed-forward, the adaLN-Zero block, the final layer, the position
embeddings and the time and label embedders, with the block details of LightningDiT and SiT as
options.

The paper's DiT (Peebles & Xie 2023, arXiv:2212.09748, §3.2) uses LayerNorm, a GELU MLP and a fixed
2-D sin-cos position embedding added to the tokens. The options, each off by default:
- ``norm="rms"``: RMSNorm (Zhang & Sennrich 2019, "Root Mean Square Layer Normalization") for the
  block norms and QK-norm: no mean subtraction, one reduction fewer per norm;
- ``mlp="swiglu"``: the SwiGLU feed-forward (Shazeer 2020, "GLU Variants Improve Transformer",
  §2), with its hidden width cut to 2/3 so that its parameters and FLOPs match the GELU MLP's;
- ``rope=True``: 2-D axial rotary position embeddings on queries and keys (Su et al. 2021,
  "RoFormer", §3.4; the axial 2-D form of Heo et al. 2024, "Rotary Position Embedding for Vision
  Transformer", §3.2), which encode relative offsets between patches instead of absolute places.
LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation", §4) and SiT use these three.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["layer", "rms"]
MlpKind = Literal["gelu", "swiglu"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation: ``x * (1 + scale) + shift`` per sample.

    x: (B, T, D); shift, scale: (B, D). Returns (B, T, D), same dtype as ``x``.
    """
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def make_norm(kind: Norm, dim: int, affine: bool) -> nn.Module:
    """LayerNorm or RMSNorm over the last dim (eps 1e-6, as DiT); ``affine``: a learned gain."""
    if kind == "rms":
        return nn.RMSNorm(dim, eps=1e-6, elementwise_affine=affine)
    return nn.LayerNorm(dim, eps=1e-6, elementwise_affine=affine)


class Rope2D(nn.Module):
    """2-D axial rotary position embedding for a square grid of ``grid`` x ``grid`` tokens.

    The first half of each head's channels rotates with the token's row, the second half with its
    column; within a half, channel pairs (i, i + n/2) rotate by angle ``pos * theta^(-2k/n)``
    (RoFormer §3.4, eq. 34, in the "rotate half" layout). Queries and keys rotated this way have
    dot products that depend on the offset between two patches only (Heo et al. 2024 §3.2).

    Args:
        head_dim: channels per head, a multiple of 4.
        grid: tokens per side.
        theta: base wavelength (10,000 as RoFormer).
    """

    def __init__(self, head_dim: int, grid: int, theta: float = 10000.0):
        super().__init__()
        if head_dim % 4:
            raise ValueError(
                f"2-D RoPE needs a head width divisible by 4, got {head_dim}; change hidden_size "
                "or num_heads"
            )
        quarter = head_dim // 4
        freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)
        pos = torch.arange(grid, dtype=torch.float64)
        rows, cols = torch.meshgrid(pos, pos, indexing="ij")  # row-major tokens, as unpatchify
        angle_r = rows.flatten()[:, None] * freqs[None]  # (T, quarter)
        angle_c = cols.flatten()[:, None] * freqs[None]
        # Per half (rows, columns): angles for channel pairs (i, i + quarter).
        angles = torch.cat([angle_r, angle_r, angle_c, angle_c], dim=1)  # (T, head_dim)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, head_dim) queries or keys -> the same, rotated (dtype kept)."""
        half = x.shape[-1] // 2
        rows, cols = x[..., :half], x[..., half:]
        rotated = torch.cat([_rotate_half(rows), _rotate_half(cols)], dim=-1)
        return (x * self.cos + rotated * self.sin).to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (-x[n/2:], x[:n/2]): the 90-degree turn of each pair (i, i + n/2)."""
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention through ``F.scaled_dot_product_attention`` (fused kernels).

    Args:
        dim: token width D, divisible by ``num_heads``.
        num_heads: number of heads H; head width D / H.
        qk_norm: normalise each head's queries and keys before the dot product, which keeps
            attention logits bounded and training stable at high learning rates
            (Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters", §3.1).
        norm: the QK-norm's kind, LayerNorm or RMSNorm.
        rope: a ``Rope2D`` to rotate queries and keys with (after the QK-norm), or None.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_norm: bool = False,
        norm: Norm = "layer",
        rope: Rope2D | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.k_norm = make_norm(norm, self.head_dim, affine=True) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.rope = rope  # shared by every block: a buffer, not parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, D/H)
        # Under autocast the norms return float32 while v is bf16/fp16; SDPA needs one dtype.
        q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)
        if self.rope is not None:
            q, k = self.rope(q), self.rope(k)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """Transformer feed-forward: Linear, GELU (tanh approximation, as in DiT), Linear."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        return self.fc2(self.act(self.fc1(x)))


class SwiGLU(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020 §2): ``fc2(silu(a) * b)`` with ``[a, b] = fc1(x)``.

    ``hidden_dim`` is the GELU MLP's width; the gated one uses 2/3 of it (rounded up to a multiple
    of 8), so its three matrices hold as many weights as the GELU MLP's two (as LLaMA does).
    """

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        gated = -(-int(2 * hidden_dim / 3) // 8) * 8
        self.fc1 = nn.Linear(dim, 2 * gated)
        self.fc2 = nn.Linear(gated, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        a, b = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(a) * b)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie 2023 §3.2, Fig. 3).

    The conditioning vector ``c`` regresses a shift, scale and gate for each of the two residual
    branches; the gates start at zero, so every block starts as the identity. ``norm``, ``mlp``
    and ``rope`` pick the block details (module docstring).
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        norm: Norm = "layer",
        mlp: MlpKind = "gelu",
        rope: Rope2D | None = None,
    ):
        super().__init__()
        self.norm1 = make_norm(norm, hidden_size, affine=False)
        self.attn = Attention(hidden_size, num_heads, qk_norm, norm, rope)
        self.norm2 = make_norm(norm, hidden_size, affine=False)
        feed_forward = SwiGLU if mlp == "swiglu" else Mlp
        self.mlp = feed_forward(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) tokens; c: (B, D) conditioning -> (B, T, D)."""
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x (B, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """The final layer of DiT: adaLN, then a linear map from tokens to patch pixels (DiT §3.2)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: Norm = "layer"):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D); c: (B, D) -> (B, T, p*p*C_out)."""
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding (MAE, He et al. 2022; used by DiT §3.2).

    Half of the channels encode the column, half the row. Returns (grid_size**2, embed_dim)
    float32, tokens in row-major order (matching ``unpatchify``). ``embed_dim`` % 4 == 0.
    """
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    emb_w = get_1d_sincos_pos_embed(embed_dim // 2, cols.flatten())
    emb_h = get_1d_sincos_pos_embed(embed_dim // 2, rows.flatten())
    return torch.cat([emb_w, emb_h], dim=1).float()


def get_1d_sincos_pos_embed(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """pos: (M,) positions -> (M, embed_dim) as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-2k/d)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double()[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


#################################################################################
#               Embedding Layers for Timesteps and Class Labels                 #
#################################################################################


class TimestepEmbedder(nn.Module):
    """Embeds scalar times into vectors: sinusoidal features, then a 2-layer MLP (DiT §3.2).

    Args:
        hidden_size: output width D.
        frequency_embedding_size: number of sinusoidal features (even).
        time_scale: factor applied to ``t`` before the sinusoids. Our ``t`` lives in [0, 1];
            1000 maps it onto the 0..999 range the DiT frequencies were designed for, so the
            highest frequency still resolves small differences in ``t``.
    """

    def __init__(
        self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0
    ):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """Sinusoidal embedding (Vaswani et al. 2017 §3.5) of ``t``: (B,) float -> (B, dim) float32."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t: (B,) float in [0, 1] -> (B, D)."""
        t_freq = self.timestep_embedding(t * self.time_scale, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Embeds class labels into vectors, with label dropout for classifier-free guidance.

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``; the extra row, index
    ``num_classes``, is the learned null ("unconditional") class (Ho & Salimans 2022 §3.2;
    DiT §3.2 "Classifier-free guidance").

    Args:
        num_classes: number of real classes N >= 1; labels are 0..N-1, and N means "no class".
        hidden_size: output width D.
        dropout_prob: probability, during training, of replacing a label by the null class.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(
        self, labels: torch.Tensor, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Replace labels by the null class, at random (``dropout_prob``) or where ``force_drop_ids``.

        labels: (B,) int64; force_drop_ids: (B,) bool or 0/1, True/1 = drop. Returns (B,) int64.
        The random draw uses torch's global RNG on ``labels.device``.
        """
        if force_drop_ids is None:
            drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop_ids = force_drop_ids.to(device=labels.device, dtype=torch.bool)
        return torch.where(drop_ids, self.num_classes, labels)

    def forward(
        self, labels: torch.Tensor, train: bool, force_drop_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """labels: (B,) int64 in [0, num_classes] -> (B, D)."""
        use_dropout = self.dropout_prob > 0
        if (train and use_dropout) or (force_drop_ids is not None):
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)
