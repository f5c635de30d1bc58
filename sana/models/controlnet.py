"""A Sana ControlNet: a trainable copy of the DiT's first N blocks that reads a control latent (e.g. the DC-AE
latent of an edge map) and returns one residual per block for the base DiT to add to its token stream.

The branch sees the same noisy latent, time and caption as the base. Its input tokens are
`patch_embed(x) + input_block(patch_embed(control))`; after each of its blocks a linear projection
(`controlnet_blocks[i]`) maps the tokens to a residual. `input_block` and the projections start at zero, so a
ControlNet made from a base model (`from_transformer`) returns exact zeros and leaves the base's image
unchanged until it is trained. The residuals go into `Conditioning.residuals`: the base adds residual k to
the output of its block k + 1 (sana/models/dit.py).

Parameter and config names are those of diffusers' `SanaControlNetModel`, so its folders load strictly here
and ours there. Its layers are the DiT's own (dit.py); like diffusers' model it has no q/k norm and no
guidance embedder, so a base with either (Sana-1.5, Sprint) has no ControlNet of this kind.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sana.config import ConfigError
from sana.models.dit import (
    CaptionProjection,
    DiTConfig,
    PatchEmbed,
    SanaBlock,
    SanaDiT,
    TimeEmbedding,
    drop_padding,
    mask_to_bias,
)
from sana.models.layers import RMSNorm
from sana.types import Conditioning

# The fields a ControlNet must share with the base it steers: the latent it reads (in_channels, patch_size),
# the caption states it projects (caption_channels) and the width of the residuals it adds (the heads x head
# width). Depth, MLP ratio and cross-attention widths are the ControlNet's own business.
SHARED_FIELDS = ("in_channels", "patch_size", "caption_channels", "num_attention_heads", "attention_head_dim")


@dataclass(frozen=True)
class ControlNetConfig:
    """Field names and defaults are those of diffusers' SanaControlNetModel config.json (1600M widths, 7 blocks;
    always pass a full config, or take one from a base with `from_dit`)."""

    in_channels: int = 32
    out_channels: int | None = 32
    num_attention_heads: int = 70
    attention_head_dim: int = 32
    num_layers: int = 7
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
    interpolation_scale: float | None = None

    def __post_init__(self) -> None:
        self.dit_config()  # the same width checks as the DiT's, as one-line ConfigErrors

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def dit_config(self) -> DiTConfig:
        """The DiTConfig whose blocks and embeddings this ControlNet's are (no q/k norm, no guidance embedder)."""
        return DiTConfig(**dataclasses.asdict(self))

    @classmethod
    def from_dit(cls, dit: DiTConfig, num_layers: int) -> ControlNetConfig:
        """The config of a ControlNet for base `dit` with `num_layers` blocks."""
        if dit.qk_norm is not None:
            raise ConfigError(f"qk_norm: a Sana ControlNet has no q/k norm, the base has {dit.qk_norm!r}")
        if dit.guidance_embeds:
            raise ConfigError("guidance_embeds: a Sana ControlNet has no guidance embedder, the base has one")
        if not 1 <= num_layers < dit.num_layers:
            raise ConfigError(
                f"num_layers: a ControlNet for a {dit.num_layers}-block base has 1 to {dit.num_layers - 1} "
                f"blocks, got {num_layers}"
            )
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_layers"}
        return cls(num_layers=num_layers, **{name: getattr(dit, name) for name in fields})

    def check_fits(self, dit: DiTConfig) -> None:
        """One-line ConfigError naming the first field in which this ControlNet cannot steer base `dit`."""
        for name in SHARED_FIELDS:
            mine, base = getattr(self, name), getattr(dit, name)
            if mine != base:
                raise ConfigError(
                    f"the ControlNet does not fit the base model: {name} is {mine}, the base's is {base}"
                )
        if self.num_layers >= dit.num_layers:
            raise ConfigError(
                f"the ControlNet does not fit the base model: num_layers is {self.num_layers}, it must be below "
                f"the base's {dit.num_layers} (block k's residual goes after base block k + 1)"
            )


