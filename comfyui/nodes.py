"""The Sana nodes for ComfyUI: this project's pipeline, step by step, as graph nodes.

Each node is one step of `SanaPipeline.__call__` (sana/pipeline.py) made from the same functions
(sana/generation.py), so a graph of them makes the image `sana generate` makes for the same model, prompt, seed,
steps, guidance and sampler:

    SanaModelLoader      SanaPipeline.from_pretrained                       -> SANA_MODEL
    SanaLoraLoader       a LoRA to merge while sampling                     SANA_MODEL -> SANA_MODEL
    SanaTextEncode       the text encoder (prompt and negative forms)       -> SANA_CONDITIONING
    SanaControlNetLoader / SanaControlNetApply   a ControlNet and its image -> SANA_CONDITIONING
    SanaEmptyLatent      the latent's shape                                 -> LATENT
    SanaSampler          initial_noise, start_latents, guided_velocity, SAMPLERS[...].run     LATENT -> LATENT
    SanaVAEDecode / SanaVAEEncode   the DC-AE                               LATENT <-> IMAGE

LATENT ({"samples": (B, C, H/32, W/32)}, DC-AE latents as the DiT sees them) and IMAGE ((B, H, W, 3) in [0, 1])
are ComfyUI's own types, so its core nodes (LoadImage, SaveImage, ImageScale, SetLatentNoiseMask, latent
batch nodes) combine with these.

ComfyUI caches node outputs and hands the same value to every branch that uses it, so no node changes a value
it receives: a LoRA node returns a new SANA_MODEL that lists its LoRA, and the sampler merges the listed LoRAs
for its run and takes them off again (`MergedLoRA.remove` restores the weights bit for bit), even when the run
fails or is interrupted. A sampler fed by the loader directly thus samples the plain model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sana.errors import MissingFileError, UserError
from sana.generation import (
    SIZE_MULTIPLE,
    controlled_model,
    dit_model,
    initial_noise,
    model_schedule,
    seeded_generators,
    sprint_guidance,
    start_latents,
    vae_tile_for,
)
from sana.image_input import image_tensor
from sana.inpainting import hold_kept_region, latent_keep
from sana.lora import LoRALayer, merge_lora, read_lora
from sana.models.controlnet import SanaControlNet
from sana.models.text_encoder import TextEncoder
from sana.pipeline import SanaPipeline
from sana.quantization import DIT_MODES, TEXT_ENCODER_MODES
from sana.samplers import SAMPLERS
from sana.samplers.guidance import guided_velocity
from sana.types import Conditioning, TextEmbeddings

from . import host

CATEGORY = "sana"

# The names ComfyUI users know (its own KSampler calls the flow samplers this way) -> the samplers' registry.
SAMPLER_NAMES = {"flow_dpm_solver": "dpm", "flow_euler": "euler", "scm": "scm"}
DTYPES = ("fp32", "bf16", "fp16")
# The project's low-memory modes (SanaPipeline.from_pretrained's `offload`), by the names the node offers:
# the text encoder resting on the CPU (`sana generate --low-memory`), every model visiting the device only while
# it runs, or block by block (the least memory). Offloaded components manage their own moves, so only resident
# ones are registered with ComfyUI's model manager.
LOW_MEMORY = {
    "off": (),
    "text encoder offloaded": ("text_encoder",),
    "model offload": "model",
    "sequential offload": "sequential",
}
NO_QUANTIZATION = "off"
INSTRUCTIONS = ("model", "off", "custom")
NO_FOLDER = "none"
MAX_SEED = 2**64 - 1 - 4096  # torch generators take 64-bit seeds; image i of a batch uses seed + i
MAX_SIDE = 16384


# ----------------------------------------------------------------------------------------------- the values


@dataclass(frozen=True)
class AppliedLoRA:
    """A LoRA a SANA_MODEL carries: merged into the transformer while a sampler runs."""

    path: str
    strength: float
    layers: dict[str, LoRALayer] = dataclasses.field(repr=False)


@dataclass(frozen=True, eq=False)
class SanaModel:
    """SANA_MODEL: a loaded pipeline, the LoRAs to apply when sampling with it, and its registration with
    ComfyUI's memory manager (component name -> ModelPatcher; empty outside ComfyUI)."""

    pipe: SanaPipeline
    source: str
    patchers: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)
    loras: tuple[AppliedLoRA, ...] = ()

    def ready(self, *components: str) -> None:
        """Put these components on the compute device if ComfyUI moved them away to make room."""
        host.load([self.patchers[c] for c in components if c in self.patchers])

    @contextlib.contextmanager
    def loras_merged(self) -> Iterator[None]:
        """The carried LoRAs merged into the transformer, in order, for the duration of the block; removed in
        the reverse order however the block ends."""
        merged = []
        try:
            for lora in self.loras:
                merged.append(merge_lora(self.pipe.transformer, lora.layers, lora.strength))
            yield
        finally:
            for record in reversed(merged):
                record.remove()


