"""The published aspect-ratio buckets (PixArt/Sana), as data, and the two operations on them.

Each table maps a height/width ratio to the (height, width) the model was trained at for that ratio, all
multiples of 32 with about the same pixel count. Generation snaps a requested size to the nearest bucket,
samples there, then resizes and centre-crops back to the request; training puts each image in its nearest
bucket. The table is chosen by the model's native resolution (latent side x autoencoder compression); for
the published models (32x compression) that is the reference's choice by `sample_size`, and a model of any
other native size simply has no table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _table(spec: str) -> dict[float, tuple[int, int]]:
    out = {}
    for item in spec.split():
        ratio, size = item.split(":")
        h, w = size.split("x")
        out[float(ratio)] = (int(h), int(w))
    return out


_1024 = (
    "0.25:512x2048 0.28:512x1856 0.32:576x1792 0.33:576x1728 0.35:576x1664 0.4:640x1600 0.42:640x1536 "
    "0.48:704x1472 0.5:704x1408 0.52:704x1344 0.57:768x1344 0.6:768x1280 0.68:832x1216 0.72:832x1152 "
    "0.78:896x1152 0.82:896x1088 0.88:960x1088 0.94:960x1024 1.0:1024x1024 1.07:1024x960 1.13:1088x960 "
    "1.21:1088x896 1.29:1152x896 1.38:1152x832 1.46:1216x832 1.67:1280x768 1.75:1344x768 2.0:1408x704 "
    "2.09:1472x704 2.4:1536x640 2.5:1600x640 3.0:1728x576 4.0:2048x512"
)
_2048 = (
    "0.25:1024x4096 0.26:1024x3968 0.27:1024x3840 0.28:1024x3712 0.32:1152x3584 0.33:1152x3456 "
    "0.35:1152x3328 0.4:1280x3200 0.42:1280x3072 0.48:1408x2944 0.5:1408x2816 0.52:1408x2688 0.57:1536x2688 "
    "0.6:1536x2560 0.68:1664x2432 0.72:1664x2304 0.78:1792x2304 0.82:1792x2176 0.88:1920x2176 "
    "0.94:1920x2048 1.0:2048x2048 1.07:2048x1920 1.13:2176x1920 1.21:2176x1792 1.29:2304x1792 "
    "1.38:2304x1664 1.46:2432x1664 1.67:2560x1536 1.75:2688x1536 2.0:2816x1408 2.09:2944x1408 "
    "2.4:3072x1280 2.5:3200x1280 2.89:3328x1152 3.0:3456x1152 3.11:3584x1152 3.62:3712x1024 "
    "3.75:3840x1024 3.88:3968x1024 4.0:4096x1024"
)
ASPECT_RATIO_1024 = _table(_1024)
# The 512 table is the 1024 one halved; the 4096 one is the 2048 one doubled (as published).
ASPECT_RATIO_512 = {r: (h // 2, w // 2) for r, (h, w) in ASPECT_RATIO_1024.items()}
ASPECT_RATIO_2048 = _table(_2048)
ASPECT_RATIO_4096 = {r: (h * 2, w * 2) for r, (h, w) in ASPECT_RATIO_2048.items()}

# Keyed by the model's native image side in pixels.
TABLES_BY_RESOLUTION = {
    512: ASPECT_RATIO_512,
    1024: ASPECT_RATIO_1024,
    2048: ASPECT_RATIO_2048,
    4096: ASPECT_RATIO_4096,
}


def nearest_bucket(height: int, width: int, table: dict[float, tuple[int, int]]) -> tuple[int, int]:
    """The table's (height, width) whose ratio is closest to height / width (first one on ties)."""
    ratio = height / width
    return table[min(table, key=lambda r: abs(r - ratio))]


def resize_and_center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, height, width): bilinear scale until the target is covered, then crop the
    middle. Used to bring a bucket-sized result back to the size the user asked for."""
    h, w = images.shape[-2:]
    if (h, w) == (height, width):
        return images
    scale = max(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[..., top : top + height, left : left + width]
