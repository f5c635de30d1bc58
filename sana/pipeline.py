"""Text to image: prompt -> text encoder -> (DiT velocity + guidance) -> sampler -> DC-AE -> PIL images.

`SanaPipeline` holds the three models and a `SchedulerSpec` and nothing else: every call builds its own
noise, embeddings and closures, so calls never influence each other (a server can share one instance).
With the same inputs it reproduces the reference diffusers pipeline: the same initial noise for a seed
(float32 CPU `torch.randn`), lower-cased prompts, the published aspect-ratio buckets, and the model seeing
the same timesteps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from sana.aspect_ratios import TABLES_BY_RESOLUTION, nearest_bucket, resize_and_center_crop
from sana.images import to_pil
from sana.models.dcae import DCAE
from sana.models.dcae_tiling import DEFAULT_TILE, check_tile
from sana.models.dit import AttentionPerturbation, SanaDiT
from sana.models.text_encoder import TextEncoder
from sana.pretrained import MODEL_INSTRUCTION, InstructionChoice, SchedulerSpec, load_components
from sana.samplers import SAMPLERS, Callback
from sana.samplers.guidance import batched_guidance, classifier_free_guidance, uses_guidance
from sana.samplers.schedules import dpm_flow_sigmas, euler_flow_sigmas, model_timesteps, scm_timesteps
from sana.types import TextEmbeddings, VelocityFn

SIZE_MULTIPLE = 32  # what the reference accepts; also a multiple of every DC-AE compression we ship

# Automatic tiled decoding (vae_tile="auto"): images with a side above this many pixels are decoded in tiles of
# DEFAULT_TILE latents (768 px with the 32x DC-AE). Tiling gives the same image up to float rounding and
# bounds the decoder's memory by a tile instead of the image area (an untiled 4096x4096 decode needs tens of
# GB); below the threshold one untiled pass is a little faster.
AUTO_TILE_ABOVE_PX = 2048


def vae_tile_for(vae_tile: int | str | None, height: int, width: int) -> int | None:
    """The DC-AE tile size (latents) to decode a height x width image with, or None for one pass.

    vae_tile: "auto" (tile only above AUTO_TILE_ABOVE_PX on either side), None (never tile) or a tile size.
    """
    if vae_tile == "auto":
        return DEFAULT_TILE if max(height, width) > AUTO_TILE_ABOVE_PX else None
    if vae_tile is not None:
        check_tile(vae_tile)
    return vae_tile


@dataclass(frozen=True)
class GenerationSettings:
    """Validated per-call settings (everything except prompts and the models)."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    sampler: str
    pag_scale: float
    pag_layers: tuple[int, ...]
    images_per_prompt: int


def check_settings(
    *,
    height: int,
    width: int,
    steps: int,
    guidance_scale: float,
    sampler: str,
    pag_scale: float,
    pag_layers: Sequence[int],
    images_per_prompt: int,
    num_layers: int,
) -> GenerationSettings:
    """One-line ValueErrors for every bad setting, raised before any model work."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    for name, value in (("guidance scale", guidance_scale), ("PAG scale", pag_scale)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            raise ValueError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if pag_scale < 0:
        raise ValueError(f"PAG scale must be >= 0, got {pag_scale}")
    bad = [i for i in pag_layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"PAG layers {bad} out of range for a {num_layers}-block model")
    if images_per_prompt < 1:
        raise ValueError(f"images per prompt must be >= 1, got {images_per_prompt}")
    return GenerationSettings(
        height,
        width,
        steps,
        float(guidance_scale),
        sampler,
        float(pag_scale),
        tuple(pag_layers),
        images_per_prompt,
    )


Generators = torch.Generator | list[torch.Generator]


def seeded_generators(seed: int | Sequence[int] | None, n: int) -> Generators:
    """CPU generators for a call, so one seed gives one image on every device, as in the reference.

    One int (or None, a random seed): a single generator for the whole batch, as a diffusers generator.
    A list: one generator per image.
    """
    if seed is None or isinstance(seed, int):
        g = torch.Generator("cpu")
        g.manual_seed(seed) if seed is not None else g.seed()
        return g
    if len(seed) != n:
        raise ValueError(f"got {len(seed)} seeds for {n} images")
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]


def initial_noise(generators: Generators, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 standard normal (n, *shape): drawn as a whole from one generator, or row by row."""
    if isinstance(generators, list):
        return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return torch.randn((n, *shape), generator=generators, dtype=torch.float32)