@dataclass(frozen=True, eq=False)
class SanaControl:
    """SANA_CONTROLNET: a ControlNet loaded for one model (its device and dtype), and its registration."""

    controlnet: SanaControlNet
    source: str
    patchers: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class ControlInput:
    """What SanaControlNetApply attaches to a conditioning: the ControlNet, its image(s) in [-1, 1] as
    (k, 3, H, W), and the scale of its residuals."""

    control: SanaControl
    pixels: torch.Tensor
    scale: float


@dataclass(frozen=True, eq=False)
class SanaConditioning:
    """SANA_CONDITIONING: one prompt encoded both ways the pipeline encodes text: `positive` (with the
    instruction prefix, if any, and the pipeline's token selection) and `negative` (as a negative prompt is
    encoded: bare). The sampler takes the form of the input it is wired to. (1, L, C) each, on the CPU."""

    text: str
    positive: TextEmbeddings
    negative: TextEmbeddings
    control: ControlInput | None = None

    def conditioning(self, role: str, n: int, pipe: SanaPipeline, guidance: torch.Tensor | None) -> Conditioning:
        emb = self.positive if role == "positive" else self.negative
        width = pipe.transformer.config.caption_channels
        if emb.hidden.shape[-1] != width:
            raise UserError(
                f"the {role} conditioning is {emb.hidden.shape[-1]} wide, this model reads {width}: encode it "
                "with the same model's SanaTextEncode"
            )
        return Conditioning(emb.to(pipe.device, pipe.dtype).repeat(n), guidance=guidance)


# ---------------------------------------------------------------------------------------------- the checks


def model_source(model_path: str, model_folder: str = NO_FOLDER) -> str | None:
    """What SanaModelLoader loads: model_path, else the listed folder, else None (the shipped model)."""
    if model_path.strip():
        return model_path.strip()
    if model_folder and model_folder != NO_FOLDER:
        path = host.model_folder_path(model_folder)
        if path is None:
            raise MissingFileError(
                f"no Sana model folder {model_folder!r} under ComfyUI's models/sana or diffusers"
            )
        return path
    return None


def check_model_path(text: str) -> None:
    """A local folder must exist; "org/name" (a Hub id) is looked up when loading."""
    text = text.strip()
    if not text:
        return
    path = Path(text).expanduser()
    hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~")) and not path.exists()
    if not path.is_dir() and not hub_id:
        raise MissingFileError(f"no such model folder: {text}")


def lora_location(lora_path: str) -> str:
    """A LoRA file or folder: as given, else a name in ComfyUI's models/loras."""
    text = lora_path.strip()
    if not text:
        raise UserError(
            "lora_path is empty: give a pytorch_lora_weights.safetensors, its folder, or a name in models/loras"
        )
    if Path(text).expanduser().exists():
        return str(Path(text).expanduser())
    found = host.named_file("loras", text)
    if found is None:
        raise MissingFileError(f"no LoRA at {text} (nor in ComfyUI's models/loras)")
    return found


