"""HED edge detector (holistically-nested edge detection, Xie & Tu 2015), as ControlNets are conditioned on it.

A VGG-style trunk of five stages (2, 2, 3, 3, 3 convolutions of 3x3 with ReLU; 64, 128, 256, 512, 512
channels; a 2x2 max-pool before every stage but the first). Each stage ends in a 1x1 "side output" projection
to one channel. The edge map is the sigmoid of the mean of the five side outputs, each upsampled to the input
size. The input is RGB in 0..255 minus a learned per-channel offset (`norm`).

Parameter names are those of the Apache-2.0 HED checkpoint published for ControlNet annotators
(`ControlNetHED.pth`: `norm`, `block{1..5}.convs.{i}.weight/bias`, `block{1..5}.projection.weight/bias`), so
it loads strictly. The published Sana ControlNet was trained on edge maps of this detector.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# (input channels, output channels, convolutions) per stage.
STAGES = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class HEDStage(nn.Module):
    """3x3 conv + ReLU, `depth` times; returns the features and their 1-channel side output."""

    def __init__(self, in_channels: int, out_channels: int, depth: int) -> None:
        super().__init__()
        widths = [in_channels] + [out_channels] * depth
        self.convs = nn.Sequential(
            *(nn.Conv2d(a, b, 3, padding=1) for a, b in zip(widths[:-1], widths[1:], strict=True))
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = F.relu(conv(x))
        return x, self.projection(x)


class HED(nn.Module):
    """forward(rgb (B, 3, H, W) in 0..255) -> edge probability (B, 1, H, W) in (0, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (a, b, depth) in enumerate(STAGES, start=1):
            self.add_module(f"block{i}", HEDStage(a, b, depth))

    def side_outputs(self, rgb: torch.Tensor) -> list[torch.Tensor]:
        """The five (B, 1, H / 2^k, W / 2^k) side outputs (logits), finest first."""
        h = rgb - self.norm
        sides = []
        for i in range(1, len(STAGES) + 1):
            if i > 1:
                h = F.max_pool2d(h, 2)
            h, side = getattr(self, f"block{i}")(h)
            sides.append(side)
        return sides

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        size = rgb.shape[-2:]
        sides = [F.interpolate(s, size=size, mode="bilinear", align_corners=False) for s in self.side_outputs(rgb)]
        return torch.sigmoid(torch.stack(sides).mean(0))  # (B, 1, H, W)
