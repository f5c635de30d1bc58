"""DC-AE parity with diffusers' AutoencoderDC (the test oracle), with identical random weights in float32.

Weights are shared by loading the oracle's state dict into ours strictly, so any key, shape or math difference
fails. Spatial sizes are chosen so every attention stage runs both the quadratic form (H*W <= head_dim) and
the linear one (H*W > head_dim) somewhere. Our latents are normalised: ours.encode(x) must equal
theirs.encode(x).latent * scaling_factor and ours.decode(z) must equal theirs.decode(z / scaling_factor).
"""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch
from diffusers import AutoencoderDC
from torch import nn

from sana.config import ConfigError, config_from_dict, config_to_dict
from sana.models.dcae import DCAE, DCAE_PRESETS, DCAEConfig

TINY = DCAE_PRESETS["tiny"]
REAL = DCAE_PRESETS["dc-ae-f32c32-sana-1.0"]

# mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers/config.json as published (JSON lists, metadata keys included).
PUBLISHED_F32C32 = {
    "_class_name": "AutoencoderDC",
    "_diffusers_version": "0.32.0.dev0",
    "attention_head_dim": 32,
    "decoder_act_fns": "silu",
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "decoder_norm_types": "rms_norm",
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "downsample_block_type": "Conv",
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "in_channels": 3,
    "latent_channels": 32,
    "scaling_factor": 0.41407,
    "upsample_block_type": "interpolate",
}

# Tiny variants covering the family: resampling kinds, shortcuts, an empty first stage (its resampling moves
# into conv_in / conv_out), BatchNorm and other activations, several or no attention scales, encoder and
# decoder of different widths.
TINY_VARIANTS = {
    "tiny": TINY,
    "shuffle_no_shortcuts": dataclasses.replace(
        TINY,
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
        encoder_out_shortcut=False,
        decoder_in_shortcut=False,
        decoder_conv_act_fn="silu",
    ),
    "empty_first_stage": dataclasses.replace(
        TINY,
        encoder_layers_per_block=(0, 1, 2),
        decoder_layers_per_block=(0, 2, 1),
        encoder_qkv_multiscales=((), (), ()),
        decoder_qkv_multiscales=((), (), ()),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_norm_types=("batch_norm", "batch_norm", "rms_norm"),
        decoder_act_fns=("relu", "relu", "silu"),
    ),
    "empty_first_stage_shuffle": dataclasses.replace(
        TINY,
        encoder_layers_per_block=(0, 1, 1),
        decoder_layers_per_block=(0, 1, 1),
        downsample_block_type="pixel_unshuffle",
        upsample_block_type="pixel_shuffle",
    ),
    "mixed_widths_multiscale": dataclasses.replace(
        TINY,
        encoder_block_types="EfficientViTBlock",
        encoder_block_out_channels=(16, 16, 32),
        encoder_qkv_multiscales=((3,), (3, 5), (5,)),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_out_channels=(8, 32, 32),
        decoder_norm_types=("rms_norm", "batch_norm", "batch_norm"),
        decoder_act_fns=("gelu", "mish", "silu"),
        decoder_conv_act_fn="mish",
        latent_channels=8,
    ),
}

# Tiny images (head_dim 8, stages at 1/2 and 1/4 resolution): 4x4 keeps every attention map at <= 8 tokens
# (quadratic form), 8x12 mixes (24 then 6 tokens), 32x24 is linear everywhere (192 then 48 tokens).
TINY_IMAGE_SIZES = [(4, 4), (8, 12), (32, 24)]


def randomize_(model: nn.Module, seed: int) -> None:
    """Seeded random weights of a sensible scale: default-like uniform for convs and linears, norm scales
    near 1, biases and BatchNorm statistics non-trivial so that every parameter influences the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                bound = p[0].numel() ** -0.5  # 1 / sqrt(fan_in)
                p.uniform_(-bound, bound, generator=g)
            elif name.endswith("weight"):  # norm scales
                p.uniform_(0.8, 1.2, generator=g)
            else:
                p.uniform_(-0.2, 0.2, generator=g)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.2, 0.2, generator=g)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5, generator=g)
            else:
                b.zero_()


def make_pair(config: DCAEConfig, seed: int = 0) -> tuple[DCAE, AutoencoderDC]:
    """Both models on the meta device (cheap even at 312M parameters), the oracle materialised and filled,
    ours given the very same tensors through a strict load."""
    with torch.device("meta"):
        theirs = AutoencoderDC(**config_to_dict(config))
        ours = DCAE(config)
    theirs.to_empty(device="cpu")
    randomize_(theirs, seed)
    ours.load_state_dict(theirs.state_dict(), strict=True, assign=True)
    return ours.eval(), theirs.eval()


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """rtol = tol, atol = tol relative to the output's scale."""
    assert actual.shape == expected.shape
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def tiny_pairs() -> dict[str, tuple[DCAE, AutoencoderDC]]:
    return {name: make_pair(config, seed=i) for i, (name, config) in enumerate(TINY_VARIANTS.items())}