def check_size(name: str, value: int, multiple: int = SIZE_MULTIPLE) -> None:
    if not isinstance(value, int) or value <= 0 or value % multiple:
        raise UserError(f"{name} must be a positive multiple of {multiple}, got {value!r}")


def parse_layers(text: str) -> tuple[int, ...]:
    """PAG layers as "8" or "7, 8, 9" -> (7, 8, 9)."""
    try:
        layers = tuple(int(part) for part in str(text).replace(",", " ").split())
    except ValueError:
        raise UserError(f"pag_layers must be block numbers such as '8' or '7, 8', got {text!r}") from None
    if not layers:
        raise UserError("pag_layers is empty: name at least one block, e.g. '8'")
    return layers


def validation(check, *args) -> bool | str:
    """VALIDATE_INPUTS' answer: True, or the one-line message ComfyUI shows on the node before running."""
    try:
        check(*args)
    except UserError as e:
        return str(e)
    return True


def image_pixels(image: torch.Tensor) -> torch.Tensor:
    """ComfyUI's IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W) in [-1, 1], as the DC-AE reads images."""
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4):
        raise UserError(f"expected an IMAGE (B, H, W, 3), got shape {tuple(image.shape)}")
    rgb = image[..., :3] if image.shape[-1] != 1 else image.expand(-1, -1, -1, 3)
    return rgb.permute(0, 3, 1, 2).float() * 2 - 1


# ------------------------------------------------------------------------------------------------ the nodes


