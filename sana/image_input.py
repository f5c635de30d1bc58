"""Images and masks a user gives (img2img, inpainting, control images): read, fitted to a size, as tensors.

    image = open_image("photo.jpg")                        # a PIL image, or a one-line UserError
    pixels = image_tensor("photo.jpg", 512, 768)           # Fitted: (1, 3, 512, 768) in [-1, 1], .resized
    mask = mask_tensor("mask.png", 512, 768)               # Fitted: (1, 1, 512, 768) in [0, 1], 1 = repaint

A source is a path, the bytes of an image file, a PIL image, or a tensor (an image (3, H, W) / (B, 3, H, W) in
[-1, 1]; a mask (H, W) / (B, H, W) / (B, 1, H, W) in [0, 1]); a list of sources gives one row each. An image of
another size is scaled to cover the target and centre-cropped (its aspect ratio is kept, nothing is stretched):
PIL's Lanczos filter for files and PIL images, bilinear for tensors. `Fitted.resized` says whether that
happened, so a command can tell the user.

Masks: white (1) marks what to repaint, black (0) what to keep. A mask whose alpha channel is not fully
opaque follows OpenAI's image-edit convention instead: its transparent pixels are the ones to repaint.

Reading from a path or bytes decodes the whole file at once, so a truncated or corrupt file fails here, before
any model work, and not halfway through a generation.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from sana.aspect_ratios import resize_and_center_crop
from sana.errors import UserError, user_path

ImageSource = str | os.PathLike | bytes | Image.Image | torch.Tensor


@dataclass(frozen=True)
class Fitted:
    """A batch of images or masks fitted to a size; `resized`: at least one had another size (original sizes
    in `sizes`, (height, width) each)."""

    tensor: torch.Tensor
    sizes: tuple[tuple[int, int], ...]

    @property
    def resized(self) -> bool:
        target = tuple(self.tensor.shape[-2:])
        return any(size != target for size in self.sizes)

    def note(self, what: str) -> str | None:
        """A line for the user when something was resized ("image 640x480 resized and cropped to 512x512"),
        else None. Sizes are written width x height, as image tools do."""
        if not self.resized:
            return None
        h, w = self.tensor.shape[-2:]
        shown = ", ".join(dict.fromkeys(f"{sw}x{sh}" for sh, sw in self.sizes))
        return f"{what} {shown} resized and centre-cropped to {w}x{h}"


def open_image(source: str | os.PathLike | bytes | Image.Image, what: str = "image") -> Image.Image:
    """A fully decoded PIL image from a path, file bytes or a PIL image, turned upright as its EXIF
    orientation says (as photo viewers show it); a one-line UserError naming `what` when the file is
    missing, not an image, or damaged."""
    if isinstance(source, bytes | bytearray):
        name, opener = f"the uploaded {what}", lambda: Image.open(io.BytesIO(source))
    elif isinstance(source, str | os.PathLike):
        if not str(source):
            raise UserError(f"{what}: the path is empty")
        name, opener = f"{what} {source}", lambda: Image.open(source)
    elif isinstance(source, Image.Image):
        name, opener = what, lambda: source
    else:
        raise UserError(f"{what} must be a path, image bytes or a PIL image, got {type(source).__name__}")
    try:
        with user_path(source if isinstance(source, str | os.PathLike) else what, what):
            image = opener()
            image.load()  # decode now: a truncated file must fail here, not during generation
    except UserError:
        raise
    except UnidentifiedImageError:
        raise UserError(f"{name} is not an image file PIL can read") from None
    except Image.DecompressionBombError as e:
        raise UserError(f"{name} is too large to open safely: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:  # how PIL reports damaged data
        raise UserError(f"{name} cannot be decoded: {' '.join(str(e).split()) or type(e).__name__}") from None
    return ImageOps.exif_transpose(image)


def fit(image: Image.Image, height: int, width: int) -> Image.Image:
    """`image` scaled to cover height x width and centre-cropped to it (unchanged when already that size)."""
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=Image.Resampling.LANCZOS, centering=(0.5, 0.5))


def image_tensor(
    source: ImageSource | Sequence[ImageSource], height: int, width: int, what: str = "image"
) -> Fitted:
    """(B, 3, height, width) float32 in [-1, 1]: pixel value p becomes p / 127.5 - 1 (the DC-AE's input range,
    as the reference pipelines normalise). Colour images lose their alpha channel; grey ones become RGB."""
    rows, sizes = [], []
    for item in _items(source, what):
        if isinstance(item, torch.Tensor):
            t = _image_rows(item, what)
            sizes += [tuple(t.shape[-2:])] * t.shape[0]
            rows.append(resize_and_center_crop(t, height, width).clamp(-1, 1))
            continue
        image = open_image(item, what)
        sizes.append((image.height, image.width))
        rgb = np.array(fit(_rgb(image), height, width), dtype=np.float32)  # (H, W, 3)
        rows.append(torch.from_numpy(rgb).permute(2, 0, 1)[None] / 127.5 - 1)
    return Fitted(torch.cat(rows), tuple(sizes))


def mask_tensor(
    source: ImageSource | Sequence[ImageSource], height: int, width: int, what: str = "mask"
) -> Fitted:
    """(B, 1, height, width) float32 in [0, 1]: 1 where to repaint (see the module docstring for the rule)."""
    rows, sizes = [], []
    for item in _items(source, what):
        if isinstance(item, torch.Tensor):
            t = _mask_rows(item, what)
            sizes += [tuple(t.shape[-2:])] * t.shape[0]
            rows.append(resize_and_center_crop(t, height, width).clamp(0, 1))
            continue
        image = open_image(item, what)
        sizes.append((image.height, image.width))
        grey = np.array(fit(repaint_channel(image), height, width), dtype=np.float32)  # (H, W)
        rows.append(torch.from_numpy(grey)[None, None] / 255)
    return Fitted(torch.cat(rows), tuple(sizes))


def has_transparency(image: Image.Image) -> bool:
    """Whether some pixel of `image` is not fully opaque."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def repaint_channel(mask: Image.Image) -> Image.Image:
    """The mask as an "L" image, 255 = repaint: its transparency when it has some (OpenAI's convention),
    else its brightness."""
    if has_transparency(mask):
        return ImageOps.invert(mask.convert("RGBA").getchannel("A"))
    return mask.convert("L")


