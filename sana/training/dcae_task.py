"""task: dcae. Train a DC-AE autoencoder (sana.models.dcae) on raw images with the shared loop.

    run_dir: runs/shapes-dcae
    max_steps: 20000
    task: dcae
    model: {preset: shapes-f32c32}           # or {config: {...DCAEConfig fields}}, or {pretrained: vae folder}
                                             # (+ decoder_only: true, to sharpen a decoder, latents unchanged)
    data: {path: data/shapes, resolution: 256, batch_size: 16, buckets: false}   # sana.data.DataConfig
    loss:
      reconstruction: l1                     # or mse; in [-1, 1] pixel space
      perceptual: {enabled: false, weight: 0.1, network: random}
      adversarial: {enabled: false, weight: 0.05, start_step: 5000}
    scaling_samples: 256

The objective, per image batch x in [-1, 1]:

    x_hat = decoder(encoder(x))                                  the raw latent: the scaling factor cancels
    loss  = rec(x_hat, x)                                        mean |x_hat - x| (l1) or (x_hat - x)^2 (mse)
          + w_p * perceptual(x_hat, x)                           optional, off by default
          + w_g * -mean D(x_hat)                                 optional, off by default, from start_step on
    D:      0.5 * mean relu(1 - D(x)) + 0.5 * mean relu(1 + D(sg(x_hat)))   the hinge loss (Lim & Ye 2017)

The perceptual distance compares unit-normalised activations of a frozen network, LPIPS-style (Zhang et al.
2018) but without learned layer weights: by default a small fixed *random* conv net (nothing downloaded; random
features are a weak but real texture prior), or any module named as "package.module:factory". The
discriminator is a PatchGAN (Isola et al. 2017, arXiv:1611.07004). It trains from the first step whenever the
adversarial term is enabled (learning real images from reconstructions meanwhile, so it is a useful critic
by start_step); `start_step` only delays when the autoencoder feels it. Both networks are one module
(`AutoencoderTrainer`), so one optimizer, one checkpoint and one EMA cover them, and the generator term reads
the discriminator through detached weights, so each loss moves only its own network.

The latent scale. After training, `scaling_samples` images from the data are encoded and the exported
config.json gets `scaling_factor = 1 / std(raw latents)` (the std over every latent element), so
`DCAE.encode` returns latents of unit standard deviation, the scale the DiT's noise assumes. The mean is
logged but not removed (DCAEConfig has no shift, like the published DC-AE).

Decoder-only fine-tuning (`model.decoder_only: true`, with `model.pretrained`). The encoder is frozen (and run
without gradients), so the latent space, and the scaling_factor, which is kept rather than measured again,
stay exactly those of the pretrained autoencoder: every latent cache and every DiT trained on it stays valid,
and a decoder can go on learning sharper reconstructions after the DiT has been trained (as Stable Diffusion's
ft-MSE decoder did).

Export: `RUN/final/vae/`, a diffusers-layout folder (config.json + safetensors via sana.weights.save_model)
that both `sana.weights.load_model(DCAE, ...)` and diffusers' `AutoencoderDC.from_pretrained` read.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from sana.config import ConfigError
from sana.models.dcae import DCAE, DCAE_PRESETS, DCAEConfig
from sana.training.config import RunConfig, _check
from sana.training.task import (
    DataSource,
    LossOutput,
    Run,
    Task,
    open_data,
    publish_folder,
    sub_state,
    temporary_folder,
    trained_weights,
)
from sana.weights import load_model, parse_dtype, save_model

# ------------------------------------------------------------------------------------------------ presets

# The autoencoder of the shipped flat-shapes model: 32x compression, 32 latent channels (256^2 -> 8x8x32), the
# published f32c32 layout (3 convolutional stages, then 3 linear-attention stages; strided-conv down,
# interpolating up) at widths 8..128 instead of 128..1024, one block per stage and none at full resolution
# (as in the published dc-ae-f32c32-in-1.0): 2.0M parameters, 1.8 s per training step of 8 images on one CPU
# core, 35% less than with a full-resolution block. Enough for flat-coloured shapes. scaling_factor is set from
# the data after training.
_SHAPES_WIDTHS = (8, 16, 32, 64, 128, 128)
SHAPES_F32C32 = DCAEConfig(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=_SHAPES_WIDTHS,
    decoder_block_out_channels=_SHAPES_WIDTHS,
    encoder_layers_per_block=(0, 1, 1, 1, 1, 1),
    decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    scaling_factor=1.0,
)

# Names `model.preset` accepts besides sana.models.dcae.DCAE_PRESETS.
TASK_PRESETS: dict[str, DCAEConfig] = {"shapes-f32c32": SHAPES_F32C32}


def preset_names() -> list[str]:
    return [*DCAE_PRESETS, *TASK_PRESETS]


# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class AutoencoderModelConfig:
    """The autoencoder to train: set exactly one of `preset` (a DCAE_PRESETS or TASK_PRESETS name, with
    optional `overrides` of DCAEConfig fields), `config` (every DCAEConfig field inline; omitted ones take
    DCAEConfig's defaults) or `pretrained` (a vae folder, or a model folder holding `vae/`, to fine-tune)."""

    preset: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] | None = None
    pretrained: str | None = None
    decoder_only: bool = False  # train the decoder alone: the latents stay the pretrained encoder's
    dtype: Literal["fp32", "bf16"] = "fp32"  # master weights

    def __post_init__(self) -> None:
        chosen = [n for n in ("preset", "config", "pretrained") if getattr(self, n) is not None]
        _check(len(chosen) == 1, "model: set exactly one of model.preset, model.config or model.pretrained")
        _check(not self.decoder_only or self.pretrained is not None, "model.decoder_only needs model.pretrained")
        _check(not self.overrides or self.preset is not None, "model.overrides only applies to model.preset")
        if self.pretrained is None:
            self.dcae_config()  # a bad preset name or field fails at load time, with its dotted key

    def dcae_config(self) -> DCAEConfig:
        """The DCAEConfig of a preset or inline config (not of a pretrained folder: that has its own)."""
        if self.config is not None:
            return _dcae_config(None, self.config, "model.config")
        presets = {**DCAE_PRESETS, **TASK_PRESETS}
        if self.preset not in presets:
            raise ConfigError(f"model.preset {self.preset!r} is not one of {', '.join(preset_names())}")
        return _dcae_config(presets[self.preset], self.overrides, "model.overrides")