@pytest.fixture(scope="module")
def real_pair() -> tuple[DCAE, AutoencoderDC]:
    return make_pair(REAL, seed=0)


# ----------------------------------------------------------------------------------------------- tiny parity


@pytest.mark.parametrize("size", TINY_IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_encode_matches_diffusers(tiny_pairs, variant, size):
    ours, theirs = tiny_pairs[variant]
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        expected = theirs.encode(x).latent * ours.config.scaling_factor
        assert_matches(ours.encode(x), expected)


@pytest.mark.parametrize("size", TINY_IMAGE_SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("variant", list(TINY_VARIANTS))
def test_tiny_decode_matches_diffusers(tiny_pairs, variant, size):
    ours, theirs = tiny_pairs[variant]
    f, c = ours.config.spatial_compression, ours.config.latent_channels
    z = torch.randn(2, c, size[0] // f, size[1] // f, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = theirs.decode(z / ours.config.scaling_factor).sample
        assert_matches(ours.decode(z), expected)


def test_scaling_factor_is_owned_by_the_model(tiny_pairs):
    """encode multiplies, decode divides, and the round trip equals the oracle's unscaled round trip."""
    ours, theirs = tiny_pairs["tiny"]
    sf = ours.config.scaling_factor
    assert sf != 1.0  # otherwise this test could not tell scaled from unscaled latents
    x = torch.rand(1, 3, 8, 12, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        raw = theirs.encode(x).latent
        z = ours.encode(x)
        assert_matches(z, raw * sf)
        assert_matches(ours.decode(z), theirs.decode(raw).sample)
        assert_matches(ours(x), theirs(x).sample)


def test_state_dict_loads_both_ways(tiny_pairs):
    ours, _ = tiny_pairs["mixed_widths_multiscale"]
    with torch.device("meta"):
        theirs = AutoencoderDC(**config_to_dict(ours.config))
    assert not theirs.load_state_dict(ours.state_dict(), strict=True, assign=True).missing_keys


def test_gradients_reach_every_parameter():
    """The blocks add residuals and apply activations in place; autograd must still work through them."""
    torch.manual_seed(0)
    model = DCAE(TINY_VARIANTS["empty_first_stage"])
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters())


# ----------------------------------------------------------------------------------------------- real width


def test_real_config_keys_shapes_and_size():
    with torch.device("meta"):
        theirs = AutoencoderDC(**config_to_dict(REAL))
        ours = DCAE(REAL)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert set(ours_sd) == set(theirs_sd)
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in theirs_sd.items()}
    assert sum(p.numel() for p in ours.parameters()) == 312_250_275
    assert len(ours_sd) == 375


def test_real_decode_tiny_latents(real_pair):
    """1x1 latents keep every attention stage on the quadratic form; 2x3 takes the deepest-but-two stage
    (8x12 tokens) onto the linear one."""
    ours, theirs = real_pair
    sf = REAL.scaling_factor
    g = torch.Generator().manual_seed(4)
    for shape in [(2, 32, 1, 1), (1, 32, 2, 3)]:
        z = torch.randn(shape, generator=g)
        with torch.no_grad():
            assert_matches(ours.decode(z), theirs.decode(z / sf).sample)


def test_real_encode_small_images(real_pair):
    ours, theirs = real_pair
    g = torch.Generator().manual_seed(5)
    for shape in [(2, 3, 32, 32), (1, 3, 64, 96)]:
        x = torch.rand(shape, generator=g) * 2 - 1
        with torch.no_grad():
            assert_matches(ours.encode(x), theirs.encode(x).latent * REAL.scaling_factor)


@pytest.mark.slow
def test_real_decode_linear_attention_everywhere(real_pair):
    """8x8 latent -> 256x256 image: all three attention stages see more than 32 tokens."""
    ours, theirs = real_pair
    z = torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert_matches(ours.decode(z), theirs.decode(z / REAL.scaling_factor).sample)


@pytest.mark.slow
def test_real_encode_linear_attention_everywhere(real_pair):
    ours, theirs = real_pair
    x = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(7)) * 2 - 1
    with torch.no_grad():
        assert_matches(ours.encode(x), theirs.encode(x).latent * REAL.scaling_factor)


# ----------------------------------------------------------------------------------------------- config


def test_published_config_parses_to_preset():
    config = config_from_dict(DCAEConfig, PUBLISHED_F32C32)
    assert config == REAL
    assert config.spatial_compression == 32
    assert config_from_dict(DCAEConfig, config_to_dict(config)) == config


def test_defaults_equal_diffusers_constructor_defaults():
    """A config.json that omits a key must mean the same thing to both implementations."""
    params = inspect.signature(AutoencoderDC.__init__).parameters
    ours = config_to_dict(DCAEConfig())
    theirs = {name: params[name].default for name in ours}
    assert ours == config_to_dict(config_from_dict(DCAEConfig, theirs))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"encoder_layers_per_block": (1, 1)}, "encoder_layers_per_block has 2 entries"),
        ({"decoder_qkv_multiscales": ((), ())}, "decoder_qkv_multiscales has 2 entries"),
        ({"decoder_norm_types": ("rms_norm",)}, "decoder_norm_types has 1 entries"),
        ({"decoder_block_out_channels": (8, 16)}, "same number of stages"),
        ({"encoder_block_types": ("ResBlock", "Transformer", "ResBlock")}, "'Transformer'"),
        ({"decoder_norm_types": "layer_norm"}, "'layer_norm'"),
        ({"decoder_act_fns": "relu6"}, "'relu6'"),
        ({"decoder_conv_act_fn": "tanh"}, "'tanh'"),
        ({"downsample_block_type": "avgpool"}, "'avgpool'"),
        ({"upsample_block_type": "bilinear"}, "'bilinear'"),
        ({"attention_head_dim": 12}, "not divisible by attention_head_dim=12"),
        ({"encoder_qkv_multiscales": ((), (4,), (5,))}, "odd"),
        ({"encoder_layers_per_block": (1, 0, 1)}, "zero layers"),
        ({"latent_channels": 5}, "divisible by latent_channels"),
        ({"encoder_block_out_channels": (8, 24, 32)}, "cannot be averaged"),
        ({"scaling_factor": 0.0}, "scaling_factor"),
    ],
)
def test_config_rejects_invalid_values(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        dataclasses.replace(TINY, **overrides)


def test_config_rejects_unknown_keys():
    with pytest.raises(ConfigError, match="decoder_norm_type"):
        config_from_dict(DCAEConfig, {**PUBLISHED_F32C32, "decoder_norm_type": "rms_norm"})


# ----------------------------------------------------------------------------------------------- inputs


def _count_conv_calls(model: nn.Module) -> list[str]:
    calls: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
    return calls


def test_encode_rejects_size_not_multiple_of_compression_before_any_conv():
    model = DCAE(TINY)
    calls = _count_conv_calls(model)
    with pytest.raises(ValueError, match=r"33x64 .*multiple of the spatial compression 4"):
        model.encode(torch.zeros(1, 3, 33, 64))
    with torch.device("meta"):
        real = DCAE(REAL)
    with pytest.raises(ValueError, match=r"64x48 .*compression 32"):
        real.encode(torch.zeros(1, 3, 64, 48))  # a meta model would fail differently if any layer ran
    assert calls == []


@pytest.mark.parametrize("shape", [(1, 4, 8, 8), (1, 1, 8, 8), (3, 8, 8)])
def test_encode_rejects_wrong_channels_or_rank(shape):
    with pytest.raises(ValueError, match=r"expects a \(B, 3, H, W\) image"):
        DCAE(TINY).encode(torch.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 3, 2, 2), (4, 2, 2), (1, 4, 1, 2, 2)])
