"""What the ComfyUI node tests share: tiny model folders, a LoRA, stand-ins for the parts of ComfyUI the pack
calls, stand-ins for the core nodes the example workflows use, and a small runner for API-format workflows.

The stand-ins are test doubles, not ComfyUI: they record what the pack asks (progress, interruption, model
loading) and mimic only the behaviour the tests need. tests/comfyui/test_integration.py runs the same workflows
in a real ComfyUI when one is available.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from PIL import Image

from sana.lora import LoRALayer, save_lora
from sana.models.dcae import DCAE, DCAE_PRESETS
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.pretrained import SchedulerSpec, save_components, shipped_model
from sana.tiny import TINY_TEXT_HIDDEN, tiny_components

WORKFLOWS = Path(__file__).resolve().parents[2] / "comfyui" / "workflows"
EXAMPLES = ("text_to_image", "4k", "sprint_2_steps", "img2img", "lora")
PROMPT = "a red circle above a blue square"

# ------------------------------------------------------------------------------------------------- models


def perturbed(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Every weight moved by Gaussian noise (zero-initialised outputs included), so a random model draws."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def tiny_folder(root: Path) -> Path:
    """The tiny random model (4 latent channels, 4x DC-AE) in the diffusers layout."""
    return save_components(tiny_components(seed=0), root)


def sprint_folder(root: Path) -> Path:
    """A tiny random Sana-Sprint folder: guidance embedded in the DiT, qk-norm, the SCM (TrigFlow) scheduler."""
    parts = tiny_components(seed=2)
    config = dataclasses.replace(parts.transformer.config, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    parts.transformer = perturbed(SanaDiT(config), seed=3)
    parts.scheduler = SchedulerSpec(sampler="scm")
    return save_components(parts, root)


# A 32x DC-AE at toy widths: the published latent format (32 channels, H/32 x W/32) in a few thousand weights.
TINY_F32 = dataclasses.replace(
    DCAE_PRESETS["tiny"],
    latent_channels=32,
    encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
    encoder_block_out_channels=(4, 4, 8, 8, 16, 32),
    decoder_block_out_channels=(4, 4, 8, 8, 16, 32),
    encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
    decoder_layers_per_block=(0, 1, 1, 1, 1, 1),
    encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
    decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
)


def tiny_4k_folder(root: Path) -> Path:
    """A tiny random model with the 4K models' loading-relevant config: native latent side 128 (4096 px with
    the 32x DC-AE), 2-D sin-cos positions at interpolation scale 2, the 4096 px aspect-ratio table."""
    parts = tiny_components(seed=4)
    config = dataclasses.replace(
        DIT_PRESETS["tiny"],
        in_channels=32,
        out_channels=32,
        caption_channels=TINY_TEXT_HIDDEN,
        sample_size=128,
        interpolation_scale=2.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        parts.transformer = perturbed(SanaDiT(config), seed=5)
        parts.vae = DCAE(TINY_F32).eval()
    return save_components(parts, root)


def random_lora(transformer: SanaDiT, path: Path, seed: int = 0, rank: int = 2, std: float = 0.3) -> Path:
    """A LoRA over every attention and feed-forward projection of `transformer`, big enough to change the image;
    written as RUN/lora/pytorch_lora_weights.safetensors is."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.") and "attn" in name:
            out_features, in_features = module.weight.shape
            down = torch.randn(rank, in_features, generator=g) * std
            up = torch.randn(out_features, rank, generator=g) * std
            layers[name] = LoRALayer(down, up)
    assert layers, "the transformer has no attention projections to adapt"
    path.mkdir(parents=True, exist_ok=True)
    return save_lora(path, layers)


def shipped() -> Path:
    model = shipped_model()
    assert model is not None, "these tests need the shipped model (sana/assets/shapes-model)"
    return model


def example_image(path: Path, size: int = 256) -> Path:
    """A deterministic picture (colour gradients and a disc) as an 8-bit RGB PNG."""
    y, x = np.mgrid[0:size, 0:size] / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.05)[..., None]
    rgb = np.stack([x, y, 1 - x * y], axis=-1) * (1 - disc) + np.array([0.9, 0.2, 0.1]) * disc
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(path)
    return path


# ---------------------------------------------------------------------------------------- ComfyUI doubles


class Interrupted(Exception):
    """The stand-in for comfy.model_management.InterruptProcessingException."""