def _dcae_config(base: DCAEConfig | None, values: dict[str, Any], where: str) -> DCAEConfig:
    known = [f.name for f in dataclasses.fields(DCAEConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            raise ConfigError(
                f"unknown key {where}.{key}" + (f" (did you mean {where}.{close[0]}?)" if close else "")
            )
    try:
        return DCAEConfig(**values) if base is None else dataclasses.replace(base, **values)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


@dataclass(frozen=True)
class PerceptualConfig:
    """An LPIPS-style distance between activations of a frozen network. network: "random" (a fixed random conv
    net of widths `channels`, seeded by `seed`) or "package.module:factory", a callable returning an nn.Module
    that maps (B, 3, H, W) images in [-1, 1] to a tensor or a list of (B, C, h, w) feature maps."""

    enabled: bool = False
    weight: float = 0.1
    network: str = "random"
    channels: tuple[int, ...] = (32, 64, 128)
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "loss.perceptual.weight must be >= 0")
        _check(bool(self.channels) and all(c >= 1 for c in self.channels), "loss.perceptual.channels: widths >= 1")
        _check(
            self.network == "random" or ":" in self.network, 'loss.perceptual.network: "random" or "module:name"'
        )


@dataclass(frozen=True)
class AdversarialConfig:
    """A PatchGAN discriminator with the hinge loss: `layers` stride-2 convolutions from `channels` wide."""

    enabled: bool = False
    weight: float = 0.05
    start_step: int = 0  # the autoencoder feels the term from this optimizer step on (0, 1: from the start)
    channels: int = 64
    layers: int = 3

    def __post_init__(self) -> None:
        _check(self.weight >= 0, "loss.adversarial.weight must be >= 0")
        _check(self.start_step >= 0, "loss.adversarial.start_step must be >= 0")
        _check(self.channels >= 1 and self.layers >= 1, "loss.adversarial: channels and layers must be >= 1")


@dataclass(frozen=True)
class AutoencoderLossConfig:
    reconstruction: Literal["l1", "mse"] = "l1"
    perceptual: PerceptualConfig = field(default_factory=PerceptualConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass(frozen=True, kw_only=True)
class DCAETrainConfig(RunConfig):
    """task: dcae. `data` is a sana.data.DataConfig (its captions are ignored)."""

    task: Literal["dcae"] = "dcae"
    model: AutoencoderModelConfig
    data: Any = field(default=None, metadata={"parse": "data"})  # sana.data.DataConfig
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    scaling_samples: int = 256  # images encoded after training to set scaling_factor (unit-std latents)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.scaling_samples >= 1, "scaling_samples must be >= 1")
        _check(self.distributed.strategy == "ddp", "distributed.strategy: task dcae supports ddp only")


# ------------------------------------------------------------------------------------------ loss networks


class RandomFeatures(nn.Module):
    """A frozen random conv net (3x3 stride-2 convolutions with ReLU, He-initialised from `seed`) whose
    activations at every stage serve as perceptual features."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128), seed: int = 0) -> None:
        super().__init__()
        widths = (3, *channels)
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for conv in self.convs:
                fan_in = conv.in_channels * 9
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * math.sqrt(2 / fan_in))
                conv.bias.zero_()
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for conv in self.convs:
            x = F.relu(conv(x))  # (B, C_i, H / 2^i, W / 2^i)
            features.append(x)
        return features


def perceptual_distance(network: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over feature maps of the squared distance between channel-unit-normalised activations (LPIPS's
    normalisation, unit weights), averaged over positions."""
    fa, fb = network(a), network(b)
    fa, fb = ([fa], [fb]) if isinstance(fa, torch.Tensor) else (fa, fb)
    total = a.new_zeros((), dtype=torch.float32)
    for x, y in zip(fa, fb, strict=True):
        x = F.normalize(x.float(), dim=1, eps=1e-10)  # (B, C, h, w), unit length per position
        y = F.normalize(y.float(), dim=1, eps=1e-10)
        total = total + (x - y).square().sum(1).mean()
    return total / len(fa)


def build_perceptual(cfg: PerceptualConfig) -> nn.Module:
    if cfg.network == "random":
        return RandomFeatures(cfg.channels, cfg.seed)
    module, _, name = cfg.network.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"loss.perceptual.network {cfg.network!r}: {e}") from None
    return factory().requires_grad_(False).eval()


class PatchDiscriminator(nn.Module):
    """PatchGAN: a map of real/fake logits, one per overlapping image patch (receptive field 70 px with the
    default 3 layers). GroupNorm instead of pix2pix's BatchNorm: statistics per sample, so a rank's batch,
    real and fake alike, never mixes into another's."""

    def __init__(self, channels: int = 64, layers: int = 3, in_channels: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1  # the last block keeps the resolution, as in pix2pix
            blocks += [
                nn.Conv2d(width, out, 4, stride=stride, padding=1, bias=False),
                nn.GroupNorm(math.gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            width = out
        blocks.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*blocks)
        self.init_weights()

    def init_weights(self) -> None:
        """N(0, 0.02) convolutions and zero biases (pix2pix), GroupNorm at scale 1 and shift 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h, w) logits


def hinge_discriminator_loss(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator (Lim & Ye 2017, "Geometric GAN", arXiv:1705.02894)."""
    return 0.5 * (F.relu(1 - real.float()).mean() + F.relu(1 + fake.float()).mean())


# ------------------------------------------------------------------------------------------------ trained


class AutoencoderTrainer(nn.Module):
    """What the dcae task trains (and checkpoints): `vae` and, with the adversarial term on, `discriminator`.

    forward(images, adversarial) -> (reconstruction, generator term or None, discriminator loss or None).
    Everything that touches a trained weight runs here, inside the (possibly DDP-wrapped) forward; the
    reconstruction and perceptual terms are computed by the task from the returned reconstruction.
    """

    def __init__(self, vae: DCAE, discriminator: PatchDiscriminator | None = None) -> None:
        super().__init__()
        self.vae = vae
        self.discriminator = discriminator

    def forward(
        self, images: torch.Tensor, adversarial: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        train_encoder = any(p.requires_grad for p in self.vae.encoder.parameters())
        with torch.set_grad_enabled(train_encoder and torch.is_grad_enabled()):
            latent = self.vae.encoder(images)  # (B, C_lat, H/f, W/f), raw: decode(encode(x)) cancels the scale
        recon = self.vae.decoder(latent)  # (B, 3, H, W)
        if self.discriminator is None:
            return recon, None, None
        d = self.discriminator
        disc = hinge_discriminator_loss(d(images), d(recon.detach()))
        if not adversarial:
            return recon, None, disc
        # The generator term through detached discriminator weights: its gradient reaches the autoencoder only.
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        generator = -torch.func.functional_call(d, frozen, (recon,)).float().mean()
        return recon, generator, disc


@dataclass(frozen=True)
class ImageBatch:
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], on the device
    adversarial: bool  # whether the autoencoder feels the adversarial term at this step


def reconstruction_loss(recon: torch.Tensor, images: torch.Tensor, kind: str) -> torch.Tensor:
    diff = recon.float() - images.float()
    return diff.abs().mean() if kind == "l1" else diff.square().mean()


# ------------------------------------------------------------------------------------------------- task


class DCAETask(Task):
    cfg: DCAETrainConfig

    def __init__(self, cfg: DCAETrainConfig, ctx: Any, resume: Path | None = None) -> None:
        super().__init__(cfg, ctx, resume)
        self.data: DataSource | None = None
        self.perceptual: nn.Module | None = None
        self.vae_config: DCAEConfig | None = None

    def build_data(self, data: DataSource | None) -> Any:
        self.data = data  # kept: the latent scale is measured on a fresh pass over the same data at the end
        return super().build_data(data)

    def build_model(self) -> AutoencoderTrainer:
        m, adv = self.cfg.model, self.cfg.loss.adversarial
        with torch.random.fork_rng(devices=[]):  # identical on every rank, the global RNG untouched
            torch.manual_seed(self.cfg.seed)
            if m.pretrained is not None:
                folder = Path(m.pretrained)
                vae = load_model(DCAE, folder / "vae" if (folder / "vae").is_dir() else folder)
            else:
                vae = DCAE(m.dcae_config())
                vae.init_weights()
            discriminator = PatchDiscriminator(adv.channels, adv.layers) if adv.enabled else None
        self.vae_config = vae.config
        model = AutoencoderTrainer(vae, discriminator).to(parse_dtype(m.dtype)).train().requires_grad_(True)
        if m.decoder_only:
            model.vae.encoder.requires_grad_(False)
        return model

    def describe(self) -> str:
        m, loss = self.cfg.model, self.cfg.loss
        where = f"fine-tuning {m.pretrained}" if m.pretrained else f"from scratch ({m.preset or 'inline config'})"
        where = f"{where}, decoder only" if m.decoder_only else where
        where = f"resumed from {self.resume}" if self.resume else where
        terms = [loss.reconstruction] + [n for n in ("perceptual", "adversarial") if getattr(loss, n).enabled]
        return f"{where}, loss {' + '.join(terms)}"

    def start(self, run: Run) -> None:
        p = self.cfg.loss.perceptual
        if p.enabled:
            self.perceptual = build_perceptual(p).to(self.ctx.device)

    def micro_batch(self, batch: dict[str, Any], step: int, micro: int) -> ImageBatch:
        if "images" not in batch:
            raise ValueError(f"task dcae trains on raw image batches ('images'); got keys {sorted(batch)}")
        images = batch["images"].to(self.ctx.device, torch.float32)  # (B, 3, H, W)
        return ImageBatch(images, adversarial=step >= self.cfg.loss.adversarial.start_step)

    def batch_size(self, micro_batch: ImageBatch) -> int:
        return micro_batch.images.shape[0]

    def loss(self, model: nn.Module, micro_batch: ImageBatch, dtype: torch.dtype) -> LossOutput:
        loss = self.cfg.loss
        images = micro_batch.images.to(dtype)
        recon, generator, disc = model(images, micro_batch.adversarial)
        rec = reconstruction_loss(recon, images, loss.reconstruction)
        objective, metrics = rec, {"loss": rec.detach()}
        if self.perceptual is not None:
            p = perceptual_distance(self.perceptual, recon, images)
            objective = objective + loss.perceptual.weight * p
            metrics["perceptual"] = p.detach()
        if disc is not None:
            objective = objective + disc
            metrics["disc"] = disc.detach()
        if generator is not None:
            objective = objective + loss.adversarial.weight * generator
            metrics["adversarial"] = generator.detach()
        return objective, metrics

    def export(self, run: Run) -> dict[str, Path | None]:
        weights = trained_weights(run.core, run.ema, self.cfg.checkpoint.export_ema)
        if not self.ctx.is_main:
            return {"final_model": None}
        vae = vae_with(self.vae_config, sub_state(weights, "vae"), self.ctx.device)
        if self.cfg.model.decoder_only:  # the pretrained encoder, so its latents and their scale, unchanged
            scale = f"scaling_factor {self.vae_config.scaling_factor:.6g} kept (decoder only)"
        else:
            std, mean = latent_statistics(vae, self.scaling_batches(), self.cfg.scaling_samples)
            vae = vae_with(dataclasses.replace(self.vae_config, scaling_factor=1.0 / std), vae.state_dict(), "cpu")
            scale = f"raw latent std {std:.4g}, mean {mean:.3g}: scaling_factor {1.0 / std:.6g}"
        final = Path(self.cfg.run_dir) / "final"
        tmp = temporary_folder(final)
        save_model(vae.cpu(), tmp / "vae")
        publish_folder(tmp, final)
        run.logger.info(f"final autoencoder -> {final / 'vae'} ({scale})")
        return {"final_model": final}

    def scaling_batches(self) -> Any:
        """A fresh single-process pass over the training data, for the latent statistics."""
        return open_data(self.cfg, self.data, rank=0, world_size=1)


def vae_with(config: DCAEConfig, weights: dict[str, torch.Tensor], device: torch.device | str) -> DCAE:
    """A float32 eval-mode DCAE holding `weights`."""
    with torch.device("meta"):
        vae = DCAE(config)
    vae.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    return vae.to(device).eval()


@torch.no_grad()
def latent_statistics(vae: DCAE, batches: Any, samples: int) -> tuple[float, float]:
    """(std, mean) over every element of the raw latents (no scaling factor) of `samples` images, or of one
    pass when the data holds fewer."""
    available = getattr(batches, "num_samples", None)
    target = min(samples, available) if available else samples
    device = next(vae.parameters()).device
    total = squares = count = 0.0
    seen = 0
    for batch in batches:
        images = batch["images"][: target - seen].to(device, torch.float32)
        z = vae.encoder(images).double()  # (B, C_lat, h, w)
        total, squares, count = total + z.sum().item(), squares + z.square().sum().item(), count + z.numel()
        seen += images.shape[0]
        if seen >= target:
            break
    if count == 0:
        raise ValueError("the data source yielded no images to measure the latent scale on")
    mean = total / count
    std = math.sqrt(max(squares / count - mean * mean, 0.0))
    if not std > 0:
        raise ValueError("the raw latents have zero variance: cannot set a scaling factor")
    return std, mean


CONFIG = DCAETrainConfig  # the registry's names for this module's pieces (sana/training/tasks.py)
TASK = DCAETask
