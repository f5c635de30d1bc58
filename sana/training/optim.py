"""Optimizer construction and the learning-rate schedule.

The schedule is a pure function of the step (nanoGPT's `get_lr`), applied to the param groups before each
optimizer step, so it has no state of its own: resuming at step s reproduces it exactly from s.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sana.config import ConfigError
from sana.training.config import OptimConfig, ScheduleConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices and convolution kernels; never biases, norm weights or the adaLN scale-shift tables.

    Decaying a bias or a norm gain pulls it towards 0 with no regularising benefit, and the scale-shift tables
    are offsets of the modulation, whose neutral value is 0 only by convention.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and not name.endswith("scale_shift_table") else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        betas = tuple(cfg.betas) if cfg.betas else (0.9, 0.999)
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=cfg.eps)
    try:
        from came_pytorch import CAME  # optional: pip install 'sana[train]'
    except ImportError:
        raise ConfigError("optim.name: came needs the came-pytorch package (pip install came-pytorch)") from None
    betas = tuple(cfg.betas) if cfg.betas else (0.9, 0.999, 0.9999)
    return CAME(groups, lr=cfg.lr, betas=betas)


def lr_at(step: int, optim: OptimConfig, schedule: ScheduleConfig, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (1-based): linear warm-up, then constant or cosine decay."""
    if schedule.warmup_steps and step <= schedule.warmup_steps:
        return optim.lr * step / schedule.warmup_steps
    if schedule.decay == "constant":
        return optim.lr
    span = max(1, max_steps - schedule.warmup_steps)
    progress = min(1.0, (step - schedule.warmup_steps) / span)
    return schedule.min_lr + 0.5 * (optim.lr - schedule.min_lr) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