class FakeComfy:
    """Stand-ins for comfy.utils, comfy.model_management, comfy.model_patcher and folder_paths, recording what
    the pack asks. `interrupt_at`: the progress value after which the Interrupt button is "pressed"."""

    def __init__(self, models_dir: Path) -> None:
        self.models_dir = models_dir
        self.progress: list[tuple[str | None, int, int]] = []
        self.loads: list[list[Any]] = []
        self.interrupt_at: int | None = None
        self.interrupted = False

    def modules(self) -> dict[str, ModuleType]:
        fake = self
        comfy, utils = ModuleType("comfy"), ModuleType("comfy.utils")
        management, patcher, paths = (
            ModuleType("comfy.model_management"),
            ModuleType("comfy.model_patcher"),
            ModuleType("folder_paths"),
        )

        class ProgressBar:
            def __init__(self, total, node_id=None):
                self.total, self.node_id = total, node_id

            def update_absolute(self, value, total=None, preview=None):
                fake.progress.append((self.node_id, value, total or self.total))
                if fake.interrupt_at is not None and value >= fake.interrupt_at:
                    fake.interrupted = True

        def throw_exception_if_processing_interrupted():
            if fake.interrupted:
                fake.interrupted = False
                raise Interrupted()

        class ModelPatcher:
            def __init__(self, model, load_device, offload_device):
                self.model, self.load_device, self.offload_device = model, load_device, offload_device

        utils.ProgressBar = ProgressBar
        management.throw_exception_if_processing_interrupted = throw_exception_if_processing_interrupted
        management.InterruptProcessingException = Interrupted
        management.get_torch_device = lambda: torch.device("cpu")
        management.unet_offload_device = lambda: torch.device("cpu")
        management.load_models_gpu = lambda models, **kw: fake.loads.append(list(models))
        patcher.ModelPatcher = ModelPatcher
        paths.models_dir = str(self.models_dir)
        paths.get_folder_paths = lambda kind: [str(self.models_dir / kind)]

        def get_full_path(kind, name):
            path = self.models_dir / kind / name
            return str(path) if path.exists() else None

        paths.get_full_path = get_full_path
        comfy.utils, comfy.model_management, comfy.model_patcher = utils, management, patcher
        return {
            "comfy": comfy,
            "comfy.utils": utils,
            "comfy.model_management": management,
            "comfy.model_patcher": patcher,
            "folder_paths": paths,
        }

    def install(self, monkeypatch) -> FakeComfy:
        for name, module in self.modules().items():
            monkeypatch.setitem(sys.modules, name, module)
        return self


# ------------------------------------------------------------------------------- core nodes, as stand-ins


class LoadImage:
    """ComfyUI's LoadImage for an RGB file in its input folder: IMAGE (1, H, W, 3) = pixels / 255, and a MASK."""

    def __init__(self, input_dir: Path) -> None:
        self.input_dir = input_dir

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"image": ("STRING",)}}

    FUNCTION = "load_image"

    def load_image(self, image):
        rgb = np.array(Image.open(self.input_dir / image).convert("RGB"), dtype=np.float32) / 255.0
        tensor = torch.from_numpy(rgb)[None]
        return tensor, torch.zeros(tensor.shape[1:3])


class ImageScale:
    """ComfyUI's ImageScale with upscale_method "lanczos" (PIL's, per image) and crop "center"/"disabled"."""

    @classmethod
    def INPUT_TYPES(cls):
        methods = ["nearest-exact", "bilinear", "area", "bicubic", "lanczos"]
        return {
            "required": {
                "image": ("IMAGE",),
                "upscale_method": (methods,),
                "width": ("INT",),
                "height": ("INT",),
                "crop": (["disabled", "center"],),
            }
        }

    FUNCTION = "upscale"

    def upscale(self, image, upscale_method, width, height, crop):
        assert upscale_method == "lanczos", "the stand-in scales with lanczos only"
        out = []
        for row in image:
            h, w = row.shape[:2]
            if crop == "center":
                old, new = w / h, width / height
                if old > new:
                    x = round((w - w * new / old) / 2)
                    row = row[:, x : w - x]
                elif old < new:
                    y = round((h - h * old / new) / 2)
                    row = row[y : h - y]
            pil = Image.fromarray((row.numpy() * 255).clip(0, 255).round().astype(np.uint8))
            scaled = np.array(pil.resize((width, height), Image.Resampling.LANCZOS), dtype=np.float32) / 255
            out.append(torch.from_numpy(scaled))
        return (torch.stack(out),)