def test_decode_rejects_wrong_channels_or_rank(shape):
    with pytest.raises(ValueError, match=r"expects a \(B, 4, h, w\) latent"):
        DCAE(TINY).decode(torch.zeros(shape))


def test_spatial_compression_and_shapes():
    model = DCAE(TINY).eval()
    assert TINY.spatial_compression == 4 and REAL.spatial_compression == 32
    with torch.no_grad():
        z = model.encode(torch.zeros(2, 3, 16, 8))
        assert z.shape == (2, 4, 4, 2)
        assert model.decode(z).shape == (2, 3, 16, 8)


# ----------------------------------------------------------------------------------------------- construction


def test_builds_on_meta_device_without_non_persistent_buffers():
    with torch.device("meta"):
        model = DCAE(REAL)
    assert all(t.is_meta for t in model.state_dict().values())
    assert set(dict(model.named_buffers())) <= set(model.state_dict())
    assert DCAE.config_class is DCAEConfig and DCAE.diffusers_class_name == "AutoencoderDC"


def test_init_weights_after_materialising_from_meta():
    with torch.device("meta"):
        model = DCAE(TINY_VARIANTS["empty_first_stage"])
    model.to_empty(device="cpu")
    model.init_weights()
    norm = model.decoder.norm_out
    assert torch.equal(norm.weight, torch.ones_like(norm.weight)) and torch.equal(
        norm.bias, torch.zeros_like(norm.bias)
    )
    with torch.no_grad():
        out = model.eval()(torch.rand(1, 3, 8, 8) * 2 - 1)
    assert torch.isfinite(out).all()
