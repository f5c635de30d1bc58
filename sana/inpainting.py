"""Inpainting: repaint the masked part of an image and keep the rest.

Two things make the kept part the input's:

1. While sampling, after every step, the kept region of the latent is put back on the input's own path:
   the input's latent noised (with the run's noise) to the time the state has reached. The sampler's
   callback returns that blend and the sampler continues from it (`hold_kept_region`), so the repainted
   region is generated in the context of the input, and the kept region ends as the input's latent exactly.
   The pixel mask reaches the latent grid by max-pooling (`latent_keep`): a latent cell that holds any pixel
   to repaint is free, so the repainted pixels are never pinned to the input by a shared cell.
2. After decoding, the picture is composited over the input with the mask feathered by a Gaussian blur
   (`composite`): pixels farther than `feather_reach` from the mask's edge are the input's own values (the
   autoencoder's reconstruction of the kept region is close to the input, not equal to it).

Masks are (B, 1, H, W) in [0, 1], 1 = repaint (sana.image_input.mask_tensor makes them).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter

from sana.aspect_ratios import resize_and_center_crop
from sana.samplers import Callback, Schedule, StepInfo


def latent_keep(mask: torch.Tensor, sample_size: tuple[int, int], compression: int) -> torch.Tensor:
    """(B, 1, h, w) in [0, 1]: how much of each latent cell is held to the input (1 = held), for a repaint
    mask (B, 1, H, W) at the output size, the DiT sampling at `sample_size` pixels with this autoencoder
    compression. The mask follows the image: fitted to the sample size as the image was, then max-pooled."""
    mask = resize_and_center_crop(mask.float(), *sample_size)
    return 1 - F.max_pool2d(mask, compression)


def hold_kept_region(
    schedule: Schedule,
    init: torch.Tensor,
    noise: torch.Tensor,
    keep: torch.Tensor,
    then: Callback | None = None,
) -> Callback:
    """The sampler callback of an inpainting run over `schedule`, started from `init` noised with `noise`
    (sana.generation.start_latents): after step i the state is at schedule.times[i + 1], where the kept
    region becomes `init` noised to that time. `then`, the caller's own callback, sees the blended state and
    may still replace it."""

    def hold(info: StepInfo) -> torch.Tensor:
        target = schedule.noised(init, noise, info.index + 1).to(info.x.device)
        k = keep.to(info.x.device)
        x = k * target + (1 - k) * info.x.float()
        if then is not None:
            replaced = then(dataclasses.replace(info, x=x))
            if replaced is not None:
                return replaced
        return x

    return hold


def default_feather(height: int, width: int) -> float:
    """The feather's Gaussian sigma in pixels: 1/128 of the shorter side, at least 1 (2 px at 256, 8 at 1024)."""
    return max(1.0, min(height, width) / 128)


def feather_reach(sigma: float) -> int:
    """Pixels from a mask's edge beyond which the feathered mask is exactly its unblurred value."""
    return math.ceil(3 * sigma) + 1


def feathered(mask: torch.Tensor, sigma: float) -> torch.Tensor:
    """The mask blurred by a Gaussian of `sigma` pixels, at 8-bit precision (PIL's blur): exact 0 and 1 stay
    exact farther than feather_reach(sigma) from an edge."""
    rows = []
    for row in mask.float().clamp(0, 1).cpu():
        grey = Image.fromarray((row[0] * 255).round().to(torch.uint8).numpy(), "L")
        blurred = np.array(grey.filter(ImageFilter.GaussianBlur(sigma)), dtype=np.float32)
        rows.append(torch.from_numpy(blurred)[None] / 255)
    return torch.stack(rows).to(mask.device)


def composite(
    decoded: torch.Tensor, image: torch.Tensor, mask: torch.Tensor, sigma: float | None = None
) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1]: `decoded` where the feathered mask is 1, the input `image` where it is 0, a
    blend in between. sigma: the feather (None: default_feather of the image size; 0: a hard edge)."""
    h, w = image.shape[-2:]
    sigma = default_feather(h, w) if sigma is None else sigma
    alpha = feathered(mask, sigma) if sigma > 0 else mask.float()
    alpha = alpha.to(decoded.device)
    return image.to(decoded) * (1 - alpha) + decoded * alpha


__all__ = ["composite", "default_feather", "feather_reach", "feathered", "hold_kept_region", "latent_keep"]
