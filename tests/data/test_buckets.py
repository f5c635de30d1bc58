"""Buckets: the published tables, the scaled ones, assignment = nearest_bucket, resize + centre crop, decoding."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from sana.aspect_ratios import ASPECT_RATIO_512, TABLES_BY_RESOLUTION, nearest_bucket
from sana.data.buckets import (
    BadImage,
    bucket_table,
    load_image,
    open_rgb,
    read_size,
    resize_and_crop,
    scaled_table,
    target_size,
)
from sana.data.loader import DataConfig, LoaderStats, RawImages
from tests.data import test_sources as src


def encoded(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_tables():
    for resolution, table in TABLES_BY_RESOLUTION.items():
        assert bucket_table(resolution) is table
    assert scaled_table(512) == ASPECT_RATIO_512  # the scaling rule reproduces the published halving
    for resolution in (64, 256, 384, 768):
        table = bucket_table(resolution)
        assert table.keys() == ASPECT_RATIO_512.keys()
        assert all(h % 32 == 0 and w % 32 == 0 and h >= 32 and w >= 32 for h, w in table.values())
        assert table[1.0] == (resolution, resolution)
        if resolution >= 256:  # areas stay near resolution^2 once rounding to 32 is small
            assert all(abs(h * w / resolution**2 - 1) < 0.2 for h, w in table.values())
    with pytest.raises(ValueError, match="multiple of 32"):
        bucket_table(100)


def test_assignment_is_nearest_bucket():
    rng = np.random.default_rng(0)
    for resolution in (64, 512, 1024):
        table = bucket_table(resolution)
        for h, w in rng.integers(16, 4000, (300, 2)).tolist():
            assert target_size(h, w, resolution, True) == nearest_bucket(h, w, table)
        assert target_size(123, 456, resolution, False) == (resolution, resolution)


def test_loader_buckets_come_from_headers(tmp_path):
    src.write_folder(tmp_path)
    images = RawImages.scan(DataConfig(path=str(tmp_path), resolution=64), LoaderStats())
    table = bucket_table(64)
    sizes = {key: size for key, size, _ in src.SPECS}
    assert images.buckets == [nearest_bucket(*sizes[k], table) for k in images.keys]


def test_resize_and_crop_keeps_the_centre():
    # 120x40 (w x h): a 40x40 green square in the middle of red; the 32x32 crop of it is the green square.
    array = np.zeros((40, 120, 3), np.uint8)
    array[..., 0] = 255
    array[:, 40:80] = (0, 255, 0)
    out = np.asarray(resize_and_crop(Image.fromarray(array), (32, 32)), dtype=np.int16)
    assert out.shape == (32, 32, 3)
    inner = out[:, 2:-2]  # bicubic support may reach one source pixel past the crop at the sides
    assert (np.abs(inner - (0, 255, 0)) <= 2).all()
    tall = resize_and_crop(Image.fromarray(array), (64, 32))  # (height, width) order
    assert tall.size == (32, 64)


def test_load_image_range_and_shape():
    image = src.make_image("x", (50, 70))
    x = load_image(encoded(image), (32, 64))
    assert x.shape == (3, 32, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    # scale = max(32/50, 64/70) = 64/70: the kept source region is 70 x 35, centred 7.5 px from the top
    same = np.asarray(image.resize((64, 32), Image.BICUBIC, box=(0, 7.5, 70, 42.5)))
    assert torch.equal(x, torch.from_numpy(same.copy()).permute(2, 0, 1).float() / 127.5 - 1)


def test_exif_rotation_and_alpha():
    image = src.make_image("r", (20, 40))  # stored 40 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: displayed 20 wide, 40 high
    data = encoded(image, "JPEG", exif=exif.tobytes())
    assert read_size(data) == (40, 20)
    assert open_rgb(data).size == (20, 40)
    clear = Image.new("RGBA", (8, 8), (10, 20, 30, 0))
    assert np.asarray(open_rgb(encoded(clear))).min() == 255  # transparent -> white


def test_jpeg_draft_stays_close_to_full_decode():
    smooth = Image.fromarray(np.kron(src.make_image("j", (10, 10)), np.ones((80, 80, 1), np.uint8)))  # 800x800
    data = encoded(smooth, "JPEG", quality=95)
    fast = load_image(data, (64, 64))
    full = torch.from_numpy(np.asarray(resize_and_crop(open_rgb(data), (64, 64))).copy()).permute(2, 0, 1)
    assert (fast - (full.float() / 127.5 - 1)).abs().mean() < 0.03


def test_bad_images_raise_badimage(tmp_path):
    good = encoded(src.make_image("t", (64, 64)))
    with pytest.raises(BadImage):
        read_size(b"this is text, not an image")
    truncated = good[: len(good) // 2]
    assert read_size(truncated) == (64, 64)  # the header is intact ...
    with pytest.raises(BadImage):
        load_image(truncated, (32, 32))  # ... the pixels are not
    with pytest.raises(BadImage):
        read_size(tmp_path / "missing.png")