class SanaModelLoader:
    """A Sana model folder (diffusers layout) or Hub id; empty: the model shipped with the `sana` package."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_path": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "model folder or Hub id; empty: model_folder, else the shipped model",
                    },
                ),
            },
            "optional": {
                "model_folder": ([NO_FOLDER, *host.model_folders()], {"default": NO_FOLDER}),
                "dtype": (list(DTYPES), {"default": "fp32"}),
                "device": (
                    "STRING",
                    {"default": "auto", "tooltip": "auto: ComfyUI's device; or cpu, cuda:1, mps"},
                ),
                "low_memory": (list(LOW_MEMORY), {"default": "off"}),
                "quantize": (
                    [NO_QUANTIZATION, *DIT_MODES],
                    {"default": NO_QUANTIZATION, "tooltip": "the DiT's weights"},
                ),
                "quantize_text_encoder": ([NO_QUANTIZATION, *TEXT_ENCODER_MODES], {"default": NO_QUANTIZATION}),
            },
        }

    RETURN_TYPES = ("SANA_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a Sana model (transformer, DC-AE, text encoder) once; it stays loaded across runs."

    @classmethod
    def VALIDATE_INPUTS(cls, model_path=""):
        return validation(check_model_path, model_path)

    def load(
        self,
        model_path,
        model_folder=NO_FOLDER,
        dtype="fp32",
        device="auto",
        low_memory="off",
        quantize=NO_QUANTIZATION,
        quantize_text_encoder=NO_QUANTIZATION,
    ):
        from sana.pretrained import default_model

        check_model_path(model_path)
        if low_memory not in LOW_MEMORY:
            raise UserError(f"low_memory must be one of {', '.join(LOW_MEMORY)}, got {low_memory!r}")
        source = model_source(model_path, model_folder) or str(default_model())
        where = host.default_device() if device.strip() in ("", "auto") else torch.device(device.strip())
        pipe = SanaPipeline.from_pretrained(
            source,
            dtype=dtype,
            device=where,
            offload=LOW_MEMORY[low_memory],
            quantize=None if quantize == NO_QUANTIZATION else quantize,
            quantize_text_encoder=None if quantize_text_encoder == NO_QUANTIZATION else quantize_text_encoder,
        )
        modules = {"transformer": pipe.transformer, "vae": pipe.vae, "text_encoder": pipe.text_encoder.model}
        resident = {name: m for name, m in modules.items() if name not in pipe.placement.offloaded}
        return (SanaModel(pipe, source, host.register(resident, pipe.device)),)


class SanaLoraLoader:
    """Adds a LoRA to the model for the samplers that use this output; other branches keep the plain model."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SANA_MODEL",),
                "lora_path": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "pytorch_lora_weights.safetensors, its folder, or a name in models/loras",
                    },
                ),
                "strength": ("FLOAT", {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.05}),
            }
        }

    RETURN_TYPES = ("SANA_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, lora_path=""):
        return validation(lora_location, lora_path)

    def load(self, model, lora_path, strength):
        path = lora_location(lora_path)
        layers = read_lora(path)
        # Check that it fits this transformer now, so a wrong file fails on this node: a merge at strength 0
        # checks every layer and changes no weight (w + 0 * update is w), and is removed at once.
        merge_lora(model.pipe.transformer, layers, 0.0).remove()
        lora = AppliedLoRA(path, float(strength), layers)
        return (dataclasses.replace(model, loras=(*model.loras, lora)),)


class SanaTextEncode:
    """A prompt through the model's text encoder (Gemma), with the instruction prefix the model folder declares."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SANA_MODEL",),
                "text": ("STRING", {"multiline": True, "dynamicPrompts": True}),
            },
            "optional": {
                "instruction": (
                    list(INSTRUCTIONS),
                    {
                        "default": "model",
                        "tooltip": "model: as the model folder declares; off; custom: the text below",
                    },
                ),
                "custom_instruction": ("STRING", {"multiline": True, "default": ""}),
            },
        }

    RETURN_TYPES = ("SANA_CONDITIONING",)
    RETURN_NAMES = ("conditioning",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, text, instruction="model", custom_instruction=""):
        encoder: TextEncoder = model.pipe.text_encoder
        if instruction == "off":
            encoder = TextEncoder(encoder.model, encoder.tokenizer, None, encoder.max_length)
        elif instruction == "custom":
            if not custom_instruction:
                raise UserError("instruction is 'custom' but custom_instruction is empty")
            encoder = TextEncoder(encoder.model, encoder.tokenizer, custom_instruction, encoder.max_length)
        elif instruction != "model":
            raise UserError(f"instruction must be one of {', '.join(INSTRUCTIONS)}, got {instruction!r}")
        model.ready("text_encoder")
        with torch.no_grad(), model.pipe.placement.use("text_encoder", encoder) as enc:
            positive, negative = enc.encode([text]), enc.encode_unconditional([text])
        return (SanaConditioning(text, positive.to("cpu"), negative.to("cpu")),)


class SanaControlNetLoader:
    """A Sana ControlNet folder (or Hub id) for this model: loaded on its device, in its dtype."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SANA_MODEL",),
                "controlnet_path": (
                    "STRING",
                    {"default": "", "tooltip": "ControlNet folder, its parent, or a Hub id"},
                ),
            }
        }

    RETURN_TYPES = ("SANA_CONTROLNET",)
    RETURN_NAMES = ("control_net",)
    FUNCTION = "load"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, controlnet_path=""):
        def check(text):
            if not text.strip():
                raise UserError("controlnet_path is empty")
            check_model_path(host.named_file("controlnet", text.strip()) or text)

        return validation(check, controlnet_path)

    def load(self, model, controlnet_path):
        from sana.config import read_config
        from sana.pretrained import controlnet_dir
        from sana.weights import CONFIG_NAME, load_model

        folder = controlnet_dir(host.named_file("controlnet", controlnet_path.strip()) or controlnet_path.strip())
        pipe = model.pipe
        read_config(SanaControlNet.config_class, folder / CONFIG_NAME).check_fits(pipe.transformer.config)
        controlnet = load_model(SanaControlNet, folder, dtype=pipe.dtype, device=pipe.device)
        return (SanaControl(controlnet, str(folder), host.register({"controlnet": controlnet}, pipe.device)),)


