"""LoRA weights in diffusers' file format, and merging them into a DiT without peft.

The file is `pytorch_lora_weights.safetensors`, holding for every adapted layer of the transformer

    transformer.<module path>.lora_A.weight    (r, in)    the down projection
    transformer.<module path>.lora_B.weight    (out, r)   the up projection

which is what diffusers' `SanaPipeline.load_lora_weights` reads (module paths are the diffusers names, which
ours are). A LoRA changes a linear layer's weight to W + scale * (alpha / r) * B @ A. The files this project
writes carry no alpha: alpha / r is folded into B when exporting (sana/training/lora.py), and diffusers reading
a file without alphas takes alpha = r, so both read the update as W + scale * B @ A. Files written by other
trainers with diffusers' adapter metadata (`lora_alpha`, `r`, `use_rslora` in the safetensors header) are
read with their alpha.

Merging changes the weights in place (no extra work per step at inference). `merge_lora` returns a
`MergedLoRA` record holding a copy of the weights it changed, and `remove()` puts them back bit for bit, so a
LoRA can be applied for a while and taken off again without reloading the model. Merges stack: merging two
LoRAs adds both updates, and they come off in the reverse order.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sana.errors import MissingFileError, UserError, one_line

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
PREFIX = "transformer."
_METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors header entry (peft LoraConfig kwargs)
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: the update is `factor * up @ down` (factor: alpha / r from the file, 1 if none)."""

    down: torch.Tensor  # lora_A (r, in) or (r, in, 1, 1)
    up: torch.Tensor  # lora_B (out, r) or (out, r, 1, 1)
    factor: float = 1.0

    def delta(self, shape: torch.Size) -> torch.Tensor:
        """The float32 weight update, shaped like the layer's weight."""
        update = self.up.float().flatten(1) @ self.down.float().flatten(1)  # (out, in)
        if update.numel() != math.prod(shape):
            raise UserError(f"LoRA update {tuple(update.shape)} does not fit a weight of shape {tuple(shape)}")
        return (update * self.factor).reshape(shape)


def lora_file(path: str | Path) -> Path:
    """The weights file: `path` itself, or `path/pytorch_lora_weights.safetensors` for a folder."""
    path = Path(path)
    file = path / LORA_WEIGHTS if path.is_dir() else path
    if not file.is_file():
        raise MissingFileError(f"no LoRA weights at {file}")
    return file


def save_lora(folder: str | Path, layers: dict[str, LoRALayer]) -> Path:
    """Write `folder/pytorch_lora_weights.safetensors`, folding each layer's factor into its up projection."""
    from safetensors.torch import save_file

    from sana.weights import atomic_write

    tensors = {}
    for module, layer in sorted(layers.items()):
        tensors[f"{PREFIX}{module}.lora_A.weight"] = layer.down.contiguous()
        tensors[f"{PREFIX}{module}.lora_B.weight"] = (layer.up * layer.factor).to(layer.up.dtype).contiguous()
    path = Path(folder) / LORA_WEIGHTS
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    return path


def read_lora(path: str | Path) -> dict[str, LoRALayer]:
    """The layers of a LoRA file (or folder), keyed by module path inside the transformer."""
    from safetensors import safe_open

    file = lora_file(path)
    try:
        f = safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error types for bad headers and short files
        raise UserError(f"cannot read {file} as safetensors: {one_line(e) or type(e).__name__}") from e
    with f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = f.metadata() or {}
    alpha, rank, rslora = _metadata_scaling(header, file)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
        if match is None:
            raise UserError(
                f"{file}: unexpected key {key!r}; a Sana LoRA holds only "
                f"'{PREFIX}<module>.lora_A.weight' / '.lora_B.weight' (diffusers' peft format)"
            )
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise UserError(f"{file} holds no LoRA weights")
    layers = {}
    for module, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise UserError(f"{file}: {module} has lora_{next(iter(pair))} without its partner")
        r = pair["A"].shape[0]
        factor = 1.0 if alpha is None else alpha / (math.sqrt(r) if rslora else (rank or r))
        layers[module] = LoRALayer(pair["A"], pair["B"], factor)
    return layers


