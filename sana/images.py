"""Decoded tensors -> PIL images that carry their generation parameters, and writing them safely."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from PIL.PngImagePlugin import PngInfo

from sana.errors import UserError, user_path
from sana.weights import atomic_write

PARAMETERS_KEY = "sana:parameters"  # PNG text chunk holding the JSON of how the image was made


def to_pil(images: torch.Tensor, parameters: list[dict[str, Any]]) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> PIL images, rounded as the reference does; each gets its parameters
    in `info`, which `save_image` writes into the PNG."""
    pixels = ((images.float() * 0.5 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    arrays = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
    out = []
    for array, params in zip(arrays, parameters, strict=True):
        image = Image.fromarray(array)
        image.info[PARAMETERS_KEY] = json.dumps(params, sort_keys=True)
        out.append(image)
    return out


def save_image(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG (or any PIL format by suffix) atomically; PNGs keep the generation parameters."""
    path = Path(path)
    info = None
    if path.suffix.lower() == ".png" and PARAMETERS_KEY in image.info:
        info = PngInfo()
        info.add_text(PARAMETERS_KEY, image.info[PARAMETERS_KEY])
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"unknown image format for {path} (use .png, .jpg or .webp)")
    atomic_write(
        path, lambda tmp: image.save(tmp, format=fmt, pnginfo=info) if info else image.save(tmp, format=fmt)
    )
    return path


def read_parameters(path: str | Path) -> dict[str, Any]:
    """The generation parameters stored in a PNG written by `save_image`; a UserError for a file that is
    missing, not an image, or has none."""
    try:
        with user_path(path, "image"), Image.open(path) as image:
            text = image.info.get(PARAMETERS_KEY)
    except UnidentifiedImageError as e:
        raise UserError(f"{path} is not an image PIL can read") from e
    if text is None:
        raise UserError(f"{path} holds no {PARAMETERS_KEY} (it was not written by `sana generate`)")
    return json.loads(text)
