"""The Sana Linear DiT (Xie et al. 2024, arXiv 2410.10629, section 2.2).

A diffusion transformer over DC-AE latents in which
  * every self-attention is ReLU linear attention, O(N) in the number of tokens (models/attention.py);
  * the feed-forward is a Mix-FFN: 1x1 expand -> SiLU -> 3x3 depthwise conv -> GLU -> 1x1 project. The
    depthwise conv sees 2D neighbours, which is what lets the 512/1024 models drop positional encoding;
  * conditioning on time is AdaLN-single: one shared MLP makes a 6C vector per sample, and every block adds
    its own learned (6, C) table to it (PixArt-alpha);
  * text enters through softmax cross-attention over the projected, RMS-normalised caption states.

Parameter names follow the published diffusers checkpoints (`SanaTransformer2DModel`), so their
state dicts load strictly; nesting that looks odd (`time_embed.emb.timestep_embedder`, `to_out.0`) is there
only for that reason. The model is a pure function of its inputs: no caching, no state set in forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sana.config import ConfigError
from sana.models.attention import relu_linear_attention
from sana.models.layers import RMSNorm, TimestepEmbedder
from sana.types import Conditioning, TextEmbeddings

# Additive bias for masked text tokens. Not -inf: a row with every token masked must stay finite, and the
# published models were run with exactly this value (exp(-1e4) underflows to 0 in fp32 anyway).
MASK_BIAS = -10000.0

QK_NORMS = (None, "rms_norm_across_heads")


@dataclass(frozen=True)
class DiTConfig:
    """Field names and defaults are those of the published transformer/config.json (the defaults are the
    1600M widths, as in diffusers; always pass a full config or use a preset)."""

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 20
    num_cross_attention_heads: int | None = 20
    cross_attention_head_dim: int | None = 112
    cross_attention_dim: int | None = 2240
    caption_channels: int = 2304
    mlp_ratio: float = 2.5
    dropout: float = 0.0
    attention_bias: bool = False
    sample_size: int = 32
    patch_size: int = 1
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None  # set: add 2D sin-cos positions (the 2K/4K checkpoints)
    guidance_embeds: bool = False  # Sana-Sprint: embed the guidance scale like a timestep
    guidance_embeds_scale: float = 0.1
    qk_norm: str | None = None  # "rms_norm_across_heads" for Sana-1.5 / Sprint
    timestep_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ConfigError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        if self.cross_attention_dim is None or self.num_cross_attention_heads is None:
            raise ConfigError("the Sana DiT needs cross-attention: set cross_attention_dim and its heads")
        if self.cross_attention_dim != self.hidden_size:
            raise ConfigError(
                f"cross_attention_dim ({self.cross_attention_dim}) must equal num_attention_heads x "
                f"attention_head_dim ({self.hidden_size}): captions are projected to the model width"
            )
        for name in ("in_channels", "num_layers", "patch_size", "sample_size", "attention_head_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.interpolation_scale is not None and self.hidden_size % 4:
            raise ConfigError(f"sin-cos positions need a width divisible by 4, got {self.hidden_size}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def cross_inner_dim(self) -> int:
        return self.num_cross_attention_heads * (self.cross_attention_head_dim or self.attention_head_dim)

    @property
    def ffn_hidden(self) -> int:
        return int(self.mlp_ratio * self.hidden_size)


# ----------------------------------------------------------------------------------------------- helpers


def sincos_positions(
    dim: int, h: int, w: int, base_size: int, interpolation_scale: float, device: torch.device | None = None
) -> torch.Tensor:
    """2D sin-cos positional table (MAE style), (h*w, dim) float32.

    Coordinates are rescaled so a grid of `base_size` cells spans [0, base_size / interpolation_scale)
    whatever the actual grid size. The first dim/2 channels encode the column (x) coordinate and the second
    half the row (y): the published 2K/4K checkpoints were trained with that order. The frequencies are
    taken in float64, the positions in float32, as the checkpoints were.
    """
    ys = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale
    xs = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")  # (h, w) each; token order is row-major
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4))  # (dim/4,)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = torch.outer(pos.reshape(-1).double(), omega)  # (h*w, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(gx), encode(gy)], dim=1).float()  # (h*w, dim)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation x * (1 + scale) + shift, as one fused multiply-add pass."""
    return torch.addcmul(shift, x, 1 + scale)