def _rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16-bit / float greys: scale to 8 bits first
        scale = 1 / 256 if image.mode.startswith("I") else 255
        image = Image.eval(image.convert("F"), lambda v: v * scale).convert("L")
    return image.convert("RGB")


def _items(source, what: str) -> list:
    if isinstance(source, list | tuple):
        if not source:
            raise UserError(f"{what}: an empty list")
        return list(source)
    return [source]


def _image_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    t = t[None] if t.ndim == 3 else t
    if t.ndim != 4 or t.shape[1] != 3 or not t.is_floating_point():
        raise UserError(f"{what} tensor must be float (3, H, W) or (B, 3, H, W) in [-1, 1], got {tuple(t.shape)}")
    return t.detach().float().cpu()


def _mask_rows(t: torch.Tensor, what: str) -> torch.Tensor:
    if t.ndim == 2:
        t = t[None, None]
    elif t.ndim == 3:
        t = t[:, None]
    if t.ndim != 4 or t.shape[1] != 1:
        raise UserError(f"{what} tensor must be (H, W), (B, H, W) or (B, 1, H, W) in [0, 1], got {tuple(t.shape)}")
    return t.detach().float().cpu()


__all__ = [
    "Fitted",
    "ImageSource",
    "fit",
    "has_transparency",
    "image_tensor",
    "mask_tensor",
    "open_image",
    "repaint_channel",
]
