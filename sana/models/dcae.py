"""DC-AE: the deep-compression autoencoder that maps images to Sana's latent space (Chen et al. 2024,
"Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models", arXiv:2410.10733).

The encoder is a stack of stages; every stage but the last ends in a 2x downsampling block, so an image of
side S becomes a latent of side S / 2**(stages - 1). Early stages are convolutional residual blocks, late
stages EfficientViT blocks (multi-scale ReLU linear attention + a gated MBConv). The decoder mirrors it.
Both resampling steps add a parameter-free "space-to-channel" shortcut (pixel-unshuffle and channel
averaging down; channel repetition and pixel-shuffle up), which is what lets the network reach 32x
compression without the residual path losing the signal.

Parameter names equal those of the published diffusers checkpoints (`AutoencoderDC`), so a state dict loads
strictly in either direction. The model owns its latent normalisation: `encode` returns latents already
multiplied by `scaling_factor` and `decode` divides it out, so no caller ever sees that number.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from sana.config import ConfigError
from sana.models.dcae_blocks import (
    NORM_EPS,
    ChannelRMSNorm,
    DownBlock,
    EfficientViTBlock,
    ResBlock,
    UpBlock,
    make_act,
)
from sana.models.layers import RMSNorm

BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
NORM_TYPES = ("rms_norm", "batch_norm")
ACTIVATIONS = ("silu", "swish", "relu", "gelu", "mish")
# The published configs spell the strided-conv downsampler "Conv"; diffusers treats every value other than
# "pixel_unshuffle" that way, we accept only the names that occur.
DOWNSAMPLE_TYPES = ("pixel_unshuffle", "Conv", "conv")
UPSAMPLE_TYPES = ("pixel_shuffle", "interpolate")

# ----------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DCAEConfig:
    """Field names and defaults are those of diffusers' `AutoencoderDC` config.json, so a file that omits a
    key means the same model in both. Block types, decoder norms and decoder activations are one name for
    every stage or a tuple with one name per stage; `*_qkv_multiscales` holds, per stage, the kernel sizes
    of the multi-scale attention branches (ignored by ResBlock stages)."""

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: str | tuple[str, ...] = "ResBlock"
    decoder_block_types: str | tuple[str, ...] = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: str | tuple[str, ...] = "rms_norm"
    decoder_act_fns: str | tuple[str, ...] = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        # Lists passed by hand become tuples, so configs stay hashable like those read from JSON.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list | tuple):
                object.__setattr__(self, f.name, tuple(tuple(v) if isinstance(v, list) else v for v in value))
        for name in ("in_channels", "latent_channels", "attention_head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"DCAEConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        if not (isinstance(self.scaling_factor, int | float) and math.isfinite(self.scaling_factor)):
            raise ConfigError(f"DCAEConfig.scaling_factor must be a finite number, got {self.scaling_factor!r}")
        if self.scaling_factor <= 0:
            raise ConfigError(f"DCAEConfig.scaling_factor must be > 0, got {self.scaling_factor}")
        _check_choice("downsample_block_type", self.downsample_block_type, DOWNSAMPLE_TYPES)
        _check_choice("upsample_block_type", self.upsample_block_type, UPSAMPLE_TYPES)
        _check_choice("decoder_conv_act_fn", self.decoder_conv_act_fn, ACTIVATIONS)
        if len(self.encoder_block_out_channels) != len(self.decoder_block_out_channels):
            raise ConfigError(
                f"encoder and decoder need the same number of stages (same compression); got "
                f"{len(self.encoder_block_out_channels)} and {len(self.decoder_block_out_channels)}"
            )
        for side in ("encoder", "decoder"):
            self._check_side(side)
        self._check_resampling()

    @property
    def num_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def spatial_compression(self) -> int:
        """Image side / latent side: every stage but the last halves the resolution."""
        return 2 ** (self.num_stages - 1)

    def stage_block_types(self, side: str) -> tuple[str, ...]:
        return _per_stage(getattr(self, f"{side}_block_types"), self.num_stages)

    def decoder_stage_norms(self) -> tuple[str, ...]:
        return _per_stage(self.decoder_norm_types, self.num_stages)

    def decoder_stage_acts(self) -> tuple[str, ...]:
        return _per_stage(self.decoder_act_fns, self.num_stages)

    def _check_side(self, side: str) -> None:
        n = self.num_stages
        channels = getattr(self, f"{side}_block_out_channels")
        layers = getattr(self, f"{side}_layers_per_block")
        scales = getattr(self, f"{side}_qkv_multiscales")
        if n < 1:
            raise ConfigError(f"DCAEConfig.{side}_block_out_channels is empty")
        per_stage = [f"{side}_layers_per_block", f"{side}_qkv_multiscales", f"{side}_block_types"]
        if side == "decoder":
            per_stage += ["decoder_norm_types", "decoder_act_fns"]
        for name in per_stage:
            value = getattr(self, name)
            if not isinstance(value, str) and len(value) != n:
                raise ConfigError(
                    f"DCAEConfig.{name} has {len(value)} entries but {side}_block_out_channels has {n} stages"
                )
        if any(not isinstance(c, int) or c < 1 for c in channels):
            raise ConfigError(f"DCAEConfig.{side}_block_out_channels must be positive ints, got {channels}")
        if any(not isinstance(k, int) or k < 0 for k in layers):
            raise ConfigError(f"DCAEConfig.{side}_layers_per_block must be non-negative ints, got {layers}")
        # A stage without layers also loses its resampling step in this architecture, so only the first stage
        # (whose resampling moves into conv_in / conv_out) and the last (which has none) may be empty.
        if any(k == 0 for k in layers[1:-1]) or (layers[0] == 0 and n < 2):
            raise ConfigError(
                f"DCAEConfig.{side}_layers_per_block={layers}: only the first stage (of two or more) and the last "
                "stage may have zero layers"
            )
        types = self.stage_block_types(side)
        for t in types:
            _check_choice(f"{side}_block_types", t, BLOCK_TYPES)
        if side == "decoder":
            for t in self.decoder_stage_norms():
                _check_choice("decoder_norm_types", t, NORM_TYPES)
            for t in self.decoder_stage_acts():
                _check_choice("decoder_act_fns", t, ACTIVATIONS)
        for i, (kind, width, kernels) in enumerate(zip(types, channels, scales, strict=True)):
            if kind != "EfficientViTBlock":
                continue
            if width % self.attention_head_dim:
                raise ConfigError(
                    f"{side} stage {i}: {width} channels are not divisible by attention_head_dim="
                    f"{self.attention_head_dim}"
                )
            if any(not isinstance(k, int) or k < 1 or k % 2 == 0 for k in kernels):
                raise ConfigError(f"{side}_qkv_multiscales[{i}]={kernels}: kernel sizes must be odd positive ints")

    def _check_resampling(self) -> None:
        """The channel-averaging / channel-repeating shortcuts need whole group sizes."""
        enc, dec = self.encoder_block_out_channels, self.decoder_block_out_channels
        for i in range(self.num_stages - 1):
            c_in, c_out = enc[i], enc[i + 1]
            if self.encoder_layers_per_block[i] > 0 and (4 * c_in) % c_out:
                raise ConfigError(f"encoder stage {i}->{i + 1}: 4*{c_in} channels cannot be averaged into {c_out}")
            if self.downsample_block_type == "pixel_unshuffle" and c_out % 4:
                raise ConfigError(f"encoder stage {i + 1}: pixel_unshuffle downsampling needs channels % 4 == 0")
            c_in, c_out = dec[i + 1], dec[i]
            if self.decoder_layers_per_block[i] > 0 and (4 * c_out) % c_in:
                raise ConfigError(f"decoder stage {i + 1}->{i}: {c_in} channels cannot be repeated into 4*{c_out}")
        if self.encoder_out_shortcut and enc[-1] % self.latent_channels:
            raise ConfigError(f"encoder_out_shortcut needs {enc[-1]} channels divisible by latent_channels")
        if self.decoder_in_shortcut and dec[-1] % self.latent_channels:
            raise ConfigError(f"decoder_in_shortcut needs {dec[-1]} channels divisible by latent_channels")


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"DCAEConfig.{name}: unsupported value {value!r}; expected one of {', '.join(allowed)}")


def _per_stage(value: str | tuple[str, ...], n: int) -> tuple[str, ...]:
    return (value,) * n if isinstance(value, str) else tuple(value)


# --------------------------------------------------- encoder and decoder (their blocks: dcae_blocks.py)


def _make_block(
    kind: str, channels: int, config: DCAEConfig, norm: str, act: str, kernels: tuple[int, ...]
) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(channels, norm, act)
    return EfficientViTBlock(channels, config.attention_head_dim, norm, kernels)


class Encoder(nn.Module):
    """conv_in -> stages (blocks, then a DownBlock except after the last) -> conv_out + channel-mean shortcut."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        channels, layers = config.encoder_block_out_channels, config.encoder_layers_per_block
        pixel_unshuffle = config.downsample_block_type == "pixel_unshuffle"
        if layers[0] > 0:
            self.conv_in = nn.Conv2d(config.in_channels, channels[0], 3, padding=1)
        else:  # an empty first stage: its downsampling moves into the stem
            self.conv_in = DownBlock(config.in_channels, channels[1], pixel_unshuffle, shortcut=False)
        types, n = config.stage_block_types("encoder"), config.num_stages
        stages = []
        for i in range(n):
            kernels = config.encoder_qkv_multiscales[i]
            stage = [
                _make_block(types[i], channels[i], config, "rms_norm", "silu", kernels) for _ in range(layers[i])
            ]
            if i < n - 1 and layers[i] > 0:
                stage.append(DownBlock(channels[i], channels[i + 1], pixel_unshuffle))
            stages.append(nn.Sequential(*stage))
        self.down_blocks = nn.ModuleList(stages)
        self.conv_out = nn.Conv2d(channels[-1], config.latent_channels, 3, padding=1)
        self.out_shortcut = config.encoder_out_shortcut
        self.out_group = channels[-1] // config.latent_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down_blocks:
            h = stage(h)  # resolution halves after every stage but the last
        z = self.conv_out(h)  # (B, C_lat, H/f, W/f)
        if self.out_shortcut:
            z = z + h.unflatten(1, (-1, self.out_group)).mean(2)  # mean of consecutive channel groups
        return z


