"""LoRA fine-tuning of the DiT through peft (`lora:` in the run config, see LoRAConfig).

    apply_lora(dit, cfg)      peft wraps the targeted linear layers in place; only the LoRA factors train
    split_lora(dit, weights)  a whole state of the wrapped DiT -> (plain DiT weights, LoRA layers)
    merged_weights(...)       plain DiT weights with the LoRA merged in (validation images, `RUN/final`)
    export_lora(...)          `RUN/lora/pytorch_lora_weights.safetensors`, diffusers' format (sana/lora.py)

The wrapped model stays a SanaDiT (peft's `inject_adapter_in_model`, not a PeftModel), so the loop, DDP/FSDP,
gradient checkpointing and checkpoints see the same module; its parameter names gain peft's parts
(`attn1.to_q.base_layer.weight`, `attn1.to_q.lora_A.default.weight`), which is what checkpoints store, so a
LoRA run resumes into a LoRA run with the same targets. The optimizer and the EMA hold only the LoRA factors
(the loop builds both from the parameters that require gradients).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sana.config import ConfigError
from sana.lora import LoRALayer, save_lora
from sana.training.config import LoRAConfig

ADAPTER = "default"  # peft's adapter name; it appears in the parameter names


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> nn.Module:
    """Wrap every linear layer matching cfg.targets with a LoRA branch (B = 0: the model is unchanged at first)
    and freeze everything else. Returns the same module."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("lora.enabled needs the peft package (pip install 'sana[train]')") from None
    matched = [name for name, _ in model.named_modules() if _matches(name, cfg.targets)]
    if not matched:
        raise ConfigError(f"lora.targets {list(cfg.targets)} match no module of the transformer")
    not_linear = [n for n in matched if not isinstance(model.get_submodule(n), nn.Linear)]
    if not_linear:
        raise ConfigError(f"lora.targets must name linear layers; {not_linear[0]} is not one")
    peft_config = LoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank, lora_dropout=cfg.dropout,
        target_modules=list(cfg.targets),
    )  # fmt: skip
    model = inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():  # peft freezes the rest already; make it explicit and certain
        p.requires_grad_(".lora_" in name)
    return model


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    """peft's rule for a list of target names: the dotted path equals a target or ends with '.' + target."""
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """Module path -> alpha / rank of every LoRA-wrapped layer."""
    from peft.tuners.lora import LoraLayer

    return {name: float(m.scaling[ADAPTER]) for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def split_lora(
    model: nn.Module, weights: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, LoRALayer]]:
    """A whole state of the wrapped model (its parameter names) -> (the DiT's own weights, the LoRA layers)."""
    base, layers = {}, {}
    scalings = lora_scalings(model)
    for name, tensor in weights.items():
        if ".lora_" not in name:
            base[name.replace(".base_layer.", ".")] = tensor
    for module, scaling in scalings.items():
        down = weights[f"{module}.lora_A.{ADAPTER}.weight"]
        up = weights[f"{module}.lora_B.{ADAPTER}.weight"]
        layers[module] = LoRALayer(down, up, scaling)
    return base, layers


def merged_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The DiT's own weights (diffusers names) with W + (alpha / rank) * B @ A for every adapted layer."""
    base, layers = split_lora(model, weights)
    for module, layer in layers.items():
        key = f"{module}.weight"
        base[key] = (base[key].float() + layer.delta(base[key].shape)).to(base[key].dtype)
    return base


def export_lora(folder: str | Path, model: nn.Module, weights: dict[str, torch.Tensor]) -> Path:
    """Write the LoRA layers of `weights` as `folder/pytorch_lora_weights.safetensors` (alpha / rank folded into
    lora_B, float32); returns the file."""
    _, layers = split_lora(model, weights)
    layers = {k: LoRALayer(v.down.float(), v.up.float(), v.factor) for k, v in layers.items()}
    return save_lora(folder, layers)