class SanaPipeline:
    """`SanaPipeline.from_pretrained(folder)(prompts, ...) -> list[PIL.Image]`."""

    def __init__(
        self,
        transformer: SanaDiT,
        vae: DCAE,
        text_encoder: TextEncoder,
        scheduler: SchedulerSpec | None = None,
        *,
        offload_text_encoder: bool = False,
    ) -> None:
        if transformer.config.caption_channels != text_encoder.model.config.hidden_size:
            raise ValueError(
                f"text encoder width {text_encoder.model.config.hidden_size} != transformer caption_channels "
                f"{transformer.config.caption_channels}"
            )
        if transformer.config.in_channels != vae.config.latent_channels:
            raise ValueError(
                f"transformer takes {transformer.config.in_channels} latent channels, "
                f"the autoencoder makes {vae.config.latent_channels}"
            )
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = scheduler or SchedulerSpec()
        # Low-memory mode: the text encoder lives on the CPU and visits the compute device only to encode.
        self.offload_text_encoder = offload_text_encoder

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        instruction: InstructionChoice = MODEL_INSTRUCTION,
        offload_text_encoder: bool = False,
    ) -> SanaPipeline:
        parts = load_components(path_or_id, dtype=dtype, device=device, instruction=instruction)
        if offload_text_encoder:
            parts.text_encoder.to("cpu")
        return cls(
            parts.transformer,
            parts.vae,
            parts.text_encoder,
            parts.scheduler,
            offload_text_encoder=offload_text_encoder,
        )

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def default_size(self) -> int:
        return self.transformer.config.sample_size * self.vae.config.spatial_compression

    def load_lora(self, path: str | Path, scale: float = 1.0) -> list[str]:
        """Merge a LoRA into the transformer: W <- W + scale * B @ A (times the file's alpha / r, if any).

        path: a diffusers-format `pytorch_lora_weights.safetensors` or its folder (`sana train` writes
        RUN/lora/). The merge is in place and permanent (no cost per step; load the pipeline again to undo);
        merging two LoRAs adds both. Returns the adapted module paths. See sana/lora.py.
        """
        from sana.lora import merge_lora, read_lora

        return merge_lora(self.transformer, read_lora(path), scale)

    # ---------------------------------------------------------------------------------------------- text

    def encode_text(self, prompts: list[str], negatives: list[str] | None) -> tuple[TextEmbeddings, ...]:
        """Conditional embeddings for `prompts`, and unconditional ones for `negatives` when given."""
        encoder = self.text_encoder
        if self.offload_text_encoder:
            encoder.to(self.device)
        try:
            cond = encoder.encode(prompts)
            uncond = encoder.encode_unconditional(negatives) if negatives is not None else None
        finally:
            if self.offload_text_encoder:
                encoder.to("cpu")
        cast = lambda e: e.to(self.device, self.dtype)  # noqa: E731
        return (cast(cond),) if uncond is None else (cast(cond), cast(uncond))

    # ------------------------------------------------------------------------------------------- sampling

    def velocity_fn(self, text: TextEmbeddings, settings: GenerationSettings, batch: int) -> VelocityFn:
        """The guided velocity function for this call.

        `text` holds, branch by branch, what the model must see: [cond], [uncond; cond], or with PAG an extra
        cond branch whose self-attention is perturbed.
        """
        model = self.transformer
        cfg = model.config
        guided = uses_guidance(settings.guidance_scale) and not cfg.guidance_embeds
        pag = settings.pag_scale > 0
        branches = 1 + guided + pag
        perturbation = None
        if pag:
            rows = torch.zeros(branches * batch, dtype=torch.bool, device=self.device)
            rows[-batch:] = True  # the last branch is the perturbed one
            perturbation = AttentionPerturbation(frozenset(settings.pag_layers), rows)
        guidance = None
        if cfg.guidance_embeds:  # Sprint: the scale is an input of the model, not a batch combination
            guidance = torch.full(
                (batch,), settings.guidance_scale * cfg.guidance_embeds_scale, device=self.device
            )

        def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            if settings.sampler != "scm":
                t = t * cfg.timestep_scale
            return model(x.to(self.dtype), t.to(self.device, torch.float32), text, guidance, perturbation)

        if branches == 1:
            return model_fn
        s, p = settings.guidance_scale, settings.pag_scale
        if guided and not pag:
            return classifier_free_guidance(model_fn, s)
        if guided:
            combine = lambda u, c, perturbed: u + s * (c - u) + p * (c - perturbed)
        else:
            combine = lambda c, perturbed: c + p * (c - perturbed)
        return batched_guidance(model_fn, branches, combine)

    def sample(
        self,
        velocity: VelocityFn,
        noise: torch.Tensor,
        settings: GenerationSettings,
        *,
        generator: Generators,
        callback: Callback | None,
        progress: bool,
    ) -> torch.Tensor:
        x = noise.to(self.device)
        if settings.sampler == "scm":
            angles = scm_timesteps(settings.steps)
            return SAMPLERS["scm"](
                velocity, x, angles, generator=generator, sigma_data=self.scheduler.sigma_data,
                callback=callback, progress=progress,
            )  # fmt: skip
        shift = self.scheduler.flow_shift
        if settings.sampler == "dpm":
            sigmas = dpm_flow_sigmas(settings.steps, shift)
            times = model_timesteps(sigmas)  # the integer timesteps the published models were sampled with
        else:
            sigmas = euler_flow_sigmas(settings.steps, shift)
            times = sigmas[:-1].float() * 1000
        return SAMPLERS[settings.sampler](
            velocity, x, sigmas, model_times=times, callback=callback, progress=progress
        )

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        negative_prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        sampler: str | None = None,
        seed: int | list[int] | None = None,
        images_per_prompt: int = 1,
        use_resolution_binning: bool = True,
        pag_scale: float = 0.0,
        pag_layers: Sequence[int] = (0,),
        latents: torch.Tensor | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        output_type: str = "pil",
        vae_tile: int | str | None = "auto",
    ) -> list[Image.Image] | torch.Tensor:
        """Generate `images_per_prompt` images for each prompt.

        steps, guidance_scale: None takes the model folder's (`self.scheduler`: sampling.json, else 20 and 4.5,
        or 2 steps for a Sprint model). seed: one int seeds a single generator for the whole batch (as
        diffusers), a list gives one seed per image. latents: explicit starting noise (B, C, h, w), overriding
        seed. output_type "pil" returns images carrying their parameters; "pt" returns the decoded (B, 3, H, W)
        tensor in [-1, 1]; "latent" the final latents. vae_tile: decode in tiles of this many latents (same
        image, memory bounded by the tile); "auto" tiles images with a side above AUTO_TILE_ABOVE_PX (2048) px,
        None never tiles.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if not prompts or len(negatives) != len(prompts):
            raise ValueError(
                f"need >= 1 prompt and one negative prompt per prompt, got {len(prompts)}/{len(negatives)}"
            )
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        settings = check_settings(
            height=self.default_size if height is None else height,
            width=self.default_size if width is None else width,
            steps=self.scheduler.steps if steps is None else steps,
            guidance_scale=self.scheduler.guidance_scale if guidance_scale is None else guidance_scale,
            sampler=sampler or self.scheduler.sampler,
            pag_scale=pag_scale,
            pag_layers=pag_layers,
            images_per_prompt=images_per_prompt,
            num_layers=self.transformer.config.num_layers,
        )
        table = TABLES_BY_RESOLUTION.get(self.default_size) if use_resolution_binning else None
        sample_h, sample_w = (
            nearest_bucket(settings.height, settings.width, table) if table else (settings.height, settings.width)
        )
        tile = vae_tile_for(vae_tile, sample_h, sample_w)  # checked here, before any model work
        f = self.vae.config.spatial_compression
        if sample_h % f or sample_w % f:
            raise ValueError(f"size {sample_h}x{sample_w} is not a multiple of the autoencoder's {f}x compression")
        n = len(prompts) * images_per_prompt
        latent_shape = (self.transformer.config.in_channels, sample_h // f, sample_w // f)
        if latents is not None and tuple(latents.shape) != (n, *latent_shape):
            raise ValueError(f"latents must have shape {(n, *latent_shape)}, got {tuple(latents.shape)}")

        generators = seeded_generators(seed, n)

        # Text: encoded once per prompt, then repeated for the images of that prompt.
        guided = uses_guidance(settings.guidance_scale) and not self.transformer.config.guidance_embeds
        embeds = self.encode_text(prompts, negatives if guided else None)
        cond = embeds[0].repeat(images_per_prompt)
        branches = ([embeds[1].repeat(images_per_prompt)] if guided else []) + [cond]
        if settings.pag_scale > 0:
            branches.append(cond)
        velocity = self.velocity_fn(TextEmbeddings.cat(branches), settings, n)

        # SCM re-noises between steps and keeps drawing from the same generators, as the reference does.
        noise = latents.float() if latents is not None else initial_noise(generators, n, latent_shape)
        final = self.sample(velocity, noise, settings, generator=generators, callback=callback, progress=progress)
        if output_type == "latent":
            return final
        images = self.vae.decode(final.to(next(self.vae.parameters()).dtype), tile=tile).float()  # (B, 3, h, w)
        if (sample_h, sample_w) != (settings.height, settings.width):
            images = resize_and_center_crop(images, settings.height, settings.width)
        if output_type == "pt":
            return images
        return to_pil(images, self._parameters(prompts, negatives, settings, seed, guided))

    def _parameters(
        self, prompts: list[str], negatives: list[str], settings: GenerationSettings, seed: Any, guided: bool
    ) -> list[dict[str, Any]]:
        seeds = seed if isinstance(seed, list) else [seed] * (len(prompts) * settings.images_per_prompt)
        out = []
        for i in range(len(prompts) * settings.images_per_prompt):
            p = i // settings.images_per_prompt
            out.append(
                {
                    "prompt": prompts[p],
                    "negative_prompt": negatives[p] if guided else None,
                    "seed": seeds[i],
                    "index_in_batch": i,
                    "steps": settings.steps,
                    "guidance_scale": settings.guidance_scale,
                    "sampler": settings.sampler,
                    "pag_scale": settings.pag_scale,
                    "height": settings.height,
                    "width": settings.width,
                    "instruction": self.text_encoder.instruction is not None,
                }
            )
        return out
