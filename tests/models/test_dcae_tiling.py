"""Tiled DC-AE decoding: the same image as one untiled pass, with bounded tiles, on tiny configs.

The issue's bar is a mean absolute difference <= 1e-2 (images in [-1, 1]); the scheme is exact up to float
summation order, so the tests hold it to 1e-5 mean / 1e-4 max, which also catches any halo or attention-sum
mistake (a missing halo pixel or a tile-local attention sum costs 1e-3 to 1e-1 here).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from sana.generation import AUTO_TILE_ABOVE_PX, vae_tile_for
from sana.models.dcae import DCAE, DCAE_PRESETS
from sana.models.dcae_tiling import DEFAULT_TILE, receptive_radius, tile_bounds, tiled_decode, tiled_local
from sana.models.dit import SanaDiT
from sana.pipeline import SanaPipeline
from sana.tiny import tiny_components

TINY = DCAE_PRESETS["tiny"]
REAL = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]

VARIANTS = {
    "tiny": TINY,
    # pixel-shuffle resampling, no shortcuts, another head activation
    "shuffle": dataclasses.replace(
        TINY,
        upsample_block_type="pixel_shuffle",
        downsample_block_type="pixel_unshuffle",
        decoder_in_shortcut=False,
        encoder_out_shortcut=False,
        decoder_conv_act_fn="silu",
    ),
    # attention in every stage, two extra scales (3x3 and 5x5), BatchNorm (eval) and GELU in the decoder
    "all_attention": dataclasses.replace(
        TINY,
        decoder_block_types="EfficientViTBlock",
        decoder_qkv_multiscales=((3, 5), (5,), ()),
        decoder_norm_types=("batch_norm", "rms_norm", "rms_norm"),
        decoder_act_fns="gelu",
    ),
    # no attention at all: the whole decoder is one halo-tiled function
    "convolutional": dataclasses.replace(TINY, decoder_block_types="ResBlock"),
    # an empty first stage: the head's conv_out is an up-sampling block
    "empty_first_stage": dataclasses.replace(
        TINY, decoder_layers_per_block=(0, 1, 2), decoder_block_out_channels=(16, 16, 32)
    ),
}

# The published f32c32 decoder's structure (6 stages, 32x, ResBlock x3 then EfficientViT x3 with 5x5 scales,
# interpolate up-sampling, both shortcuts) at toy widths and one block per stage.
REAL_STRUCTURE = dataclasses.replace(
    REAL,
    attention_head_dim=8,
    encoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    decoder_block_out_channels=(8, 8, 16, 16, 32, 32),
    encoder_layers_per_block=(1, 1, 1, 1, 1, 1),
    decoder_layers_per_block=(1, 1, 1, 1, 1, 2),
)


def make(config, seed=0) -> DCAE:
    torch.manual_seed(seed)
    model = DCAE(config).eval()
    with torch.no_grad():  # non-trivial norm affines and BatchNorm statistics, so every parameter matters
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


def latent(config, batch, h, w, seed=1) -> torch.Tensor:
    return torch.randn(batch, config.latent_channels, h, w, generator=torch.Generator().manual_seed(seed))


def assert_close_to_untiled(model, z, tile):
    with torch.no_grad():
        ref = model.decode(z)
    out = model.decode(z, tile=tile)
    assert out.shape == ref.shape
    diff = (out - ref).abs()
    assert diff.mean() <= 1e-5 and diff.max() <= 1e-4, f"mean {diff.mean():.2e}, max {diff.max():.2e}"


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize(
    ("shape", "tile"),
    [
        ((1, 16, 16), 5),  # square, not a multiple of the tile
        ((2, 12, 20), 6),  # batch of two, non-square
        ((1, 7, 17), 4),  # odd sizes, one side only a little over one tile
        ((1, 9, 3), 4),  # one side below the tile
    ],
)
def test_tiled_decode_matches_untiled(variant, shape, tile):
    config = VARIANTS[variant]
    assert_close_to_untiled(make(config), latent(config, *shape), tile)


def test_real_f32c32_structure_at_toy_width():
    assert_close_to_untiled(make(REAL_STRUCTURE), latent(REAL_STRUCTURE, 1, 6, 9), 4)


def test_tile_at_least_the_latent_is_exactly_one_pass():
    model, z = make(TINY), latent(TINY, 2, 8, 6)
    with torch.no_grad():
        ref = model.decode(z)
    assert torch.equal(model.decode(z, tile=8), ref)
    assert torch.equal(model.decode(z, tile=100), ref)


def test_half_precision_tiles_stay_close():
    model, z = make(TINY).to(torch.bfloat16), latent(TINY, 1, 12, 10).bfloat16()
    with torch.no_grad():
        ref = model.decode(z).float()
    out = model.decode(z, tile=4).float()
    assert (out - ref).abs().mean() < 1e-2


@pytest.mark.parametrize("size", range(1, 40))
@pytest.mark.parametrize("core", [1, 2, 3, 7, 16, 64])
def test_tiles_partition_the_axis(size, core):
    bounds = tile_bounds(size, core)
    assert bounds[0][0] == 0 and bounds[-1][1] == size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:], strict=False))  # contiguous, no overlap
    lengths = [end - start for start, end in bounds]
    assert max(lengths) <= core and min(lengths) >= 1
    assert len(bounds) == -(-size // core)  # the fewest tiles that fit
    assert max(lengths) - min(lengths) <= 1  # even: no thin last tile


def test_tiled_local_is_seamless_and_bounded():
    """A constant map stays constant (no seams), a conv with a wide enough halo is exact, and fn never sees more
    than one widened tile."""
    x = torch.full((1, 2, 23, 30), 0.75)
    seen = []

    def spy(fn):
        return lambda t: (seen.append(tuple(t.shape[-2:])), fn(t))[1]

    up = lambda t: torch.repeat_interleave(torch.repeat_interleave(t, 2, dim=-1), 2, dim=-2)
    out = tiled_local(spy(up), x, core=8, halo=2, scale=2)
    assert torch.equal(out, torch.full((1, 2, 46, 60), 0.75))
    assert max(h for h, _ in seen) <= 8 + 2 * 2 and max(w for _, w in seen) <= 8 + 2 * 2

    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 5, padding=2)
    y = torch.randn(1, 2, 23, 30)
    with torch.no_grad():
        assert torch.allclose(tiled_local(conv, y, core=6, halo=2), conv(y), atol=1e-6)
        assert not torch.allclose(tiled_local(conv, y, core=6, halo=1), conv(y), atol=1e-3)  # the halo matters


def test_receptive_radius_of_decoder_blocks():
    model = DCAE(REAL_STRUCTURE)
    stage = model.decoder.up_blocks[0]  # UpBlock (interpolate) then a ResBlock
    assert receptive_radius(stage[0]) == 0.5  # a 3x3 conv at twice the input resolution
    assert receptive_radius(stage[1]) == 2.0
    assert receptive_radius(model.decoder.up_blocks[5][0].conv_out) == 1.0  # GLUMBConv: one 3x3 depthwise conv
    with pytest.raises(TypeError, match="no receptive field known for Upsample"):
        receptive_radius(nn.Upsample(scale_factor=2))


@pytest.mark.parametrize("tile", [0, -3, 2.5, True, "8"])
def test_bad_tile_sizes_are_one_line_errors(tile):
    model = DCAE(TINY)
    with pytest.raises(ValueError, match="tile must be a positive int") as err:
        model.decode(latent(TINY, 1, 8, 8), tile=tile)
    assert "\n" not in str(err.value)


def test_tiled_decode_rejects_non_4d_latents():
    with pytest.raises(ValueError, match="expects a"):
        tiled_decode(DCAE(TINY).decoder, torch.zeros(4, 8, 8), tile=2)


# ------------------------------------------------------------------------------------------------ pipeline


def test_auto_rule_tiles_only_above_2048_px():
    assert AUTO_TILE_ABOVE_PX == 2048
    assert vae_tile_for("auto", 2048, 2048) is None
    assert vae_tile_for("auto", 1024, 2080) == DEFAULT_TILE and vae_tile_for("auto", 4096, 4096) == DEFAULT_TILE
    assert vae_tile_for(None, 4096, 4096) is None and vae_tile_for(7, 64, 64) == 7
    with pytest.raises(ValueError, match="tile must be a positive int"):
        vae_tile_for("big", 64, 64)


@pytest.fixture(scope="module")
def pipe():
    parts = tiny_components(seed=0)
    return SanaPipeline(parts.transformer, parts.vae, parts.text_encoder, parts.scheduler)


def test_pipeline_tiles_large_requests_and_matches_untiled(pipe, monkeypatch):
    import sana.generation

    calls = []
    decode = pipe.vae.decode
    monkeypatch.setattr(pipe.vae, "decode", lambda z, tile=None: (calls.append(tile), decode(z, tile=tile))[1])
    kw = dict(seed=0, steps=2, height=96, width=160, output_type="pt", use_resolution_binning=False)
    untiled = pipe("a red cat", vae_tile=None, **kw)
    monkeypatch.setattr(sana.generation, "AUTO_TILE_ABOVE_PX", 128)  # make 96x160 a "large" request
    monkeypatch.setattr(sana.generation, "DEFAULT_TILE", 8)  # latents: 24x40 -> 3 x 5 tiles
    auto = pipe("a red cat", **kw)
    explicit = pipe("a red cat", vae_tile=5, **kw)
    assert calls == [None, 8, 5]
    for out in (auto, explicit):
        assert out.shape == untiled.shape == (1, 3, 96, 160)
        assert (out - untiled).abs().mean() < 1e-5


def test_pipeline_checks_vae_tile_before_model_work(pipe, monkeypatch):
    monkeypatch.setattr(pipe, "encode", lambda *a: pytest.fail("model work before validation"))
    with pytest.raises(ValueError, match="tile must be a positive int"):
        pipe("a cat", vae_tile=0, steps=1, height=64, width=64)


@pytest.mark.slow
def test_4k_request_end_to_end_at_toy_width(monkeypatch):
    """A 4096x4096 request through the whole pipeline: a toy-width DiT with the 4K preset's sin-cos positions and
    sample size (so the 4096 aspect-ratio table bins the request), the 32x toy DC-AE, automatic tiling."""
    parts = tiny_components(seed=0)
    vae = make(REAL_STRUCTURE)
    dit = dataclasses.replace(
        parts.transformer.config, in_channels=32, out_channels=32, sample_size=128, interpolation_scale=2.0
    )
    pipe = SanaPipeline(SanaDiT(dit).eval(), vae, parts.text_encoder, parts.scheduler)
    assert pipe.default_size == 4096
    calls = []
    decode = vae.decode
    spy = lambda z, tile=None: (calls.append((tuple(z.shape), tile)), decode(z, tile))[1]
    monkeypatch.setattr(vae, "decode", spy)
    (image,) = pipe("a red cat", seed=0, steps=1, height=4096, width=4096)
    assert image.size == (4096, 4096)
    assert calls == [((1, 32, 128, 128), DEFAULT_TILE)]
