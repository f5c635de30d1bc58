"""The steps of text-to-image generation as small functions, which `SanaPipeline.__call__` composes and which the
CLI, a server, ComfyUI nodes and image conditioning can compose differently.

    plan_request      the call's arguments, validated, as a `Plan`: settings shared by the batch and what each
                      image gets (prompt, negative prompt, seed); every user mistake is found here, before any
                      model work
    SAMPLERS[...].schedule  the sampler's `Schedule` (its times and the model's), sliceable for img2img
    initial_noise / start_latents   the starting latents: seeded noise, optionally an initial latent noised
                      to the schedule's first time
    dit_model + guided_velocity     the velocity function: a DiT bound to a compute placement, under
                      classifier-free and perturbed-attention guidance over a `Conditioning`
    controlled_model  a DiT steered by a ControlNet reading the control latent in `Conditioning.control`
    SAMPLERS[...].run the sampler over the schedule
    decode_latents    latents -> images in [-1, 1] at the requested size

Nothing here holds state between calls; every function takes what it needs and returns a value.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from sana.aspect_ratios import TABLES_BY_RESOLUTION, nearest_bucket, resize_and_center_crop
from sana.errors import UserError
from sana.image_input import ImageSource, image_tensor, mask_tensor
from sana.models.controlnet import SanaControlNet
from sana.models.dcae import DCAE
from sana.models.dcae_tiling import DEFAULT_TILE, check_tile, choose_tile
from sana.models.dit import SanaDiT
from sana.samplers import Schedule, check_sampler
from sana.samplers.guidance import ConditionedModel, uses_guidance
from sana.types import Conditioning

SIZE_MULTIPLE = 32  # what the reference accepts; also a multiple of every DC-AE compression we ship

# Automatic tiled decoding (vae_tile="auto") is memory-aware: the decode runs in one pass when its estimated
# peak fits in the memory free on the device at decode time (`Placement.headroom`: under --max-memory if set;
# on the CPU at most a quarter of the RAM), else in tiles (`sana.models.dcae_tiling.choose_tile`). Tiling gives
# the same image up to float rounding and bounds the decoder's memory by a tile instead of the image area; one
# pass is a little faster. Where the device cannot say how much is free (and no budget is given), images with
# a side above AUTO_TILE_ABOVE_PX are tiled, as before.
AUTO_TILE_ABOVE_PX = 2048

OUTPUT_TYPES = ("pil", "pt", "latent")


def check_vae_tile(vae_tile: int | str | None) -> int | str | None:
    """A call's vae_tile, checked: "auto", None (never tile) or a positive tile size in latents."""
    if vae_tile not in ("auto", None):
        check_tile(vae_tile)
    return vae_tile


def vae_tile_for(
    vae_tile: int | str | None, vae: DCAE, batch: int, height: int, width: int, headroom: int | None
) -> int | None:
    """The DC-AE tile size (latents) to decode `batch` images of height x width pixels with, or None for one pass.

    vae_tile: an explicit tile size or None (never tile) is kept; "auto" decodes in one pass when the estimated
    peak fits in `headroom` bytes, else in the largest tile that fits (`choose_tile`; docs/low-memory.md).
    headroom None (unknown): tile above AUTO_TILE_ABOVE_PX on either side.
    """
    if vae_tile != "auto":
        return check_vae_tile(vae_tile)
    if headroom is None:
        return DEFAULT_TILE if max(height, width) > AUTO_TILE_ABOVE_PX else None
    return choose_tile(vae.decoder, vae.config, batch, height, width, headroom)


# ------------------------------------------------------------------------------------------------ settings


