"""Primitives shared by the model files: RMSNorm, sinusoidal timestep features, the timestep MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = x / rms(x) * w (+ b) over the last dim. The statistic is taken in float32 so bf16/fp16 inputs do
    not lose the mean of squares; the result returns in the input dtype before the affine part."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        y = y * self.weight.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)


def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a (B,) time tensor, cosines first: [cos(t*w_i), sin(t*w_i)],
    w_i = max_period^(-i/(dim/2)). The order and base are what the published checkpoints were trained with."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, dim)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features -> Linear -> SiLU -> Linear. Keys: linear_1, linear_2."""

    def __init__(self, dim: int, freq_dim: int = 256) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        feats = timestep_features(t, self.freq_dim).to(dtype)
        return self.linear_2(F.silu(self.linear_1(feats)))  # (B, dim)