def drop_padding(text: TextEmbeddings) -> TextEmbeddings:
    """The caption positions that some row attends to, in order; the rest are padding for every row.

    A position masked in every row adds exactly nothing: its bias of -1e4 puts its softmax weight below
    exp(-9900) next to any valid position, which is 0 in every float format, so the outputs are unchanged while
    the caption projection and the cross-attention shrink to the valid length (prompts usually fill a tenth of
    the 300 positions the text encoder pads to). A row with no valid position at all is the exception: its
    softmax spreads evenly over every position, padding included, so then nothing is dropped. (On a GPU the
    data-dependent length costs one host sync per forward, small next to the attention it saves.)
    """
    keep = text.mask.bool()  # (B, L)
    columns = keep.any(dim=0)  # (L,)
    if bool(columns.all()) or not bool(keep.any(dim=1).all()):
        return text
    index = columns.nonzero().squeeze(1)  # (L',)
    return TextEmbeddings(text.hidden.index_select(1, index), text.mask.index_select(1, index))


def mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) keep-mask -> (B, 1, 1, L) additive bias, broadcast over heads and queries."""
    return ((1 - mask.to(dtype)) * MASK_BIAS)[:, None, None, :]


# ------------------------------------------------------------------------------------------------ blocks


class LinearSelfAttention(nn.Module):
    """Multi-head ReLU linear attention over image tokens. Keys: to_q, to_k, to_v, to_out.0 (+ norm_q/k)."""

    def __init__(self, dim: int, heads: int, bias: bool, qk_norm: str | None, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(dim, dim, bias=bias)
        self.to_v = nn.Linear(dim, dim, bias=bias)
        # RMSNorm over all heads at once (not per head): Sana-1.5's choice, eps as in its diffusers port.
        self.norm_q = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(dim, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, identity_rows: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)  # (B, N, C) each
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        heads = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, N, d) each
        out = relu_linear_attention(*heads).transpose(1, 2).flatten(2)  # (B, N, C)
        if identity_rows is not None:  # perturbed rows see only their own values
            out = torch.where(identity_rows[:, None, None], v, out)
        out = self.to_out[1](self.to_out[0](out))
        if out.dtype == torch.float16:
            # fp16 overflow in one token would poison the residual stream; saturate instead.
            out = out.clamp(-65504, 65504)
        return out


class CrossAttention(nn.Module):
    """Softmax attention from image tokens to caption tokens. Keys: to_q, to_k, to_v, to_out.0 (+ norm_q/k)."""

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: str | None, dropout: float) -> None:
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, inner)
        self.to_k = nn.Linear(dim, inner)
        self.to_v = nn.Linear(dim, inner)
        self.norm_q = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.norm_k = RMSNorm(inner, eps=1e-5) if qk_norm else None
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)  # (B, N, I), (B, L, I), (B, L, I)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, *, d)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))  # (B, h, N, d)
        return self.to_out[1](self.to_out[0](out.transpose(1, 2).flatten(2)))  # (B, N, C)


class MixFFN(nn.Module):
    """GLU Mix-FFN on the token grid. Keys: conv_inverted, conv_depth, conv_point (stored as conv weights).

    The 1x1 convolutions are applied as matmuls on the (B, N, C) tokens; only the depthwise 3x3 conv needs
    the 2D layout, and it runs on a channels-last view of the same memory, so no transpose is materialised.
    The first half of the expanded channels is the value and the second half the gate.
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.conv_inverted = nn.Conv2d(dim, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        h = F.silu(pointwise(self.conv_inverted, x))  # (B, N, 2F)
        grid = h.unflatten(1, hw).permute(0, 3, 1, 2)  # (B, 2F, H, W), channels-last strides
        h = self.conv_depth(grid).permute(0, 2, 3, 1).flatten(1, 2)  # (B, N, 2F)
        value, gate = h.chunk(2, dim=-1)  # (B, N, F) each
        return pointwise(self.conv_point, value * F.silu(gate))  # (B, N, C)


def pointwise(layer: nn.Conv2d | nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution applied to (B, N, C) tokens as a matmul. Quantization (sana/quantization.py) replaces
    the FFN's 1x1 convolutions with the equivalent nn.Linear, the layer torchao quantizes; both run here."""
    if isinstance(layer, nn.Linear):
        return layer(x)
    return F.linear(x, layer.weight.flatten(1), layer.bias)


class SanaBlock(nn.Module):
    """adaLN-modulated linear self-attention, un-normalised ungated cross-attention, modulated Mix-FFN."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        dim = cfg.hidden_size
        self.norm1 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn1 = LinearSelfAttention(
            dim, cfg.num_attention_heads, cfg.attention_bias, cfg.qk_norm, cfg.dropout
        )
        self.attn2 = CrossAttention(
            dim,
            cfg.num_cross_attention_heads,
            cfg.cross_attention_head_dim or cfg.attention_head_dim,
            cfg.qk_norm,
            cfg.dropout,
        )
        self.norm2 = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.ff = MixFFN(dim, cfg.ffn_hidden)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))

    def forward(
        self,
        x: torch.Tensor,  # (B, N, C)
        context: torch.Tensor,  # (B, L, C)
        bias: torch.Tensor,  # (B, 1, 1, L)
        t6: torch.Tensor,  # (B, 6C)
        hw: tuple[int, int],
        identity_rows: torch.Tensor | None = None,  # (B,) bool: perturbed-attention rows
    ) -> torch.Tensor:
        mod = self.scale_shift_table[None] + t6.unflatten(1, (6, -1))  # (B, 6, C)
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unsqueeze(2).unbind(1)  # (B, 1, C) each
        # addcmul: the gated residual and the modulation each in one pass over (B, N, C) instead of two.
        x = torch.addcmul(x, gate1, self.attn1(modulate(self.norm1(x), shift1, scale1), identity_rows))
        x = x + self.attn2(x, context, bias)
        return torch.addcmul(x, gate2, self.ff(modulate(self.norm2(x), shift2, scale2), hw))


# ------------------------------------------------------------------------------------ conditioning stems


class PatchEmbed(nn.Module):
    """p x p patches -> tokens (row-major), plus sin-cos positions when the config asks for them."""

    def __init__(self, cfg: DiTConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.hidden_size, p, stride=p)
        self.interpolation_scale = cfg.interpolation_scale
        self.base_size = cfg.sample_size // p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)  # (B, C, h, w)
        h, w = x.shape[-2:]
        # Made contiguous once here: a transposed residual stream would propagate through every add and cost a
        # copy inside each LayerNorm and each Linear on it.
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, h*w, C)
        if self.interpolation_scale is None:
            return x
        # Computed per call (cheap next to one block) so the module holds no size-dependent state.
        pos = sincos_positions(x.shape[-1], h, w, self.base_size, self.interpolation_scale, x.device)
        return x + pos.to(x.dtype)


class CaptionProjection(nn.Module):
    """Text-encoder width -> model width: Linear -> GELU(tanh) -> Linear. Keys: linear_1, linear_2."""

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(y), approximate="tanh"))


class _Container(nn.Module):
    """An empty module used only to reproduce a published key prefix (`time_embed.emb.*`)."""


class TimeEmbedding(nn.Module):
    """AdaLN-single: time (and, for Sprint, guidance) -> (emb (B, C), t6 (B, 6C)).

    `emb` conditions the final layer; `t6` = Linear(SiLU(emb)) feeds every block's modulation.
    Key layout: `emb.timestep_embedder.*` without guidance, `timestep_embedder.*` + `guidance_embedder.*` with.
    """

    def __init__(self, dim: int, guidance: bool) -> None:
        super().__init__()
        self.guidance = guidance
        if guidance:
            self.timestep_embedder = TimestepEmbedder(dim)
            self.guidance_embedder = TimestepEmbedder(dim)
        else:
            self.emb = _Container()
            self.emb.timestep_embedder = TimestepEmbedder(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(
        self, t: torch.Tensor, guidance: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.guidance:
            if guidance is None:
                raise ValueError("this model embeds the guidance scale: pass `guidance`")
            emb = self.timestep_embedder(t, dtype) + self.guidance_embedder(guidance, dtype)
        else:
            emb = self.emb.timestep_embedder(t, dtype)
        return emb, self.linear(F.silu(emb))  # (B, C), (B, 6C)


# ------------------------------------------------------------------------------------------------- model


class SanaDiT(nn.Module):
    """forward(x (B, C_in, H, W), t (B,), cond: Conditioning) -> velocity (B, C_out, H, W).

    `t` is fed to the sinusoidal features as given: the published checkpoints expect the integer
    timestep floor(1000 * sigma) times `timestep_scale`; the schedules build those numbers
    (sana/samplers/schedules.py), not the model. `cond.guidance` is likewise the already-scaled value the
    guidance embedder sees.
    """

    config_class = DiTConfig
    diffusers_class_name = "SanaTransformer2DModel"

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        dim = config.hidden_size
        self.patch_embed = PatchEmbed(config)
        self.time_embed = TimeEmbedding(dim, config.guidance_embeds)
        self.caption_projection = CaptionProjection(config.caption_channels, dim)
        self.caption_norm = RMSNorm(dim, eps=1e-5)
        self.transformer_blocks = nn.ModuleList(SanaBlock(config) for _ in range(config.num_layers))
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.norm_out = _Container()  # the final LayerNorm has no parameters but a published name
        self.norm_out.norm = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        p = config.patch_size
        self.proj_out = nn.Linear(dim, p * p * config.output_channels)
        self.gradient_checkpointing = False

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialisation for training from scratch (loading a checkpoint overwrites all of it).

        Linear layers: Xavier-uniform, zero bias (DiT). Time and caption MLPs: N(0, 0.02). The AdaLN tables:
        N(0, 1/C) as in PixArt/Sana. The shared 6C modulation and the output projection start at zero, so a
        fresh model is the identity through every block and predicts zero velocity (adaLN-zero, DiT sec. 3.2).
        Convolutions keep PyTorch's default (Kaiming-uniform), as the original Mix-FFN does.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Conv2d):
                m.reset_parameters()
            elif isinstance(m, RMSNorm | nn.LayerNorm) and getattr(m, "weight", None) is not None:
                nn.init.ones_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.flatten(1))
        embedders = [self.caption_projection, self.time_embed]
        for lin in (m for e in embedders for m in e.modules() if isinstance(m, nn.Linear)):
            nn.init.normal_(lin.weight, std=0.02)
        dim = self.config.hidden_size
        for table in [self.scale_shift_table] + [b.scale_shift_table for b in self.transformer_blocks]:
            nn.init.normal_(table, std=dim**-0.5)
        nn.init.zeros_(self.time_embed.linear.weight)
        nn.init.zeros_(self.time_embed.linear.bias)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> None:
        """One-line errors for inputs the model cannot take, before any compute."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size or h == 0 or w == 0:
            raise ValueError(f"latent size {h}x{w} is not a positive multiple of patch size {cfg.patch_size}")
        if not isinstance(cond, Conditioning):
            raise TypeError(f"the DiT takes a Conditioning, got {type(cond).__name__}")
        if cond.text.hidden.shape[-1] != cfg.caption_channels:
            raise ValueError(
                f"text embeddings have {cond.text.hidden.shape[-1]} channels, model expects {cfg.caption_channels}"
            )
        if len(cond) != x.shape[0] or t.shape not in ((x.shape[0],), ()):
            raise ValueError(f"batch mismatch: latent {x.shape[0]}, text {len(cond)}, timesteps {tuple(t.shape)}")
        if cfg.guidance_embeds and cond.guidance is None:
            raise ValueError("this model embeds the guidance scale: the conditioning needs `guidance`")
        if len(cond.residuals) >= cfg.num_layers:
            raise ValueError(
                f"{len(cond.residuals)} residuals for a {cfg.num_layers}-block model "
                f"(at most {cfg.num_layers - 1})"
            )

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """x (B, C_in, H, W) at model time t (B,) or () -> velocity (B, C_out, H, W)."""
        self.check_inputs(x, t, cond)
        b, _, height, width = x.shape
        p = self.config.patch_size
        hw = (height // p, width // p)
        t = t.expand(b) if t.ndim == 0 else t

        tokens = self.patch_embed(x)  # (B, N, C)
        dtype = tokens.dtype
        emb, t6 = self.time_embed(t, cond.guidance, dtype)  # (B, C), (B, 6C)
        text = drop_padding(cond.text)  # (B, L', C_text): only positions some row attends to
        context = self.caption_norm(self.caption_projection(text.hidden.to(dtype)))  # (B, L', C)
        bias = mask_to_bias(text.mask, dtype)  # (B, 1, 1, L')
        perturbation = cond.perturbation

        for i, block in enumerate(self.transformer_blocks):
            rows = perturbation.rows if perturbation is not None and i in perturbation.blocks else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, context, bias, t6, hw, rows, use_reentrant=False)
            else:
                tokens = block(tokens, context, bias, t6, hw, rows)
            if 0 < i <= len(cond.residuals):  # a ControlNet's contribution to this block's output
                tokens = tokens + cond.residuals[i - 1].to(dtype)

        shift, scale = (self.scale_shift_table[None] + emb[:, None]).unsqueeze(2).unbind(1)  # (B, 1, C) each
        tokens = self.proj_out(modulate(self.norm_out.norm(tokens), shift, scale))  # (B, N, p*p*C_out)
        out = tokens.unflatten(1, hw).unflatten(-1, (p, p, -1))  # (B, h, w, p, p, C_out)
        return out.permute(0, 5, 1, 3, 2, 4).reshape(b, -1, height, width)  # (B, C_out, H, W)


# ------------------------------------------------------------------------------------------------ presets


def _sana(width_heads: int, layers: int, cross_heads: int, cross_head_dim: int, **extra) -> DiTConfig:
    dim = width_heads * 32
    return DiTConfig(
        num_attention_heads=width_heads,
        attention_head_dim=32,
        num_layers=layers,
        num_cross_attention_heads=cross_heads,
        cross_attention_head_dim=cross_head_dim,
        cross_attention_dim=dim,
        **extra,
    )


# 600M: 36 heads x 32 = 1152 wide, 28 blocks; 1600M: 70 x 32 = 2240 wide, 20 blocks. sample_size is the
# latent side (image side / 32); interpolation_scale is None for 512/1024 (no positions), 1.0 for 2K and
# 2.0 for 4K. Sana-1.5 and Sprint add RMS q/k norm across heads; Sprint adds the guidance embedder.
DIT_PRESETS: dict[str, DiTConfig] = {
    "sana-600m-512": _sana(36, 28, 16, 72, sample_size=16),
    "sana-600m-1024": _sana(36, 28, 16, 72, sample_size=32),
    "sana-600m-2k": _sana(36, 28, 16, 72, sample_size=64, interpolation_scale=1.0),
    "sana-600m-4k": _sana(36, 28, 16, 72, sample_size=128, interpolation_scale=2.0),
    "sana-1600m-512": _sana(70, 20, 20, 112, sample_size=16),
    "sana-1600m-1024": _sana(70, 20, 20, 112, sample_size=32),
    "sana-1600m-2k": _sana(70, 20, 20, 112, sample_size=64, interpolation_scale=1.0),
    "sana-1600m-4k": _sana(70, 20, 20, 112, sample_size=128, interpolation_scale=2.0),
    # Sana-1.5: 1.6B keeps the 1600M widths; 4.8B is 2240 wide and 60 blocks deep.
    "sana-1.5-1.6b": _sana(70, 20, 20, 112, sample_size=32, qk_norm="rms_norm_across_heads"),
    "sana-1.5-4.8b": _sana(70, 60, 20, 112, sample_size=32, qk_norm="rms_norm_across_heads"),
    "sana-sprint-0.6b": _sana(
        36, 28, 16, 72, sample_size=32, qk_norm="rms_norm_across_heads", guidance_embeds=True
    ),
    "sana-sprint-1.6b": _sana(
        70, 20, 20, 112, sample_size=32, qk_norm="rms_norm_across_heads", guidance_embeds=True
    ),
    # The shipped shapes model's DiT (configs/train/shapes_dit.yaml): 192 wide (6 heads x 32), 8 blocks, reading
    # the shapes text encoder's 128-wide states and the shapes DC-AE's 8x8x32 latents of 256^2 images; 5.1M
    # parameters, ~0.6 GFLOP per image forward (docs/shapes.md times the whole model end to end).
    "sana-shapes": DiTConfig(
        in_channels=32,
        out_channels=32,
        num_attention_heads=6,
        attention_head_dim=32,
        num_layers=8,
        num_cross_attention_heads=6,
        cross_attention_head_dim=32,
        cross_attention_dim=192,
        caption_channels=128,
        sample_size=8,
    ),
    "tiny": DiTConfig(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=8,
        sample_size=8,
    ),
}


def parameter_count(config: DiTConfig) -> int:
    """Number of parameters, computed on the meta device (no memory)."""
    with torch.device("meta"):
        return sum(p.numel() for p in SanaDiT(config).parameters())