@dataclass(frozen=True)
class GenerationSettings:
    """Validated settings shared by every image of a batch (everything except prompts, seeds and models)."""

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
    """One-line UserErrors for every bad setting, raised before any model work."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    for name, value in (("guidance scale", guidance_scale), ("PAG scale", pag_scale)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            raise UserError(f"{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value!r}")
    check_sampler(sampler)
    if pag_scale < 0:
        raise UserError(f"PAG scale must be >= 0, got {pag_scale}")
    bad = [i for i in pag_layers if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"PAG layers {bad} out of range for a {num_layers}-block model")
    if images_per_prompt < 1:
        raise UserError(f"images per prompt must be >= 1, got {images_per_prompt}")
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


@dataclass(frozen=True)
class ModelFacts:
    """What planning a request needs to know about the models, read once from their configs."""

    default_size: int  # the native image side in pixels
    num_layers: int
    latent_channels: int
    compression: int  # the autoencoder's spatial compression
    guidance_embeds: bool  # Sprint: the guidance scale is a model input, not a batch combination
    sampler: str  # the model folder's defaults (sampling.json, scheduler config)
    steps: int
    guidance_scale: float
    controlnet: bool = False  # a ControlNet can steer the DiT (a call may pass a control image)

    @classmethod
    def of(
        cls, transformer: SanaDiT, vae: DCAE, scheduler: Any, controlnet: SanaControlNet | None = None
    ) -> ModelFacts:
        cfg = transformer.config
        f = vae.config.spatial_compression
        return cls(
            cfg.sample_size * f,
            cfg.num_layers,
            cfg.in_channels,
            f,
            cfg.guidance_embeds,
            scheduler.sampler,
            scheduler.steps,
            scheduler.guidance_scale,
            controlnet is not None,
        )


@dataclass(frozen=True)
class Plan:
    """A validated request: the settings of the batch and what each image is made from.

    Image i belongs to prompt i // images_per_prompt. `seed` is as the caller gave it: one int (or None, a
    random seed) seeds a single generator for the whole batch, as diffusers does; a tuple holds one seed
    per image (what `sana generate` and a server use, so an image does not depend on its batch).
    """

    settings: GenerationSettings
    prompts: tuple[str, ...]
    negatives: tuple[str, ...]  # one per prompt
    seed: int | tuple[int, ...] | None
    sample_size: tuple[int, int]  # (h, w) the DiT samples at: the aspect-ratio bucket, or the request itself
    latent_shape: tuple[int, int, int]  # (C, h, w)
    cfg: bool  # classifier-free guidance runs: scale > 1 and the model does not embed the scale
    tile: int | str | None  # DC-AE decode tile, None: one pass, "auto": chosen at decode time (vae_tile_for)
    # img2img and inpainting (see `image_inputs`): the input image and repaint mask of every image, fitted
    # to the requested (height, width); the strength; one line per input that had to be resized.
    strength: float = 1.0
    image: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (n, 3, H, W) in [-1, 1]
    mask: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (n, 1, H, W), 1 = repaint
    notes: tuple[str, ...] = ()
    # ControlNet (see `control_inputs`): every image's control image fitted to the sampled size, and the scale.
    control: torch.Tensor | None = field(default=None, compare=False, repr=False)  # (n, 3, h, w) in [-1, 1]
    control_scale: float = 1.0

    @property
    def n(self) -> int:
        return len(self.prompts) * self.settings.images_per_prompt

    def image_parameters(self, instruction: bool) -> list[dict[str, Any]]:
        """The parameters stored in each image (PNG text chunks)."""
        s = self.settings
        seeds = list(self.seed) if isinstance(self.seed, tuple) else [self.seed] * self.n
        conditioning = (
            {} if self.image is None else {"strength": self.strength, "inpainting": self.mask is not None}
        )
        if self.control is not None:
            conditioning["control_scale"] = self.control_scale
        return [
            {
                "prompt": self.prompts[i // s.images_per_prompt],
                "negative_prompt": self.negatives[i // s.images_per_prompt] if self.cfg else None,
                "seed": seeds[i],
                "index_in_batch": i,
                "steps": s.steps,
                "guidance_scale": s.guidance_scale,
                "sampler": s.sampler,
                "pag_scale": s.pag_scale,
                "height": s.height,
                "width": s.width,
                "instruction": instruction,
                **conditioning,
            }
            for i in range(self.n)
        ]


def plan_request(
    model: ModelFacts,
    prompt: str | Sequence[str],
    *,
    negative_prompt: str | Sequence[str] = "",
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int | Sequence[int] | None = None,
    images_per_prompt: int = 1,
    use_resolution_binning: bool = True,
    pag_scale: float = 0.0,
    pag_layers: Sequence[int] = (0,),
    vae_tile: int | str | None = "auto",
    image: ImageSource | Sequence[ImageSource] | None = None,
    strength: float = 1.0,
    mask_image: ImageSource | Sequence[ImageSource] | None = None,
    control_image: ImageSource | Sequence[ImageSource] | None = None,
    control_scale: float = 1.0,
) -> Plan:
    """Validate a call's arguments into a Plan; None takes the model's default. Raises UserError, never starts
    model work. image, strength, mask_image: see `image_inputs`; control_image, control_scale: see
    `control_inputs`."""
    prompts = (prompt,) if isinstance(prompt, str) else tuple(prompt)
    negatives = (negative_prompt,) * len(prompts) if isinstance(negative_prompt, str) else tuple(negative_prompt)
    if not prompts or len(negatives) != len(prompts):
        raise UserError(
            f"need >= 1 prompt and one negative prompt per prompt, got {len(prompts)}/{len(negatives)}"
        )
    settings = check_settings(
        height=model.default_size if height is None else height,
        width=model.default_size if width is None else width,
        steps=model.steps if steps is None else steps,
        guidance_scale=model.guidance_scale if guidance_scale is None else guidance_scale,
        sampler=sampler or model.sampler,
        pag_scale=pag_scale,
        pag_layers=pag_layers,
        images_per_prompt=images_per_prompt,
        num_layers=model.num_layers,
    )
    table = TABLES_BY_RESOLUTION.get(model.default_size) if use_resolution_binning else None
    h, w = nearest_bucket(settings.height, settings.width, table) if table else (settings.height, settings.width)
    tile = check_vae_tile(vae_tile)
    f = model.compression
    if h % f or w % f:
        raise UserError(f"size {h}x{w} is not a multiple of the autoencoder's {f}x compression")
    n = len(prompts) * images_per_prompt
    if seed is not None and not isinstance(seed, int):
        seed = tuple(int(s) for s in seed)
        if len(seed) != n:
            raise UserError(f"got {len(seed)} seeds for {n} images")
    inputs = image_inputs(image, strength, mask_image, len(prompts), images_per_prompt, settings)
    control = control_inputs(control_image, control_scale, model, len(prompts), images_per_prompt, (h, w))
    notes = inputs.pop("notes", ()) + control.pop("notes", ())
    return Plan(
        settings=settings,
        prompts=prompts,
        negatives=negatives,
        seed=seed,
        sample_size=(h, w),
        latent_shape=(model.latent_channels, h // f, w // f),
        cfg=uses_guidance(settings.guidance_scale) and not model.guidance_embeds,
        tile=tile,
        notes=notes,
        **inputs,
        **control,
    )


# The strength `sana generate --image` and the server's image edits use when none is given and there is no
# mask: enough to change the picture, little enough to keep its layout (diffusers' Sana-Sprint img2img default).
IMG2IMG_STRENGTH = 0.6


def image_inputs(
    image: ImageSource | Sequence[ImageSource] | None,
    strength: float,
    mask_image: ImageSource | Sequence[ImageSource] | None,
    prompts: int,
    images_per_prompt: int,
    settings: GenerationSettings,
) -> dict[str, Any]:
    """The img2img / inpainting fields of a Plan, read and checked: `image` (one, or one per prompt: a path,
    image bytes, a PIL image or a tensor, see sana.image_input) fitted to the requested size, `strength` in
    (0, 1] (the share of the schedule that runs: ceil(strength x steps) steps), `mask_image` (white = repaint;
    needs an image; one, or one per prompt, where None repaints everywhere). One-line UserErrors for an
    unreadable file, a strength outside (0, 1], a mask without an image or a count that is neither 1 nor one
    per prompt."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise UserError(f"strength must be a number in (0, 1], got {strength!r}")
    if image is None:
        if mask_image is not None:
            raise UserError("a mask needs an image to repaint: pass image= too")
        if strength != 1:
            raise UserError(f"strength {strength} needs an input image to start from: pass image=")
        return {}
    if isinstance(mask_image, list | tuple):  # a None entry repaints its image everywhere (a server batch)
        full = torch.ones(1, 1, settings.height, settings.width)
        mask_image = [full if m is None else m for m in mask_image]
    per_image = []
    notes = []
    for source, read, what in ((image, image_tensor, "image"), (mask_image, mask_tensor, "mask")):
        if source is None:
            per_image.append(None)
            continue
        fitted = read(source, settings.height, settings.width, what)
        rows = fitted.tensor
        if rows.shape[0] not in (1, prompts):
            raise UserError(f"got {rows.shape[0]} {what}s for {prompts} prompts: give 1, or 1 per prompt")
        per_image.append(rows.repeat_interleave(prompts * images_per_prompt // rows.shape[0], dim=0))
        if fitted.resized:
            notes.append(fitted.note(what))
    return {"strength": float(strength), "image": per_image[0], "mask": per_image[1], "notes": tuple(notes)}


def control_inputs(
    control_image: ImageSource | Sequence[ImageSource] | None,
    control_scale: float,
    model: ModelFacts,
    prompts: int,
    images_per_prompt: int,
    sample_size: tuple[int, int],
) -> dict[str, Any]:
    """The ControlNet fields of a Plan: `control_image` (one, or one per prompt: a path, image bytes, a PIL
    image or a tensor in [-1, 1]) read and fitted to the sampled size (the aspect-ratio bucket, which the
    ControlNet sees), one row per image, and `control_scale` (a finite number). Nothing without a control image
    (the scale is then unused). One-line UserErrors for a model without a ControlNet, an unreadable image, a
    count that is neither 1 nor one per prompt, or a scale that is not a finite number."""
    if control_image is None:
        return {}
    if not model.controlnet:
        raise UserError(
            "a control image needs a ControlNet: load one with controlnet=PATH (sana generate --controlnet), "
            "or use a model folder that has a controlnet/"
        )
    if (
        not isinstance(control_scale, int | float)
        or isinstance(control_scale, bool)
        or not math.isfinite(control_scale)
    ):
        raise UserError(f"control scale must be a finite number, got {control_scale!r}")
    fitted = image_tensor(control_image, *sample_size, what="control image")
    rows = fitted.tensor  # (k, 3, h, w)
    if rows.shape[0] not in (1, prompts):
        raise UserError(f"got {rows.shape[0]} control images for {prompts} prompts: give 1 or 1 per prompt")
    # One per prompt, repeated for its images (prompt-major, as the conditioning is); one for all, repeated.
    control = rows.repeat_interleave(prompts * images_per_prompt // rows.shape[0], dim=0)  # (n, 3, h, w)
    note = fitted.note("control image")
    return {"control": control, "control_scale": float(control_scale), "notes": (note,) if note else ()}


# ---------------------------------------------------------------------------------------- noise and times

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
        raise UserError(f"got {len(seed)} seeds for {n} images")
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seed]


def initial_noise(generators: Generators, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Float32 standard normal (n, *shape): drawn as a whole from one generator, or row by row."""
    if isinstance(generators, list):
        return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return torch.randn((n, *shape), generator=generators, dtype=torch.float32)


def model_schedule(sampler: str, steps: int, scheduler: Any, transformer: SanaDiT) -> Schedule:
    """The sampler's schedule for this model: its flow shift (or sigma_data) and its DiT's timestep_scale."""
    return check_sampler(sampler).schedule(
        steps,
        shift=scheduler.flow_shift,
        sigma_data=scheduler.sigma_data,
        timestep_scale=transformer.config.timestep_scale,
    )


def start_latents(
    schedule: Schedule, noise: torch.Tensor, init: torch.Tensor | None = None, strength: float = 1.0
) -> tuple[torch.Tensor, Schedule]:
    """The sampler's starting latents and the schedule to run from them.

    Without `init`: the noise itself, over the whole schedule (text to image). With an initial latent `init`
    (normalised, as the DC-AE encodes): the last ceil(strength * steps) steps of the schedule, starting from
    `init` noised to the first of them with this noise (image to image). When that is the whole schedule
    (strength 1, or a strength whose steps round up to all of them) the start is the noise itself, as for
    text to image: the first time is where text to image starts from pure noise (sigma 0.9997 for
    Flow-DPM-Solver, an angle just above pi/2 for sCM), and the image's trace there (3e-4 of it) only
    perturbs the text-to-image picture, which few-step samplers amplify into a different picture.
    """
    if init is None:
        if strength != 1.0:
            raise UserError("a strength below 1 needs an initial image")
        return noise, schedule
    if init.shape != noise.shape:
        raise UserError(f"initial latents {tuple(init.shape)} do not match the noise {tuple(noise.shape)}")
    kept = schedule.for_strength(strength)
    if kept.steps == schedule.steps:
        return noise, kept
    return kept.noised(init.to(noise.device), noise), kept


# ------------------------------------------------------------------------------------------------- models


def dit_model(transformer: SanaDiT, device: torch.device, dtype: torch.dtype) -> ConditionedModel:
    """The DiT as the guidance wrappers call it: latents cast to the compute dtype, times as float32 on the
    device, the conditioning as given (already placed, see `Conditioning.to`)."""

    def model(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return transformer(x.to(dtype), t.to(device, torch.float32), cond)

    return model


def controlled_model(
    model: ConditionedModel, controlnet: SanaControlNet, scale: float, device: torch.device, dtype: torch.dtype
) -> ConditionedModel:
    """`model` steered by a ControlNet: each call runs the ControlNet on the same (x, t, cond), reading the control
    latent from `cond.control`, and calls `model` with the residuals times `scale` in `cond.residuals`. Guidance
    stacks `cond.control` with the other fields, so every branch gets its rows' control latent, as in diffusers.
    At scale 0 the ControlNet is skipped: its residuals would be exact zeros."""

    def controlled(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        if cond.control is None:
            raise ValueError("a ControlNet-steered model needs the control latent in cond.control")
        residuals = ()
        if scale != 0:
            residuals = controlnet(x.to(dtype), t.to(device, torch.float32), cond, cond.control.to(dtype), scale)
        return model(x, t, replace(cond, residuals=residuals, control=None))

    return controlled


def sprint_guidance(plan: Plan, guidance_embeds_scale: float, device: torch.device) -> torch.Tensor:
    """(B,) the value a guidance-embedding model sees: the guidance scale times its embedding scale."""
    return torch.full((plan.n,), plan.settings.guidance_scale * guidance_embeds_scale, device=device)


def decode_latents(
    vae: DCAE, latents: torch.Tensor, plan: Plan, dtype: torch.dtype, headroom: int | None = None
) -> torch.Tensor:
    """(B, 3, height, width) float32 images in [-1, 1]: decoded (tiled as planned; "auto" by the memory free,
    `headroom` bytes, see `vae_tile_for`), then resized from the aspect-ratio bucket to the requested size."""
    b, _, h, w = latents.shape
    f = vae.config.spatial_compression
    tile = vae_tile_for(plan.tile, vae, b, h * f, w * f, headroom)
    images = vae.decode(latents.to(dtype), tile=tile).float()  # (B, 3, h, w)
    height, width = plan.settings.height, plan.settings.width
    if plan.sample_size != (height, width):
        images = resize_and_center_crop(images, height, width)
    return images


__all__ = [
    "AUTO_TILE_ABOVE_PX",
    "IMG2IMG_STRENGTH",
    "OUTPUT_TYPES",
    "GenerationSettings",
    "ModelFacts",
    "Plan",
    "check_settings",
    "check_vae_tile",
    "control_inputs",
    "controlled_model",
    "decode_latents",
    "dit_model",
    "image_inputs",
    "initial_noise",
    "model_schedule",
    "plan_request",
    "seeded_generators",
    "sprint_guidance",
    "start_latents",
    "vae_tile_for",
]
