"""Inpainting: the mask on the latent grid, the per-step hold of the kept region, the feathered composite, and
whole runs (every sampler on a tiny random model, and the shipped model) whose pixels away from the feathered
border are the input's while the repainted region changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sana.inpainting import composite, feather_reach, feathered, hold_kept_region, latent_keep
from sana.pipeline import SanaPipeline
from sana.pretrained import shipped_model
from sana.samplers import SAMPLERS, StepInfo
from sana.tiny import tiny_components


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def tiny():
    parts = tiny_components(seed=0)  # 4x DC-AE, 64 px native
    return SanaPipeline(parts.transformer, parts.vae, parts.text_encoder, parts.scheduler)


def test_a_latent_cell_is_free_when_any_of_its_pixels_is_repainted():
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 5, 2] = 1  # one pixel, in latent cell (1, 0) of a 4x compression
    mask[..., 0:4, 4:8] = 0.5  # a half-transparent cell: held halfway
    keep = latent_keep(mask, (8, 8), 4)
    assert keep.shape == (1, 1, 2, 2)
    assert keep.flatten().tolist() == [1.0, 0.5, 0.0, 1.0]


def test_the_composite_is_the_input_away_from_the_feathered_border():
    g = torch.Generator().manual_seed(0)
    image, decoded = torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 20:40, 24:48] = 1
    sigma = 2.0
    reach = feather_reach(sigma)
    out = composite(decoded, image, mask, sigma)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[20 - reach : 40 + reach, 24 - reach : 48 + reach] = False
    inside = torch.zeros(64, 64, dtype=torch.bool)
    inside[20 + reach : 40 - reach, 24 + reach : 48 - reach] = True
    assert torch.equal(out[..., outside], image[..., outside])
    assert torch.equal(out[..., inside], decoded[..., inside])
    alpha = feathered(mask, sigma)
    band = alpha[0, 0, 30, 24 - reach : 24 + reach]
    assert band[0] == 0 and band[-1] == 1 and (band[1:] >= band[:-1]).all()
    assert ((band > 0) & (band < 1)).sum() >= 6  # a ramp over several pixels, not a step
    torch.testing.assert_close(composite(decoded, image, mask, 0), image * (1 - mask) + decoded * mask)


def test_the_hold_runs_before_the_callers_callback_which_may_still_replace_the_state():
    schedule = SAMPLERS["euler"].schedule(4, shift=3.0)
    init, noise = torch.ones(1, 2, 2, 2), torch.zeros(1, 2, 2, 2)
    keep = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    seen = []
    hold = hold_kept_region(schedule, init, noise, keep, then=lambda info: seen.append(info.x) or None)
    x = torch.full((1, 2, 2, 2), 5.0)
    out = hold(StepInfo(index=1, total=4, t=0.5, x=x, denoised=x))
    expected_kept = 1 - schedule.times[2].item()  # init noised (with zero noise) to the state's time
    assert out[0, :, 0, 0].tolist() == pytest.approx([expected_kept] * 2) and out[0, :, 1, 1].eq(5).all()
    assert torch.equal(seen[0], out)
    replaced = hold_kept_region(schedule, init, noise, keep, then=lambda info: torch.zeros_like(info.x))
    assert replaced(StepInfo(index=1, total=4, t=0.5, x=x, denoised=x)).eq(0).all()


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_every_sampler_keeps_the_unmasked_pixels_and_repaints_the_rest(tiny, sampler):
    rng = np.random.RandomState(1)
    source = Image.fromarray(rng.randint(0, 256, (64, 64, 3), np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 255  # repaint the right half
    kw = dict(seed=0, steps=4, sampler=sampler, image=source, mask_image=Image.fromarray(mask))
    out = pixels(tiny("a cat", **kw)[0])
    reach = feather_reach(1.0)  # the default feather at 64 px
    kept = np.abs(out[:, : 32 - reach] - pixels(source)[:, : 32 - reach])
    assert kept.max() <= 2
    assert np.abs(out[:, 32 + reach :] - pixels(source)[:, 32 + reach :]).mean() > 20
    # In the latent, the kept cells end as the input's own latent.
    plan = tiny.plan("a cat", **kw)
    final = tiny("a cat", **kw, output_type="latent")
    init = tiny.encode_image(plan)
    torch.testing.assert_close(final[..., :8], init[..., :8], rtol=0, atol=1e-5)  # 32 px = 8 latent columns


def test_the_shipped_model_repaints_the_masked_object_and_keeps_the_rest():
    pipe = SanaPipeline.from_pretrained(shipped_model())
    source = pipe("a red circle above a blue square", seed=1, steps=4)[0]
    mask = Image.new("L", source.size, 0)
    mask.paste(255, (0, 0, 256, 128))  # the top half, where the circle is
    out = pixels(pipe("a yellow square above a blue square", seed=5, steps=4, image=source, mask_image=mask)[0])
    reach = feather_reach(2.0)  # the default feather at 256 px
    below = np.abs(out[128 + reach :] - pixels(source)[128 + reach :])
    assert below.max() <= 2
    top, before = out[: 128 - reach], pixels(source)[: 128 - reach]
    assert np.abs(top - before).mean() > 5
    red = lambda a: ((a[..., 0] > 150) & (a[..., 1] < 100) & (a[..., 2] < 100)).mean()  # noqa: E731
    yellow = lambda a: ((a[..., 0] > 150) & (a[..., 1] > 150) & (a[..., 2] < 100)).mean()  # noqa: E731
    assert red(top) < 0.01 < red(before) and yellow(top) > 0.1 > yellow(before)  # the prompt's shape drawn
