"""Exponential moving average of the weights: ema <- decay * ema + (1 - decay) * theta after every step.

Samples from the EMA weights are typically cleaner than from the live ones, which still carry the noise of
the last updates (DiT, PixArt and Sana all evaluate the EMA). The EMA is kept as a name -> tensor dict of the
same kind as the parameters (plain tensors, or DTensor shards under FSDP2, so each rank averages only its own
slice), in float32 whatever the training dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from sana.training.distributed import full_tensor


def init_ema(model: nn.Module) -> dict[str, torch.Tensor]:
    """A float32 copy of every trainable parameter, keyed by its name in the unwrapped model."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * params, in place (one fused foreach lerp)."""
    params = dict(model.named_parameters())
    names = list(ema)
    targets = [ema[n] for n in names]
    sources = [params[n].detach().to(targets[0].dtype) for n in names]
    torch._foreach_lerp_(targets, sources, 1.0 - decay)


def full_ema_state(ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whole CPU tensors (gathered from every rank under FSDP2: call it on all ranks)."""
    return {name: full_tensor(t).cpu() for name, t in ema.items()}


@torch.no_grad()
def load_ema(ema: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Fill `ema` from whole tensors (a checkpoint); under FSDP2 each rank keeps its own shard."""
    missing = sorted(set(ema) - set(state))
    if missing:
        raise ValueError(f"EMA state lacks {len(missing)} parameter(s), e.g. {missing[0]}")
    for name, target in ema.items():
        source = state[name]
        if hasattr(target, "device_mesh"):  # DTensor: slice the full tensor the way the parameter is sharded
            from torch.distributed.tensor import distribute_tensor

            source = distribute_tensor(source.to(target.device), target.device_mesh, target.placements)
            target.to_local().copy_(source.to_local())
        else:
            target.copy_(source)
