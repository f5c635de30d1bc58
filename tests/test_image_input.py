"""Reading the user's images and masks: values as the reference normalises them, the fit to a size (against
diffusers' image processor where both resize the same way), the mask conventions, one-line errors."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sana.errors import MissingFileError, UserError
from sana.image_input import has_transparency, image_tensor, mask_tensor, open_image


def noise_image(h: int, w: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, channels), np.uint8), mode)


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def test_same_size_image_is_normalised_as_the_reference_does():
    diffusers = pytest.importorskip("diffusers")
    image = noise_image(64, 96)
    fitted = image_tensor(image, 64, 96)
    assert fitted.tensor.shape == (1, 3, 64, 96) and not fitted.resized and fitted.note("image") is None
    expected = torch.from_numpy(np.asarray(image, np.float32)).permute(2, 0, 1)[None] / 127.5 - 1
    torch.testing.assert_close(fitted.tensor, expected, rtol=0, atol=0)
    # What SanaSprintImg2ImgPipeline does to a PIL image of the output size (sizes are multiples of 32 there).
    reference = diffusers.image_processor.PixArtImageProcessor(vae_scale_factor=32).preprocess(image, 64, 96)
    torch.testing.assert_close(fitted.tensor, reference, rtol=0, atol=1e-6)


def test_other_size_is_scaled_and_centre_cropped_never_stretched():
    diffusers = pytest.importorskip("diffusers")
    processor = diffusers.image_processor.PixArtImageProcessor(vae_scale_factor=32)
    # Same aspect ratio: a plain Lanczos resize, what the reference's processor does too.
    image = noise_image(128, 192, seed=1)
    fitted = image_tensor(image, 64, 96)
    assert fitted.resized and fitted.note("image") == "image 192x128 resized and centre-cropped to 96x64"
    torch.testing.assert_close(fitted.tensor, processor.preprocess(image, 64, 96), rtol=0, atol=1e-6)
    # Another aspect ratio: the reference stretches; we keep the proportions and crop the sides. A picture
    # whose outer quarters are red and middle half blue becomes all blue at a square size.
    wide = np.zeros((40, 80, 3), np.uint8)
    wide[:, :20, 0] = wide[:, 60:, 0] = 255
    wide[:, 20:60, 2] = 255
    square = image_tensor(Image.fromarray(wide), 32, 32).tensor
    assert square[:, 2].min() > 0.9 and square[:, 0].max() < -0.9  # blue everywhere, no red left
    stretched = processor.preprocess(Image.fromarray(wide), 32, 32)
    assert stretched[:, 0].max() > 0.9  # the reference squeezes the red sides in


def test_masks_white_repaints_and_transparency_follows_openai():
    grey = np.zeros((8, 8), np.uint8)
    grey[:, 4:] = 255
    mask = mask_tensor(Image.fromarray(grey), 8, 8).tensor
    assert mask.shape == (1, 1, 8, 8) and mask[..., 4:].eq(1).all() and mask[..., :4].eq(0).all()
    # RGBA with transparent pixels: transparent = repaint, whatever the colour (OpenAI's image edits).
    rgba = np.full((8, 8, 4), 255, np.uint8)
    rgba[:2, :, 3] = 0
    edit = Image.fromarray(rgba, "RGBA")
    assert has_transparency(edit)
    mask = mask_tensor(edit, 8, 8).tensor
    assert mask[..., :2, :].eq(1).all() and mask[..., 2:, :].eq(0).all()
    # Fully opaque RGBA: its brightness, as any other mask.
    opaque = Image.fromarray(np.dstack([np.stack([grey] * 3, -1), np.full((8, 8), 255, np.uint8)]), "RGBA")
    assert not has_transparency(opaque)
    torch.testing.assert_close(mask_tensor(opaque, 8, 8).tensor, mask_tensor(Image.fromarray(grey), 8, 8).tensor)
    # Tensors pass through (resized like images), several masks give several rows.
    rows = mask_tensor([torch.ones(4, 4), torch.zeros(1, 1, 8, 8)], 8, 8)
    assert rows.tensor.shape == (2, 1, 8, 8) and rows.tensor[0].eq(1).all() and rows.resized


def test_files_bytes_and_exif_orientation(tmp_path):
    image = noise_image(16, 24, seed=2)
    path = tmp_path / "in.png"
    image.save(path)
    from_path = image_tensor(str(path), 16, 24).tensor
    from_bytes = image_tensor(png_bytes(image), 16, 24).tensor
    torch.testing.assert_close(from_path, from_bytes, rtol=0, atol=0)
    # A photo stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to view") opens upright.
    exif = Image.Exif()
    exif[0x0112] = 6
    sideways = open_image(png_bytes(image, "JPEG", exif=exif.tobytes(), quality=95))
    assert sideways.size == (16, 24)


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda d: d / "missing.png", MissingFileError, r"^image not found: .*missing\.png$"),
        (lambda d: d, UserError, r"^cannot read image .*: Is a directory$"),
        (
            lambda d: (d / "text.png").write_text("not an image") and d / "text.png",
            UserError,
            r"^image .*text\.png is not an image file PIL can read$",
        ),
        (lambda d: "", UserError, r"^image: the path is empty$"),
        (lambda d: 3, UserError, r"^image must be a path, image bytes or a PIL image, got int$"),
        (lambda d: png_bytes(noise_image(32, 32))[:300], UserError, r"^the uploaded image cannot be decoded: "),
        (lambda d: [], UserError, r"^image: an empty list$"),
        (lambda d: torch.zeros(1, 4, 8, 8), UserError, r"^image tensor must be float \(3, H, W\)"),
    ],
)
def test_bad_images_are_one_line_user_errors(tmp_path, make, error, message):
    with pytest.raises(error, match=message) as info:
        image_tensor(make(tmp_path), 16, 16)
    assert "\n" not in str(info.value)