class SanaControlNetApply:
    """Attaches a ControlNet and its image to a conditioning; the sampler steers every guidance branch with it."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "positive": ("SANA_CONDITIONING",),
                "control_net": ("SANA_CONTROLNET",),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.05}),
            }
        }

    RETURN_TYPES = ("SANA_CONDITIONING",)
    RETURN_NAMES = ("positive",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY

    def apply(self, positive, control_net, image, strength):
        if not math.isfinite(strength):
            raise UserError(f"strength must be a finite number, got {strength!r}")
        control = ControlInput(control_net, image_pixels(image).cpu(), float(strength))
        return (dataclasses.replace(positive, control=control),)


class SanaEmptyLatent:
    """An empty LATENT of the model's shape: (batch, 32, height/32, width/32) for the published models."""

    @classmethod
    def INPUT_TYPES(cls):
        side = {"default": 1024, "min": SIZE_MULTIPLE, "max": MAX_SIDE, "step": SIZE_MULTIPLE}
        return {
            "required": {
                "width": ("INT", dict(side)),
                "height": ("INT", dict(side)),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 4096}),
            },
            "optional": {"model": ("SANA_MODEL", {"tooltip": "latent channels and compression from this model"})},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, width=1024, height=1024, batch_size=1):
        def check(width, height, batch_size):
            check_size("width", width)
            check_size("height", height)
            if max(width, height) > MAX_SIDE:
                raise UserError(f"width and height must be at most {MAX_SIDE}, got {width}x{height}")
            if not isinstance(batch_size, int) or batch_size < 1:
                raise UserError(f"batch_size must be >= 1, got {batch_size!r}")

        return validation(check, width, height, batch_size)

    def generate(self, width, height, batch_size, model=None):
        channels, f = (
            (32, 32) if model is None else (model.pipe.facts.latent_channels, model.pipe.facts.compression)
        )
        for name, value in (("width", width), ("height", height)):
            check_size(name, value, math.lcm(SIZE_MULTIPLE, f))
        return ({"samples": torch.zeros(batch_size, channels, height // f, width // f)},)


class SanaSampler:
    """Samples a LATENT with the project's samplers, guidance and noise; denoise < 1 starts from the latent."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("SANA_MODEL",),
                "positive": ("SANA_CONDITIONING",),
                "negative": ("SANA_CONDITIONING",),
                "latent_image": ("LATENT",),
                "seed": ("INT", {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 1000}),
                "cfg": ("FLOAT", {"default": 4.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (list(SAMPLER_NAMES), {"default": "flow_dpm_solver"}),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.01, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "pag_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1}),
                "pag_layers": (
                    "STRING",
                    {"default": "0", "tooltip": "blocks perturbed by PAG, e.g. '8' or '7, 8'"},
                ),
                "flow_shift": (
                    "FLOAT",
                    {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.1, "tooltip": "0: the model's"},
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    CATEGORY = CATEGORY

    @classmethod
    def VALIDATE_INPUTS(cls, pag_layers="0"):
        return validation(parse_layers, pag_layers)

    def sample(
        self,
        model,
        positive,
        negative,
        latent_image,
        seed,
        steps,
        cfg,
        sampler_name,
        denoise,
        pag_scale=0.0,
        pag_layers="0",
        flow_shift=0.0,
        unique_id=None,
    ):
        pipe: SanaPipeline = model.pipe
        if sampler_name not in SAMPLER_NAMES:
            raise UserError(f"sampler_name must be one of {', '.join(SAMPLER_NAMES)}, got {sampler_name!r}")
        if not 0 < denoise <= 1:
            raise UserError(f"denoise must be in (0, 1], got {denoise!r}")
        samples = latent_image["samples"]
        n, channels, h, w = samples.shape
        if channels != pipe.facts.latent_channels:
            raise UserError(
                f"the latent has {channels} channels, this model's have {pipe.facts.latent_channels}: make it "
                "with SanaEmptyLatent (its model input) or SanaVAEEncode of the same model"
            )
        # Image i of the batch is drawn from seed + i (as `sana generate --seed` numbers its images); a latent
        # picked out of a batch (ComfyUI's batch_index) keeps its number.
        index = latent_image.get("batch_index") or list(range(n))
        f = pipe.facts.compression
        plan = pipe.plan(
            [positive.text],
            negative_prompt=negative.text,
            height=h * f,
            width=w * f,
            steps=steps,
            guidance_scale=cfg,
            sampler=SAMPLER_NAMES[sampler_name],
            seed=[seed + int(i) for i in index],
            images_per_prompt=n,
            use_resolution_binning=False,  # the latent's size is the size
            pag_scale=pag_scale,
            pag_layers=parse_layers(pag_layers),
            vae_tile=None,
        )
        s = plan.settings
        if flow_shift < 0 or not math.isfinite(flow_shift):
            raise UserError(f"flow_shift must be >= 0 (0: the model's), got {flow_shift!r}")
        scheduler = (
            dataclasses.replace(pipe.scheduler, flow_shift=flow_shift) if flow_shift > 0 else pipe.scheduler
        )
        device, dtype = pipe.device, pipe.dtype
        control = positive.control
        mask = latent_image.get("noise_mask")

        with torch.no_grad():
            guidance = None
            if pipe.transformer.config.guidance_embeds:
                guidance = sprint_guidance(plan, pipe.transformer.config.guidance_embeds_scale, device)
            cond = positive.conditioning("positive", n, pipe, guidance)
            uncond = negative.conditioning("negative", n, pipe, guidance) if plan.cfg else None
            net = dit_model(pipe.transformer, device, dtype)
            ready = ["transformer"]
            if control is not None:
                pixels = image_tensor(control.pixels, h * f, w * f, what="control image").tensor
                if pixels.shape[0] not in (1, n):
                    raise UserError(f"got {pixels.shape[0]} control images for a batch of {n}: give 1 or {n}")
                model.ready("vae")
                latent = pipe.encode_control(pixels.repeat_interleave(n // pixels.shape[0], 0), plan)
                cond = dataclasses.replace(cond, control=latent)
                uncond = None if uncond is None else dataclasses.replace(uncond, control=latent)
                net = controlled_model(net, control.control.controlnet, control.scale, device, dtype)
                host.load(list(control.control.patchers.values()))
            velocity = guided_velocity(
                net, cond, uncond, scale=s.guidance_scale, pag_scale=s.pag_scale, pag_layers=s.pag_layers
            )
            generators = seeded_generators(plan.seed, plan.n)
            noise = initial_noise(generators, plan.n, plan.latent_shape).to(device)
            schedule = model_schedule(s.sampler, s.steps, scheduler, pipe.transformer)
            init = samples.to(device, torch.float32) if denoise < 1 or mask is not None else None
            x, schedule = start_latents(schedule, noise, init, float(denoise))

            report = host.step_reporter(schedule.steps, unique_id)

            def callback(info):
                report(info.index + 1)  # the progress bar, and ComfyUI's Interrupt between steps

            if mask is not None:
                keep = latent_keep(noise_mask(mask, n), plan.sample_size, f).to(device)
                callback = hold_kept_region(schedule, init, noise, keep, then=callback)
            model.ready(*ready)
            with model.loras_merged():
                final = SAMPLERS[s.sampler].run(velocity, x, schedule, generator=generators, callback=callback)
        out = dict(latent_image)
        out["samples"] = final.float().cpu()
        return (out,)


def noise_mask(mask: torch.Tensor, n: int) -> torch.Tensor:
    """ComfyUI's noise_mask ((H, W), (B, H, W) or (B, 1, H, W); 1 = repaint) as (n, 1, H, W)."""
    mask = mask.float().cpu()
    mask = mask.reshape(-1, 1, *mask.shape[-2:])
    if mask.shape[0] not in (1, n):
        raise UserError(f"the noise mask has {mask.shape[0]} rows for a batch of {n}: give 1 or {n}")
    return mask.expand(n, -1, -1, -1)


class SanaVAEDecode:
    """LATENT -> IMAGE with the model's DC-AE; in tiles (the same image) when one pass would not fit in memory."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("SANA_MODEL",), "samples": ("LATENT",)}}

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "decode"
    CATEGORY = CATEGORY

    def decode(self, model, samples):
        pipe: SanaPipeline = model.pipe
        latents = samples["samples"]
        f = pipe.facts.compression
        if latents.ndim != 4 or latents.shape[1] != pipe.facts.latent_channels:
            raise UserError(
                f"expected a LATENT (B, {pipe.facts.latent_channels}, h, w) of this model, "
                f"got {tuple(latents.shape)}"
            )
        model.ready("vae")
        # As the pipeline decides: one pass when the decode fits in the memory free on the device, else tiles.
        b, _, h, w = latents.shape
        tile = vae_tile_for("auto", pipe.vae, b, h * f, w * f, pipe.placement.headroom())
        with torch.no_grad(), pipe.placement.use("vae", pipe.vae) as vae:
            images = vae.decode(latents.to(pipe.device, pipe.placement.decode_dtype), tile=tile).float()
        # (B, 3, H, W) in [-1, 1] -> ComfyUI's (B, H, W, 3) in [0, 1]
        return ((images * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu(),)


class SanaVAEEncode:
    """IMAGE -> LATENT with the model's DC-AE (for img2img: SanaSampler with denoise < 1)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("SANA_MODEL",), "pixels": ("IMAGE",)}}

    RETURN_TYPES = ("LATENT",)
    FUNCTION = "encode"
    CATEGORY = CATEGORY

    def encode(self, model, pixels):
        pipe: SanaPipeline = model.pipe
        image = image_pixels(pixels)
        h, w = image.shape[-2:]
        multiple = math.lcm(SIZE_MULTIPLE, pipe.facts.compression)
        if h % multiple or w % multiple:
            raise UserError(
                f"image {w}x{h} is not a multiple of {multiple} on each side: resize it first (e.g. ImageScale)"
            )
        model.ready("vae")
        with torch.no_grad(), pipe.placement.use("vae", pipe.vae) as vae:
            latent = vae.encode(image.to(pipe.device, pipe.placement.decode_dtype)).float()
        return ({"samples": latent.cpu()},)


NODE_CLASS_MAPPINGS = {
    "SanaModelLoader": SanaModelLoader,
    "SanaLoraLoader": SanaLoraLoader,
    "SanaTextEncode": SanaTextEncode,
    "SanaControlNetLoader": SanaControlNetLoader,
    "SanaControlNetApply": SanaControlNetApply,
    "SanaEmptyLatent": SanaEmptyLatent,
    "SanaSampler": SanaSampler,
    "SanaVAEDecode": SanaVAEDecode,
    "SanaVAEEncode": SanaVAEEncode,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "SanaModelLoader": "Sana Model Loader",
    "SanaLoraLoader": "Sana LoRA Loader",
    "SanaTextEncode": "Sana Text Encode",
    "SanaControlNetLoader": "Sana ControlNet Loader",
    "SanaControlNetApply": "Sana ControlNet Apply",
    "SanaEmptyLatent": "Sana Empty Latent",
    "SanaSampler": "Sana Sampler",
    "SanaVAEDecode": "Sana VAE Decode",
    "SanaVAEEncode": "Sana VAE Encode",
}
