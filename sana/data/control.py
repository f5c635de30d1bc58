"""Control images made from training images while caching (`sana cache --control NAME`), for ControlNet training.

`PREPROCESSORS` maps a name to a function from an RGB image, uint8 (H, W, 3), to its control image of the same
size, uint8 (H, W, 3). `sana cache` applies it to each image after resizing and cropping, so the control image is
aligned with the latent it conditions, and stores the control image's DC-AE latent beside the image's.

edges: Canny edges (OpenCV) of the colour image, white lines on black, dilated to `EDGE_WIDTH` pixels. OpenCV's
Canny takes, at each pixel, the channel with the largest gradient, so an edge between two colours of nearly equal
brightness (yellow on white, green or orange on gray) is found; on a grey-scale copy it would vanish. The lines
are widened because a one-pixel line hardly survives a 32x DC-AE: its latent decodes to almost nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from sana.errors import UserError

EDGE_THRESHOLDS = (100, 200)  # Canny's hysteresis thresholds on the gradient magnitude (Sobel 3x3)
EDGE_WIDTH = 3  # pixels: the square dilation kernel applied to the one-pixel Canny lines


def _cv2():
    try:
        import cv2
    except ImportError:
        raise UserError("edge maps need OpenCV: pip install opencv-python-headless") from None
    return cv2


def edges(image: np.ndarray, low: int = EDGE_THRESHOLDS[0], high: int = EDGE_THRESHOLDS[1],
          width: int = EDGE_WIDTH) -> np.ndarray:  # fmt: skip
    """Canny edges of an RGB uint8 (H, W, 3) image as a white-on-black RGB uint8 (H, W, 3) image."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"edges needs an RGB uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    cv2 = _cv2()
    lines = cv2.Canny(np.ascontiguousarray(image), low, high)  # (H, W) 0 / 255, max gradient over channels
    if width > 1:
        lines = cv2.dilate(lines, np.ones((width, width), np.uint8))
    return np.repeat(lines[:, :, None], 3, axis=2)


PREPROCESSORS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"edges": edges}


def check_preprocessor(name: str) -> Callable[[np.ndarray], np.ndarray]:
    """The preprocessor called `name`; a one-line UserError naming the choices otherwise."""
    if name not in PREPROCESSORS:
        raise UserError(f"unknown control preprocessor {name!r}; choose from {', '.join(PREPROCESSORS)}")
    return PREPROCESSORS[name]


def apply_to_tensor(name: str, image: torch.Tensor) -> torch.Tensor:
    """Preprocessor `name` on a (3, H, W) image in [-1, 1] (what the loader yields); the result likewise."""
    pixels = image.clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    control = check_preprocessor(name)(pixels)  # (H, W, 3) uint8
    return torch.from_numpy(control).permute(2, 0, 1).float().div(127.5).sub(1)