def _metadata_scaling(header: dict[str, str], file: Path) -> tuple[float | None, int | None, bool]:
    """(lora_alpha, r, use_rslora) from diffusers' adapter metadata, or (None, None, False) without it."""
    raw = header.get(_METADATA_KEY)
    if not raw:
        return None, None, False
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UserError(f"{file}: {_METADATA_KEY} is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise UserError(f"{file}: {_METADATA_KEY} must be a JSON object")
    meta = {k.removeprefix(PREFIX): v for k, v in meta.items()}
    if meta.get("alpha_pattern") or meta.get("rank_pattern"):
        # Per-module alphas/ranks are matched by peft's pattern rules; not worth a second implementation.
        raise UserError(f"{file}: LoRA files with per-module alpha_pattern/rank_pattern are not supported")
    alpha = meta.get("lora_alpha")
    return (None if alpha is None else float(alpha)), meta.get("r"), bool(meta.get("use_rslora", False))


@dataclass
class MergedLoRA:
    """What one `merge_lora` changed: the adapted layers and their weights from before the merge.

    `remove()` restores those weights exactly. It refuses when a weight changed again after this merge (a
    later merge not yet removed, training): restoring would silently drop that change, so remove the later
    merges first. The check compares a checksum of each weight with the one taken right after the merge.
    """

    model: nn.Module
    originals: dict[str, torch.Tensor]  # module path -> its weight before the merge (same dtype and device)
    checksums: dict[str, tuple[float, float]]  # module path -> _checksum(weight) right after the merge
    removed: bool = False

    @property
    def modules(self) -> list[str]:
        return sorted(self.originals)

    def __len__(self) -> int:
        return len(self.originals)

    @torch.no_grad()
    def remove(self) -> None:
        if self.removed:
            raise UserError("this LoRA was already removed")
        weights = {m: _target(self.model, m).weight for m in self.originals}
        changed = [m for m, w in weights.items() if _checksum(w) != self.checksums[m]]
        if changed:
            raise UserError(
                f"{len(changed)} adapted weight(s) changed after this LoRA was merged (e.g. {changed[0]}); "
                "remove the LoRAs merged later first"
            )
        for module, weight in weights.items():
            weight.copy_(self.originals[module])
        self.removed = True


@torch.no_grad()
def merge_lora(model: nn.Module, layers: dict[str, LoRALayer], scale: float = 1.0) -> MergedLoRA:
    """W <- W + scale * update for every layer, in place (in float32, stored back in W's dtype).

    Every module path must name a linear layer (or 1x1 convolution) of `model`. Returns the record that
    undoes the merge (`MergedLoRA.remove`).
    """
    for module in layers:  # check everything before changing anything
        target = _target(model, module)
        layers[module].delta(target.weight.shape)
    originals, checksums = {}, {}
    for module, layer in layers.items():
        weight = _target(model, module).weight
        originals[module] = weight.detach().clone()
        weight.copy_((weight.float() + scale * layer.delta(weight.shape).to(weight.device)).to(weight.dtype))
        checksums[module] = _checksum(weight)
    return MergedLoRA(model, originals, checksums)


def _checksum(weight: torch.Tensor) -> tuple[float, float]:
    """Sum and sum of squares in float64: any LoRA update (or training step) changes them."""
    w = weight.detach().double()
    return float(w.sum()), float(w.square().sum())


def _target(model: nn.Module, module: str) -> nn.Module:
    try:
        target = model.get_submodule(module)
    except AttributeError:
        raise UserError(f"the LoRA adapts {module!r}, which this transformer does not have") from None
    is_1x1 = isinstance(target, nn.Conv2d) and target.kernel_size == (1, 1) and target.groups == 1
    if not (isinstance(target, nn.Linear) or is_1x1):
        raise UserError(f"the LoRA adapts {module!r}, a {type(target).__name__}; only linear layers can merge")
    return target
