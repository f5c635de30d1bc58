"""What the pack asks of the ComfyUI it runs in, in one place, every part optional.

Inside ComfyUI these functions reach its modules (`comfy.utils`, `comfy.model_management`,
`comfy.model_patcher`, `folder_paths`); imported as plain Python (tests, scripts) the same calls do the plain
thing: no progress bar, no interruption, the CPU, no model folders. The modules are looked up at each call
rather than imported once, so the pack imports without ComfyUI and a test can put stand-ins in `sys.modules`.

Memory. ComfyUI keeps a node's outputs until the graph changes or it is told to free memory (the Manager's
"Free model and node cache", POST /free). A loaded model lives in the loader's output and nowhere else, so
ComfyUI's cache is what keeps it loaded across runs and dropping the cache frees it. Its GPU memory is handed
to ComfyUI's model manager as one `ModelPatcher` per resident component: before a node uses a component it asks
`load_models_gpu` for it (which moves it back if ComfyUI had offloaded it to make room for another model), and
"Unload models" or another model's need moves it to ComfyUI's offload device, as for ComfyUI's own models.
The manager holds patchers weakly, so registering a model does not keep it alive.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch


def comfy_module(name: str) -> ModuleType | None:
    """ComfyUI's module `name`, or None outside ComfyUI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


# ---------------------------------------------------------------------------------------- progress, interrupt


def step_reporter(total: int, node_id: str | None = None) -> Callable[[int], None]:
    """A function to call after each of `total` steps with the number done: it moves the node's progress bar in
    ComfyUI's page and raises ComfyUI's interruption (the Interrupt button) between steps."""
    utils = comfy_module("comfy.utils")
    management = comfy_module("comfy.model_management")
    bar = utils.ProgressBar(total, node_id=node_id) if utils is not None else None

    def report(done: int) -> None:
        if bar is not None:
            bar.update_absolute(done, total)
        if management is not None:
            management.throw_exception_if_processing_interrupted()

    return report


# --------------------------------------------------------------------------------------------------- devices


def default_device() -> torch.device:
    """ComfyUI's compute device (what its --cpu / --cuda-device options chose), else the CPU."""
    management = comfy_module("comfy.model_management")
    return management.get_torch_device() if management is not None else torch.device("cpu")


class SanaComponent(torch.nn.Module):
    """A model component as ComfyUI's ModelPatcher manages it. The patcher writes its bookkeeping attributes
    (`device`, loaded sizes) onto the module it is given, which a transformers model refuses (its `device` is a
    read-only property), so it is given this holder instead; moving the holder moves the component."""

    def __init__(self, component: torch.nn.Module) -> None:
        super().__init__()
        self.component = component


def register(modules: dict[str, torch.nn.Module], device: torch.device) -> dict[str, object]:
    """One ComfyUI ModelPatcher per module resident on `device` (component name -> patcher); {} outside
    ComfyUI."""
    patcher = comfy_module("comfy.model_patcher")
    management = comfy_module("comfy.model_management")
    if patcher is None or management is None:
        return {}
    offload = management.unet_offload_device()
    return {
        name: patcher.ModelPatcher(SanaComponent(module), load_device=device, offload_device=offload)
        for name, module in modules.items()
    }


def load(patchers: list[object]) -> None:
    """Make sure these registered components are on their device (ComfyUI may have offloaded them)."""
    management = comfy_module("comfy.model_management")
    if management is not None and patchers:
        # force_full_load: our modules are plain torch layers, which ComfyUI cannot run partly offloaded.
        management.load_models_gpu(patchers, force_full_load=True)


# ----------------------------------------------------------------------------------------------- model files


def _model_roots() -> list[Path]:
    """ComfyUI's models/sana and its diffusers folders; [] outside ComfyUI."""
    paths = comfy_module("folder_paths")
    if paths is None:
        return []
    roots = [os.path.join(paths.models_dir, "sana")]
    with contextlib.suppress(KeyError, AttributeError):  # a ComfyUI without a "diffusers" folder kind
        roots += list(paths.get_folder_paths("diffusers"))
    return [Path(root) for root in roots]


def model_folders() -> list[str]:
    """Sana model folders (diffusers layout: a model_index.json) under ComfyUI's models/sana and
    models/diffusers, as names relative to those, sorted; [] outside ComfyUI."""
    found = set()
    for root in _model_roots():
        if root.is_dir():
            found |= {str(p.parent.relative_to(root)) for p in root.glob("*/model_index.json")}
            found |= {str(p.parent.relative_to(root)) for p in root.glob("*/*/model_index.json")}
    return sorted(found)


def model_folder_path(name: str) -> str | None:
    """The full path of a name listed by `model_folders`, or None."""
    for root in _model_roots():
        candidate = root / name
        if (candidate / "model_index.json").is_file():
            return str(candidate)
    return None


def named_file(kind: str, name: str) -> str | None:
    """The full path of `name` in ComfyUI's model folder `kind` (e.g. "loras", "controlnet"), or None."""
    paths = comfy_module("folder_paths")
    if paths is None or not name:
        return None
    try:
        return paths.get_full_path(kind, name)
    except (KeyError, AttributeError):
        return None
