"""Text to image: prompt -> text encoder -> (DiT velocity + guidance) -> sampler -> DC-AE -> PIL images.

`SanaPipeline` holds the three models, the model folder's `SchedulerSpec` and a `Placement` (where the models
run, fixed when the pipeline is built) and nothing else: every call builds its own plan, noise, embeddings and
closures from the small functions of sana/generation.py, so calls never influence each other. With the same
inputs it reproduces the reference diffusers pipeline: the same initial noise for a seed (float32 CPU
`torch.randn`), lower-cased prompts, the published aspect-ratio buckets, and the model seeing the same
timesteps.

What may run at the same time on one instance (a server shares one):
  * any number of `__call__`s, `plan`s and `encode`s: they read the models and write nothing shared. A
    component with an offloading policy is used by one call at a time (see sana/placement.py); the others
    wait for it.
  * `load_lora` and `MergedLoRA.remove` change the transformer's weights: run them only while no call is in
    flight (the weights are shared by every call).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image

from sana.aspect_ratios import resize_and_center_crop
from sana.errors import UserError
from sana.generation import (
    OUTPUT_TYPES,
    ModelFacts,
    Plan,
    controlled_model,
    decode_latents,
    dit_model,
    initial_noise,
    model_schedule,
    plan_request,
    seeded_generators,
    sprint_guidance,
    start_latents,
)
from sana.images import to_pil
from sana.inpainting import composite, hold_kept_region, latent_keep
from sana.lora import MergedLoRA
from sana.models.controlnet import SanaControlNet
from sana.models.dcae import DCAE
from sana.models.dit import SanaDiT
from sana.models.text_encoder import TextEncoder
from sana.placement import Placement
from sana.pretrained import MODEL_INSTRUCTION, InstructionChoice, SchedulerSpec, load_components
from sana.samplers import SAMPLERS, Callback
from sana.samplers.guidance import guided_velocity
from sana.types import Conditioning
from sana.weights import CheckpointError, parse_dtype


class SanaPipeline:
    """`SanaPipeline.from_pretrained(folder)(prompts, ...) -> list[PIL.Image]`."""

    def __init__(
        self,
        transformer: SanaDiT,
        vae: DCAE,
        text_encoder: TextEncoder,
        scheduler: SchedulerSpec | None = None,
        *,
        controlnet: SanaControlNet | None = None,
        placement: Placement | None = None,
    ) -> None:
        """placement: where the models run; None: everything resident where the transformer's weights are,
        computing in their dtype and decoding in the autoencoder's (right for models built in place, as in
        tests and training's validation; loaders pass a placement explicitly). controlnet: steers the
        transformer when a call passes a `control_image`; it runs where the transformer runs."""
        if controlnet is not None:
            controlnet.config.check_fits(transformer.config)
        # Parts of one model folder that do not fit each other: the folder is wrong, not the code.
        if transformer.config.caption_channels != text_encoder.model.config.hidden_size:
            raise CheckpointError(
                f"text encoder width {text_encoder.model.config.hidden_size} != transformer caption_channels "
                f"{transformer.config.caption_channels}"
            )
        if transformer.config.in_channels != vae.config.latent_channels:
            raise CheckpointError(
                f"transformer takes {transformer.config.in_channels} latent channels, "
                f"the autoencoder makes {vae.config.latent_channels}"
            )
        if placement is None:
            weight = next(transformer.parameters())
            placement = Placement.build(weight.device, weight.dtype, vae_dtype=next(vae.parameters()).dtype)
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler = scheduler or SchedulerSpec()
        self.placement = placement
        for name in ("transformer", "vae", "text_encoder"):
            placement.place(name, getattr(self, name))
        self.controlnet = controlnet
        if controlnet is not None:
            placement.place("transformer", controlnet)
        self.facts = ModelFacts.of(transformer, vae, self.scheduler, controlnet)

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str = "cpu",
        instruction: InstructionChoice = MODEL_INSTRUCTION,
        offload: str | Sequence[str] = (),
        controlnet: str | Path | None = None,
        quantize: str | None = None,
        quantize_text_encoder: str | None = None,
        max_memory: int | str | None = None,
    ) -> SanaPipeline:
        """offload: "model" (each model on `device` only while it runs), "sequential" (block by block, the least
        memory), or components that rest on the CPU and move whole to run (("text_encoder",), the low-memory
        mode of `sana generate --low-memory`); see sana/placement.py. controlnet: a ControlNet folder or Hub id
        to steer this model with (see `sana.pretrained.controlnet_dir`); without it, the folder's own
        `controlnet/` if it has one (a SanaControlNetPipeline folder). quantize: the DiT's torchao mode ("w8a8",
        "int8", "int4"), quantize_text_encoder: the text encoder's ("int8", "int4"); see sana/quantization.py
        (a folder written by `sana quantize` needs neither). max_memory: bytes (or "8GB") the process may hold
        on `device`; the autoencoder decodes in tiles to stay under it."""
        from sana.quantization import check_mode

        # Bad offload names, sizes and modes fail before loading.
        offload = offload if isinstance(offload, str) else tuple(offload)
        placement = Placement.build(device, parse_dtype(dtype), offload, max_memory=max_memory)
        check_mode(quantize, "transformer", placement.device, placement.dtype)
        check_mode(quantize_text_encoder, "text_encoder", placement.device, placement.dtype)
        parts = load_components(
            path_or_id,
            dtype=dtype,
            # Components that rest on the CPU are read there: reading them onto the device first could fill it.
            device="cpu" if isinstance(offload, str) else device,
            instruction=instruction,
            controlnet=controlnet,
            quantize=quantize,
            quantize_text_encoder=quantize_text_encoder,
            compute_device=device,
        )
        return cls(
            parts.transformer,
            parts.vae,
            parts.text_encoder,
            parts.scheduler,
            controlnet=parts.controlnet,
            placement=placement,
        )

    @property
    def device(self) -> torch.device:
        return self.placement.device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.dtype

    @property
    def default_size(self) -> int:
        return self.facts.default_size

    def load_lora(self, path: str | Path, scale: float = 1.0) -> MergedLoRA:
        """Merge a LoRA into the transformer: W <- W + scale * B @ A (times the file's alpha / r, if any).

        path: a diffusers-format `pytorch_lora_weights.safetensors` or its folder (`sana train` writes
        RUN/lora/). The merge costs nothing per step; the returned record's `remove()` restores the weights
        exactly (LoRAs merged later must be removed first). len() of the record: the adapted layers.
        See sana/lora.py.
        """
        from sana.lora import merge_lora, read_lora
        from sana.quantization import quantization_of

        if quantization_of(self.transformer) is not None:
            raise UserError(
                f"cannot merge a LoRA into a DiT quantized to {quantization_of(self.transformer)}: load the model "
                "unquantized, merge, then quantize (`sana generate --lora ... --quantize ...` does that)"
            )
        return merge_lora(self.transformer, read_lora(path), scale)

    # ------------------------------------------------------------------------------------------- steps

    def plan(self, prompt: str | Sequence[str], **settings) -> Plan:
        """Validate a call's arguments (those of `__call__` but latents, callback, progress and output_type)
        against this model: one-line UserErrors, no model work; input and control images are read and fitted."""
        return plan_request(self.facts, prompt, **settings)

    def encode(self, plan: Plan) -> tuple[Conditioning, Conditioning | None]:
        """The conditional and (when classifier-free guidance runs) unconditional conditioning of every image,
        on the compute device. Each prompt is encoded once and repeated for its images."""
        per_prompt = plan.settings.images_per_prompt
        with self.placement.use("text_encoder", self.text_encoder) as encoder:
            cond = encoder.encode(list(plan.prompts))
            uncond = encoder.encode_unconditional(list(plan.negatives)) if plan.cfg else None
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = sprint_guidance(plan, self.transformer.config.guidance_embeds_scale, self.device)

        def place(text):
            return Conditioning(text.to(self.device, self.dtype).repeat(per_prompt), guidance=guidance)

        return place(cond), None if uncond is None else place(uncond)

    def encode_control(self, pixels: torch.Tensor, plan: Plan) -> torch.Tensor:
        """(n, C, h, w) the control images' DC-AE latents (scaled as the DiT's latents are), on the compute
        device in the compute dtype: the ControlNet's `control` input."""
        dtype = self.placement.decode_dtype
        with self.placement.use("vae", self.vae) as vae:
            latent = vae.encode(pixels.to(self.device, dtype))
        return latent.to(self.dtype)

    def encode_image(self, plan: Plan) -> torch.Tensor | None:
        """(n, C, h, w) float32 DC-AE latents of the plan's input images (img2img, inpainting), fitted to the
        sampled size, on the compute device; None when the plan has no image."""
        if plan.image is None:
            return None
        pixels = resize_and_center_crop(plan.image, *plan.sample_size)  # the aspect-ratio bucket, if binned
        with self.placement.use("vae", self.vae) as vae:
            return vae.encode(pixels.to(self.device, self.placement.decode_dtype)).float()

    # ------------------------------------------------------------------------------------------------ call

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        *,
        latents: torch.Tensor | None = None,
        callback: Callback | None = None,
        progress: bool = False,
        output_type: str = "pil",
        **settings,
    ) -> list[Image.Image] | torch.Tensor:
        """Generate `images_per_prompt` images for each prompt.

        settings (see `sana.generation.plan_request`): negative_prompt, height, width, steps, guidance_scale,
        sampler, seed, images_per_prompt, use_resolution_binning, pag_scale, pag_layers, vae_tile, and the
        image inputs image, strength, mask_image, control_image, control_scale.
        steps, guidance_scale, sampler: None takes the model folder's (`self.scheduler`: sampling.json, else
        20 and 4.5, or 2 steps for a Sprint model). seed: one int seeds a single generator for the whole batch
        (as diffusers), a list gives one seed per image. latents: explicit starting noise (B, C, h, w),
        overriding seed. output_type "pil" returns images carrying their parameters; "pt" returns the decoded
        (B, 3, H, W) tensor in [-1, 1]; "latent" the final latents. vae_tile: decode in tiles of this many
        latents (same image, memory bounded by the tile); "auto" decodes in one pass when that fits the memory
        free (see `sana.generation.vae_tile_for`), else in tiles; None never tiles. control_image: steers the
        image with the pipeline's ControlNet (one image, or one per prompt: a path, PIL image or (B, 3, H, W)
        tensor in [-1, 1]), fitted to the sampled size; its outputs are multiplied by control_scale (0: the
        ControlNet adds nothing).
        image, strength (img2img): start from this image (a path, PIL image, bytes or (B, 3, H, W) tensor in
        [-1, 1]; one, or one per prompt), fitted to height x width: the last ceil(strength x steps) steps run
        from its latent noised to their first time. mask_image (inpainting, with image): white repaints,
        black keeps; the kept region follows the image's noised latent at every step and the decoded picture is
        composited over the image with a feathered mask (sana/inpainting.py).
        """
        if output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        plan = self.plan(prompt, **settings)
        if latents is not None and tuple(latents.shape) != (plan.n, *plan.latent_shape):
            raise UserError(f"latents must have shape {(plan.n, *plan.latent_shape)}, got {tuple(latents.shape)}")
        s = plan.settings
        control = plan.control

        cond, uncond = self.encode(plan)
        model = dit_model(self.transformer, self.device, self.dtype)
        if control is not None:
            latent = self.encode_control(control, plan)
            cond = replace(cond, control=latent)
            uncond = None if uncond is None else replace(uncond, control=latent)
            model = controlled_model(model, self.controlnet, plan.control_scale, self.device, self.dtype)
        velocity = guided_velocity(
            model, cond, uncond, scale=s.guidance_scale, pag_scale=s.pag_scale, pag_layers=s.pag_layers
        )
        # SCM re-noises between steps and keeps drawing from the same generators, as the reference does.
        generators = seeded_generators(plan.seed, plan.n)
        noise = latents.float() if latents is not None else initial_noise(generators, plan.n, plan.latent_shape)
        schedule = model_schedule(s.sampler, s.steps, self.scheduler, self.transformer)
        init = self.encode_image(plan)
        x, schedule = start_latents(schedule, noise.to(self.device), init, plan.strength)
        if plan.mask is not None:
            keep = latent_keep(plan.mask, plan.sample_size, self.facts.compression).to(self.device)
            callback = hold_kept_region(schedule, init, noise.to(self.device), keep, then=callback)
        with ExitStack() as using:  # each model on the device while it runs, as its placement policy says
            using.enter_context(self.placement.use("transformer", self.transformer))
            if control is not None:
                using.enter_context(self.placement.use("transformer", self.controlnet))
            final = SAMPLERS[s.sampler].run(
                velocity, x, schedule, generator=generators, callback=callback, progress=progress
            )
        if output_type == "latent":
            return final
        with self.placement.use("vae", self.vae) as vae:  # tiles when one pass would not fit (see vae_tile_for)
            images = decode_latents(vae, final, plan, self.placement.decode_dtype, self.placement.headroom())
        if plan.mask is not None:
            images = composite(images, plan.image, plan.mask)
        if output_type == "pt":
            return images
        return to_pil(images, plan.image_parameters(instruction=self.text_encoder.instruction is not None))
