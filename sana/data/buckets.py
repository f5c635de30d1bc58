"""Aspect-ratio buckets for training, and turning encoded image bytes into a bucket-sized tensor.

Each image goes to the bucket of `sana.aspect_ratios.nearest_bucket` (the ratio key closest to height/width)
in the table for the training resolution: the published table for 512, 1024, 2048 and 4096, and for any other
multiple of 32 the 1024 table with both sides scaled by resolution/1024 (so each bucket covers about
resolution² pixels) and rounded half-up to multiples of 32 (at least 32). The bucket is computed from the image
header alone (plus the EXIF orientation, which swaps height and width for rotated photos), before any decode.

Pixels: decode (EXIF-rotated, transparency composited onto white), scale with PIL's bicubic filter (which
antialiases when shrinking) so the image just covers the bucket, and keep the centre; resizing and cropping
are one `resize(box=...)` call so no pixel outside the crop is ever resampled. Large JPEGs are first reduced
in the decoder (`draft`, by 1/2, 1/4 or 1/8, never below the needed size), which is much faster and keeps the
final resize a proper downscale.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana.aspect_ratios import ASPECT_RATIO_1024, TABLES_BY_RESOLUTION, nearest_bucket
from sana.errors import UserError

_ORIENTATION = 0x0112  # EXIF tag; values 5-8 mean the stored image is rotated by 90 or 270 degrees


class BadImage(Exception):
    """An image that cannot be read: missing, not an image, truncated or corrupt."""


def bucket_table(resolution: int) -> dict[float, tuple[int, int]]:
    """ratio -> (height, width) for a training resolution (see the module docstring)."""
    if resolution in TABLES_BY_RESOLUTION:
        return TABLES_BY_RESOLUTION[resolution]
    return scaled_table(resolution)


def scaled_table(resolution: int) -> dict[float, tuple[int, int]]:
    """The 1024 table scaled to `resolution` (for 512 this reproduces the published table exactly)."""
    if resolution < 32 or resolution % 32:
        raise UserError(f"resolution must be a positive multiple of 32, got {resolution}")
    scale = resolution / 1024

    def side(x: int) -> int:
        return max(32, math.floor(x * scale / 32 + 0.5) * 32)  # half-up, not Python's round-half-even

    return {r: (side(h), side(w)) for r, (h, w) in ASPECT_RATIO_1024.items()}


def target_size(
    height: int, width: int, resolution: int, buckets: bool, table: dict | None = None
) -> tuple[int, int]:
    """The (height, width) an image of this size is trained at: its bucket, or the square when not bucketing."""
    if not buckets:
        if resolution < 32 or resolution % 32:
            raise UserError(f"resolution must be a positive multiple of 32, got {resolution}")
        return (resolution, resolution)
    return nearest_bucket(height, width, table if table is not None else bucket_table(resolution))


def read_size(source: Path | bytes) -> tuple[int, int]:
    """(height, width) as displayed (EXIF orientation applied), from the header only. Raises BadImage."""
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as image:
            w, h = image.size
            swapped = _swaps_sides(image)
    except Exception as e:  # PIL raises many types for bad data (OSError, SyntaxError, ValueError, ...)
        raise BadImage(_describe(e)) from None
    if w <= 0 or h <= 0:
        raise BadImage(f"image has size {w}x{h}")
    return (w, h) if swapped else (h, w)


def open_rgb(data: bytes, min_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode to an RGB image (EXIF-rotated, alpha composited onto white). Raises BadImage.

    `min_size` (height, width), as displayed, lets a JPEG decoder skip detail finer than that size needs.
    """
    from PIL import ImageOps

    try:
        image = Image.open(io.BytesIO(data))
        if min_size is not None and image.format == "JPEG":
            swapped = _swaps_sides(image)
            h, w = (image.size[0], image.size[1]) if swapped else (image.size[1], image.size[0])
            scale = max(min_size[0] / h, min_size[1] / w)
            need_w, need_h = math.ceil(w * scale), math.ceil(h * scale)  # displayed orientation
            image.draft("RGB", (need_h, need_w) if swapped else (need_w, need_h))
        image.load()  # the full decode: truncated or corrupt data fails here
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, rgba)
        return image.convert("RGB")
    except Exception as e:  # see read_size
        raise BadImage(_describe(e)) from None


def resize_and_crop(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale (bicubic) until `size` = (height, width) is covered, keep the centre: one resample."""
    height, width = size
    w, h = image.size
    scale = max(height / h, width / w)
    crop_w, crop_h = width / scale, height / scale  # the kept region, in source pixels
    left, top = (w - crop_w) / 2, (h - crop_h) / 2
    return image.resize((width, height), Image.BICUBIC, box=(left, top, left + crop_w, top + crop_h))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def load_image(data: bytes, size: tuple[int, int]) -> torch.Tensor:
    """Encoded bytes -> (3, height, width) in [-1, 1], resized and centre-cropped. Raises BadImage."""
    image = resize_and_crop(open_rgb(data, min_size=size), size)
    if image.size != (size[1], size[0]):  # cannot happen with PIL's resize; guards the contract
        raise BadImage(f"resized to {image.size}, expected {size[1]}x{size[0]}")
    return to_tensor(image)


def _swaps_sides(image: Image.Image) -> bool:
    """Whether the EXIF orientation turns the stored image by 90 or 270 degrees.

    A PNG's getexif() decodes the whole file when the eXIf chunk was not seen before the pixel data, which
    would defeat header-only reading, so a PNG's orientation counts only when its header carries it.
    """
    if image.format == "PNG" and "exif" not in image.info:
        return False
    return image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)


def _describe(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__