class SanaControlNet(nn.Module):
    """forward(x (B, C_in, H, W), t (B,) or (), cond, control (B, C_in, H, W), scale) -> N residuals (B, N_tok, C).

    `t` and `cond` are what the base DiT gets at the same call; `control` is the control image's latent
    (DC-AE latent times its scaling factor). The residuals are multiplied by `scale` and are what
    `Conditioning.residuals` takes.
    """

    config_class = ControlNetConfig
    diffusers_class_name = "SanaControlNetModel"

    def __init__(self, config: ControlNetConfig) -> None:
        super().__init__()
        self.config = config
        dit = config.dit_config()
        dim = config.hidden_size
        self.patch_embed = PatchEmbed(dit)
        self.time_embed = TimeEmbedding(dim, guidance=False)
        self.caption_projection = CaptionProjection(config.caption_channels, dim)
        self.caption_norm = RMSNorm(dim, eps=1e-5)
        self.transformer_blocks = nn.ModuleList(SanaBlock(dit) for _ in range(config.num_layers))
        self.input_block = nn.Linear(dim, dim)
        self.controlnet_blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(config.num_layers))
        self.zero_projections()
        self.gradient_checkpointing = False

    @torch.no_grad()
    def zero_projections(self) -> None:
        """Zero the control input and every output projection: the ControlNet then adds exactly nothing."""
        for layer in [self.input_block, *self.controlnet_blocks]:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    @classmethod
    @torch.no_grad()
    def from_transformer(cls, dit: SanaDiT, num_layers: int) -> SanaControlNet:
        """A ControlNet for `dit` that starts as a copy of its patch, time and caption embeddings and of its first
        `num_layers` blocks, with zero control input and output projections (its residuals are exactly 0)."""
        config = ControlNetConfig.from_dit(dit.config, num_layers)
        param = next(dit.parameters())
        with torch.device(param.device):
            net = cls(config)
        for name in ("patch_embed", "time_embed", "caption_projection", "caption_norm"):
            getattr(net, name).load_state_dict(getattr(dit, name).state_dict(), strict=True)
        for mine, base in zip(net.transformer_blocks, dit.transformer_blocks, strict=False):
            mine.load_state_dict(base.state_dict(), strict=True)
        return net.to(param.dtype)

    def check_inputs(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, control: torch.Tensor) -> None:
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"latent must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if control.shape != x.shape:
            raise ValueError(
                f"control latent {tuple(control.shape)} must have the latent's shape {tuple(x.shape)}"
            )
        h, w = x.shape[-2:]
        if h % cfg.patch_size or w % cfg.patch_size:
            raise ValueError(f"latent size {h}x{w} is not a multiple of patch size {cfg.patch_size}")
        if cond.text.hidden.shape[-1] != cfg.caption_channels:
            raise ValueError(
                f"text embeddings have {cond.text.hidden.shape[-1]} channels, model expects {cfg.caption_channels}"
            )
        if len(cond) != x.shape[0] or t.shape not in ((x.shape[0],), ()):
            raise ValueError(f"batch mismatch: latent {x.shape[0]}, text {len(cond)}, timesteps {tuple(t.shape)}")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, control: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, ...]:
        """The residuals, one (B, N, C) tensor per block, already multiplied by `scale`.

        Of `cond` only the text is read: PAG's perturbation names blocks of the base, not of this copy, and a
        guidance value has no embedder here.
        """
        self.check_inputs(x, t, cond, control)
        b, _, height, width = x.shape
        p = self.config.patch_size
        hw = (height // p, width // p)
        t = t.expand(b) if t.ndim == 0 else t

        tokens = self.patch_embed(x)  # (B, N, C)
        dtype = tokens.dtype
        tokens = tokens + self.input_block(self.patch_embed(control.to(dtype)))
        _, t6 = self.time_embed(t, None, dtype)  # (B, 6C); the final-layer embedding is not needed here
        text = drop_padding(cond.text)
        context = self.caption_norm(self.caption_projection(text.hidden.to(dtype)))  # (B, L', C)
        bias = mask_to_bias(text.mask, dtype)  # (B, 1, 1, L')

        residuals = []
        for block, project in zip(self.transformer_blocks, self.controlnet_blocks, strict=True):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, context, bias, t6, hw, None, use_reentrant=False)
            else:
                tokens = block(tokens, context, bias, t6, hw)
            residuals.append(project(tokens) * scale)
        return tuple(residuals)