class SaveImage:
    """ComfyUI's SaveImage without the file: the 8-bit pictures it would write (255 x value, truncated)."""

    def __init__(self) -> None:
        self.saved: list[np.ndarray] = []

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "filename_prefix": ("STRING", {"default": "ComfyUI"})}}

    FUNCTION = "save_images"
    OUTPUT_NODE = True

    def save_images(self, images, filename_prefix="ComfyUI"):
        for image in images:
            self.saved.append(np.clip(255.0 * image.cpu().numpy(), 0, 255).astype(np.uint8))
        return ()


class SetLatentNoiseMask:
    """ComfyUI's SetLatentNoiseMask: the mask (1 = repaint) stored in the latent as (B, 1, H, W)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"samples": ("LATENT",), "mask": ("MASK",)}}

    FUNCTION = "set_mask"

    def set_mask(self, samples, mask):
        out = dict(samples)
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


def core_nodes(input_dir: Path) -> dict[str, Any]:
    """class_type -> a node instance factory, for the core nodes the example workflows use."""
    return {
        "LoadImage": lambda: LoadImage(input_dir),
        "ImageScale": ImageScale,
        "SaveImage": SaveImage,
        "SetLatentNoiseMask": SetLatentNoiseMask,
    }


# ------------------------------------------------------------------------------------------ the workflows


def load_workflow(name: str, form: str = "api") -> dict[str, Any]:
    return json.loads((WORKFLOWS / f"{name}.{form}.json").read_text(encoding="utf-8"))


def run_workflow(
    api: dict[str, Any], classes: dict[str, Any], outputs: list[str] | None = None
) -> tuple[dict[str, Any], dict[str, tuple]]:
    """Execute an API-format workflow as ComfyUI does, in plain Python: each node's VALIDATE_INPUTS on its
    constant inputs first, then every output node's inputs depth first (or only `outputs` and what they need),
    under torch.inference_mode (as ComfyUI's executor). Returns node id -> the node instance (a SaveImage holds
    its pictures) and node id -> the outputs of every node that ran."""
    instances = {node_id: classes[node["class_type"]]() for node_id, node in api.items()}
    for node_id, node in api.items():
        cls = type(instances[node_id])
        check = getattr(cls, "VALIDATE_INPUTS", None)
        if check is not None:
            names = check.__code__.co_varnames[1 : check.__code__.co_argcount]
            constants = {k: v for k, v in node["inputs"].items() if k in names and not isinstance(v, list)}
            verdict = check(**constants)
            if verdict is not True:
                raise ValueError(f"node {node_id} ({node['class_type']}) failed validation: {verdict}")
    results: dict[str, tuple] = {}

    def evaluate(node_id: str) -> tuple:
        if node_id not in results:
            node, instance = api[node_id], instances[node_id]
            kwargs = {}
            for key, value in node["inputs"].items():
                kwargs[key] = evaluate(str(value[0]))[value[1]] if isinstance(value, list) else value
            if "unique_id" in type(instance).INPUT_TYPES().get("hidden", {}):
                kwargs["unique_id"] = node_id
            with torch.inference_mode():
                results[node_id] = getattr(instance, type(instance).FUNCTION)(**kwargs)
        return results[node_id]

    wanted = outputs or [i for i, node in instances.items() if getattr(type(node), "OUTPUT_NODE", False)]
    for node_id in wanted:
        evaluate(node_id)
    return instances, results


WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")


def ui_to_api(ui: dict[str, Any], classes: dict[str, Any]) -> dict[str, Any]:
    """The API form of a UI-format workflow (what ComfyUI's page queues): widget values in the order of each
    node's inputs (required, then optional; a seed's "control after generate" value skipped), links by slot."""
    links = {link[0]: link for link in ui["links"]}  # id -> [id, from node, from slot, to node, to slot, type]
    api = {}
    for node in ui["nodes"]:
        cls = classes[node["type"]]
        spec = cls.INPUT_TYPES() if isinstance(cls, type) else type(cls()).INPUT_TYPES()
        linked = {
            slot["name"]: links[slot["link"]] for slot in node.get("inputs", []) if slot.get("link") is not None
        }
        values = list(node.get("widgets_values", []))
        inputs: dict[str, Any] = {}
        for section in ("required", "optional"):
            for name, (kind, *options) in spec.get(section, {}).items():
                if name in linked:
                    inputs[name] = [str(linked[name][1]), linked[name][2]]
                elif isinstance(kind, list) or kind in WIDGET_TYPES:
                    if not values:
                        continue
                    inputs[name] = values.pop(0)
                    if options and options[0].get("control_after_generate"):
                        values.pop(0)  # "fixed" / "randomize": the page's, not the node's
                    if node["type"] == "LoadImage" and name == "image":
                        values.pop(0)  # the upload button's value
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api