class Decoder(nn.Module):
    """conv_in + channel-repeat shortcut -> stages from deepest to shallowest (UpBlock, then blocks) ->
    RMSNorm -> activation -> conv_out. Stage i lives at `up_blocks[i]`, so the deepest runs first."""

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        channels, layers, n = config.decoder_block_out_channels, config.decoder_layers_per_block, config.num_stages
        interpolate = config.upsample_block_type == "interpolate"
        self.conv_in = nn.Conv2d(config.latent_channels, channels[-1], 3, padding=1)
        self.in_shortcut = config.decoder_in_shortcut
        self.in_repeats = channels[-1] // config.latent_channels
        types, norms, acts = (
            config.stage_block_types("decoder"),
            config.decoder_stage_norms(),
            config.decoder_stage_acts(),
        )
        stages = []
        for i in range(n):
            stage = [UpBlock(channels[i + 1], channels[i], interpolate)] if i < n - 1 and layers[i] > 0 else []
            kernels = config.decoder_qkv_multiscales[i]
            stage += [
                _make_block(types[i], channels[i], config, norms[i], acts[i], kernels) for _ in range(layers[i])
            ]
            stages.append(nn.Sequential(*stage))
        self.up_blocks = nn.ModuleList(stages)
        head = channels[0] if layers[0] > 0 else channels[1]
        self.norm_out = ChannelRMSNorm(head, eps=NORM_EPS, bias=True)
        self.conv_act = make_act(config.decoder_conv_act_fn)
        if layers[0] > 0:
            self.conv_out = nn.Conv2d(head, config.in_channels, 3, padding=1)
        else:  # an empty first stage: its upsampling moves into the head
            self.conv_out = UpBlock(head, config.in_channels, interpolate, shortcut=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        # Channels-last throughout: oneDNN runs the 3x3 convs on NHWC without reordering to its blocked layout
        # and back around every call (about 10% of a CPU decode), the norms reduce over the contiguous channel
        # dim, and the attention's channel-mixing matmuls need no transposed copy. The memory format propagates
        # from this first conv through every later layer.
        h = self.conv_in(z.contiguous(memory_format=torch.channels_last))  # (B, C_last, h, w)
        if self.in_shortcut:
            h = h + z.repeat_interleave(self.in_repeats, dim=1)
        for stage in reversed(self.up_blocks):
            h = stage(h)  # resolution doubles at the start of every stage but the deepest
        return self.conv_out(self.conv_act(self.norm_out(h))).contiguous()  # (B, 3, H, W), NCHW again


# ----------------------------------------------------------------------------------------------- model


class DCAE(nn.Module):
    """Image <-> normalised latent. `encode` takes (B, 3, H, W) in [-1, 1] with H and W multiples of
    `config.spatial_compression` and returns (B, latent_channels, H/f, W/f) already multiplied by
    `scaling_factor`; `decode` inverts both. Nothing outside this class applies the scaling factor."""

    config_class = DCAEConfig
    diffusers_class_name = "AutoencoderDC"

    def __init__(self, config: DCAEConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def init_weights(self) -> None:
        """Every layer at PyTorch's default init (which is also what construction gives, so call this only
        after materialising a meta-built model with `to_empty`): convs and linears Kaiming-uniform
        (a = sqrt(5)) with uniform biases, norms scale 1 and bias 0, BatchNorm running stats reset. The
        residual structure with a norm at the end of every branch keeps activations bounded without
        special scaling."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear | nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) image in [-1, 1] -> (B, C_lat, H/f, W/f) normalised latent."""
        f, c = self.config.spatial_compression, self.config.in_channels
        if image.ndim != 4 or image.shape[1] != c:
            raise ValueError(f"DCAE.encode expects a (B, {c}, H, W) image, got shape {tuple(image.shape)}")
        if image.shape[2] % f or image.shape[3] % f:
            raise ValueError(
                f"DCAE.encode: image size {image.shape[2]}x{image.shape[3]} is not a multiple of the spatial "
                f"compression {f}"
            )
        return self.encoder(image) * self.config.scaling_factor

    def decode(self, latent: torch.Tensor, tile: int | None = None) -> torch.Tensor:
        """(B, C_lat, h, w) normalised latent -> (B, C_in, h*f, w*f) image, nominally in [-1, 1].

        tile: decode in tiles of about tile x tile latents (`sana.models.dcae_tiling`): the same image up to
        float rounding, with memory bounded by one tile plus the output instead of the image area. Inference
        only. None: one pass over the whole latent.
        """
        c = self.config.latent_channels
        if latent.ndim != 4 or latent.shape[1] != c:
            raise ValueError(f"DCAE.decode expects a (B, {c}, h, w) latent, got shape {tuple(latent.shape)}")
        z = latent / self.config.scaling_factor
        if tile is None:
            return self.decoder(z)
        from sana.models.dcae_tiling import tiled_decode  # lazy: that module builds on this one's blocks

        return tiled_decode(self.decoder, z, tile=tile)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Reconstruction: decode(encode(image))."""
        return self.decode(self.encode(image))


# ----------------------------------------------------------------------------------------------- presets

_SANA_F32C32_STAGES = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
_SANA_F32C32_WIDTHS = (128, 256, 512, 512, 1024, 1024)
_SANA_F32C32_SCALES = ((), (), (), (5,), (5,), (5,))

DCAE_PRESETS: dict[str, DCAEConfig] = {
    # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers: 32x compression, 32 latent channels, 312,250,275 params.
    "dc-ae-f32c32-sana-1.0": DCAEConfig(
        in_channels=3,
        latent_channels=32,
        attention_head_dim=32,
        encoder_block_types=_SANA_F32C32_STAGES,
        decoder_block_types=_SANA_F32C32_STAGES,
        encoder_block_out_channels=_SANA_F32C32_WIDTHS,
        decoder_block_out_channels=_SANA_F32C32_WIDTHS,
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=_SANA_F32C32_SCALES,
        decoder_qkv_multiscales=_SANA_F32C32_SCALES,
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        encoder_out_shortcut=True,
        decoder_in_shortcut=True,
        decoder_conv_act_fn="relu",
        scaling_factor=0.41407,
    ),
    # Same family at test size: 4x compression, both block kinds, one attention stage at each end.
    "tiny": DCAEConfig(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 32),
        decoder_block_out_channels=(8, 16, 32),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 2),
        encoder_qkv_multiscales=((), (5,), (5,)),
        decoder_qkv_multiscales=((), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",
        scaling_factor=0.5,
    ),
}
