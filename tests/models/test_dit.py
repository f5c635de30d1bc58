"""Linear DiT: parity with diffusers' SanaTransformer2DModel (random weights, float32) and properties."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from sana.config import ConfigError, config_from_dict, config_to_dict
from sana.models.dit import DIT_PRESETS, DiTConfig, SanaDiT, sincos_positions
from sana.types import Conditioning, TextEmbeddings

diffusers = pytest.importorskip("diffusers")

TINY = dict(
    in_channels=4,
    out_channels=4,
    num_attention_heads=2,
    attention_head_dim=8,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=8,
    cross_attention_dim=16,
    caption_channels=12,
    sample_size=8,
)


def pair(cfg: dict, seed: int = 0) -> tuple[torch.nn.Module, SanaDiT]:
    """The oracle with seeded random weights, and ours loaded strictly from its state dict."""
    torch.manual_seed(seed)
    theirs = diffusers.SanaTransformer2DModel(**cfg).eval()
    with torch.no_grad():  # default init leaves norm weights at 1 and biases at 0: perturb them too
        for p in theirs.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    ours = SanaDiT(DiTConfig(**cfg)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours


def inputs(cfg: dict, b: int = 2, h: int = 8, w: int = 8, length: int = 7, valid: list[int] | None = None):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, cfg["in_channels"], h, w, generator=g)
    t = torch.tensor([999.0, 136.0, 500.0, 3.0][:b])
    hidden = torch.randn(b, length, cfg["caption_channels"], generator=g)
    valid = valid or [length] * b
    mask = torch.zeros(b, length, dtype=torch.int64)
    for i, n in enumerate(valid):
        mask[i, :n] = 1
    return x, t, hidden, mask


def check(cfg: dict, *, guidance: torch.Tensor | None = None, rtol=1e-4, atol=1e-5, **kw) -> None:
    theirs, ours = pair(cfg)
    x, t, hidden, mask = inputs(cfg, **kw)
    with torch.no_grad():
        ref = theirs(x, hidden, t, guidance=guidance, encoder_attention_mask=mask).sample
        out = ours(x, t, Conditioning(TextEmbeddings(hidden, mask), guidance=guidance))
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("valid", [[7, 7], [1, 1], [1, 5]], ids=["all-valid", "one-valid", "mixed"])
def test_parity_tiny_masks(valid):
    check(TINY, valid=valid)


@pytest.mark.parametrize(
    "rows",
    [[[0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0]], [[0, 1, 0, 1, 0, 0, 0], [1, 0, 0, 0, 1, 1, 0]]],
    ids=["a-row-with-no-valid-token", "holes-not-a-prefix"],
)
def test_parity_masks_drop_padding_must_not_change(rows):
    """The DiT drops caption positions no row attends to (`drop_padding`); a row with nothing valid (softmax
    spreads over all positions) and masks that are not a prefix must still give diffusers' output."""
    theirs, ours = pair(TINY)
    x, t, hidden, _ = inputs(TINY)
    mask = torch.tensor(rows)
    with torch.no_grad():
        ref = theirs(x, hidden, t, encoder_attention_mask=mask).sample
        out = ours(x, t, Conditioning(TextEmbeddings(hidden, mask)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_parity_non_square_and_batch_of_one():
    check(TINY, b=1, h=6, w=10)
    check(TINY, b=2, h=12, w=4)


@pytest.mark.parametrize("scale", [1.0, 2.0])
@pytest.mark.parametrize("hw", [(8, 8), (6, 10)], ids=["sample-size", "other-size"])
def test_parity_sincos_positions(scale, hw):
    check({**TINY, "interpolation_scale": scale}, h=hw[0], w=hw[1])


def test_parity_qk_norm():
    check({**TINY, "qk_norm": "rms_norm_across_heads"})


def test_parity_guidance_embedding():
    cfg = {**TINY, "qk_norm": "rms_norm_across_heads", "guidance_embeds": True}
    check(cfg, guidance=torch.tensor([0.45, 0.3]))


def test_parity_other_options():
    check({**TINY, "attention_bias": True, "norm_elementwise_affine": True})
    check({**TINY, "patch_size": 2, "out_channels": 8})
    check({**TINY, "mlp_ratio": 3.0, "cross_attention_head_dim": 4, "num_cross_attention_heads": 3})


def _slice(preset: str, layers: int = 2) -> dict:
    cfg = config_to_dict(dataclasses.replace(DIT_PRESETS[preset], num_layers=layers))
    return cfg


def test_parity_600m_width_slice():
    check(_slice("sana-600m-1024"), h=8, w=6, valid=[3, 7], length=7)


@pytest.mark.slow
def test_parity_1600m_width_slice():
    check(_slice("sana-1600m-1024"), h=8, w=8, valid=[1, 7], length=7)


@pytest.mark.slow
def test_parity_4k_positions_600m_width():
    check(_slice("sana-600m-4k", 1), h=16, w=12, valid=[2, 7], length=7)


@pytest.mark.parametrize("preset", ["sana-600m-1024", "sana-1600m-2k", "sana-1.5-1.6b", "sana-sprint-0.6b"])
def test_state_dict_keys_and_shapes_match_diffusers(preset):
    cfg = config_to_dict(dataclasses.replace(DIT_PRESETS[preset], num_layers=2))
    with torch.device("meta"):
        theirs = diffusers.SanaTransformer2DModel(**cfg).state_dict()
        ours = SanaDiT(DiTConfig(**cfg)).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_published_parameter_counts():
    with torch.device("meta"):
        n600 = sum(p.numel() for p in SanaDiT(DIT_PRESETS["sana-600m-1024"]).parameters())
        n1600 = sum(p.numel() for p in SanaDiT(DIT_PRESETS["sana-1600m-1024"]).parameters())
    assert (n600, n1600) == (591_747_872, 1_604_462_752)


def test_presets_match_published_configs():
    published_600m = {
        "attention_bias": False,
        "attention_head_dim": 32,
        "caption_channels": 2304,
        "cross_attention_dim": 1152,
        "cross_attention_head_dim": 72,
        "num_attention_heads": 36,
        "num_cross_attention_heads": 16,
        "num_layers": 28,
        "sample_size": 32,
        "interpolation_scale": None,
    }
    cfg = config_to_dict(DIT_PRESETS["sana-600m-1024"])
    assert {k: cfg[k] for k in published_600m} == published_600m
    assert DIT_PRESETS["sana-600m-4k"].interpolation_scale == 2.0
    assert DIT_PRESETS["sana-1600m-2k"].interpolation_scale == 1.0
    assert DIT_PRESETS["sana-sprint-1.6b"].guidance_embeds


def test_sincos_positions_channel_order_and_oracle():
    # First half encodes the column (x), second half the row (y).
    pos = sincos_positions(16, 3, 4, base_size=4, interpolation_scale=2.0)
    grid = pos.view(3, 4, 16)
    assert torch.equal(grid[0, :, :8], grid[2, :, :8]) and not torch.equal(grid[0, 0, :8], grid[0, 1, :8])
    assert torch.equal(grid[:, 1, 8:], grid[:, 3, 8:]) and not torch.equal(grid[0, 0, 8:], grid[1, 0, 8:])
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(16, (3, 4), base_size=4, interpolation_scale=2.0, output_type="pt").float()
    torch.testing.assert_close(pos, ref, rtol=0, atol=0)


def test_init_weights_gives_zero_velocity_and_identity_blocks():
    torch.manual_seed(0)
    model = SanaDiT(DiTConfig(**TINY))
    model.init_weights()
    x, t, hidden, mask = inputs(TINY)
    out = model(x, t, Conditioning(TextEmbeddings(hidden, mask)))
    assert torch.count_nonzero(out) == 0
    # Gates are zero at init, so the residual stream leaves each self-attention / FFN untouched.
    assert torch.count_nonzero(model.time_embed.linear.weight) == 0


def test_meta_build_and_gradient_checkpointing_equivalence():
    with torch.device("meta"):
        SanaDiT(DIT_PRESETS["sana-1600m-4k"])
    _, ours = pair(TINY)
    x, t, hidden, mask = inputs(TINY)
    text = Conditioning(TextEmbeddings(hidden, mask))
    ours.train()
    ours(x, t, text).square().mean().backward()
    grads = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.gradient_checkpointing = True
    ours(x, t, text).square().mean().backward()
    for g, p in zip(grads, ours.parameters(), strict=True):
        torch.testing.assert_close(p.grad, g)


def test_bad_inputs_are_one_line_errors():
    _, ours = pair(TINY)
    x, t, hidden, mask = inputs(TINY)
    text = Conditioning(TextEmbeddings(hidden, mask))
    with pytest.raises(ValueError, match=r"latent must be \(B, 4, H, W\)"):
        ours(x[:, :3], t, text)
    with pytest.raises(ValueError, match="not a positive multiple of patch size 2"):
        SanaDiT(DiTConfig(**{**TINY, "patch_size": 2}))(x[..., :7], t, text)
    with pytest.raises(ValueError, match="text embeddings have 5 channels"):
        ours(x, t, Conditioning(TextEmbeddings(hidden[..., :5], mask)))
    with pytest.raises(ValueError, match="batch mismatch"):
        ours(x[:1], t, text)


def test_config_rejects_unknown_and_invalid_fields():
    with pytest.raises(ConfigError, match="unknown field.*num_layerz"):
        config_from_dict(DiTConfig, {**TINY, "num_layerz": 3})
    with pytest.raises(ConfigError, match="qk_norm"):
        DiTConfig(**{**TINY, "qk_norm": "layer_norm"})
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        DiTConfig(**{**TINY, "cross_attention_dim": 20})
    # The diffusers bookkeeping keys are accepted and ignored.
    assert config_from_dict(DiTConfig, {**TINY, "_class_name": "SanaTransformer2DModel"}) == DiTConfig(**TINY)


def test_linear_attention_stays_float32_under_fp16_autocast():
    # A query with all-zero ReLU features: in fp16 the 1e-15 guard would underflow and give 0/0.
    from sana.models.attention import relu_linear_attention

    q = torch.randn(1, 2, 40, 8)
    q[0, 0, 3] = -1.0
    k, v = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        out = relu_linear_attention(q.half(), k.half(), v.half())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), relu_linear_attention(q, k, v), rtol=1e-2, atol=1e-3)


def test_residuals_match_diffusers_controlnet_block_samples():
    """Conditioning.residuals[k] is added after block k + 1, exactly where diffusers adds a ControlNet's
    controlnet_block_samples[k]; with fewer residuals than blocks the rest get none."""
    cfg = {**TINY, "num_layers": 4}
    theirs, ours = pair(cfg)
    x, t, hidden, mask = inputs(cfg, valid=[7, 3])
    g = torch.Generator().manual_seed(5)
    for depth in (1, 3):
        residuals = tuple(torch.randn(2, 64, 16, generator=g) for _ in range(depth))  # (B, N = 8 * 8, C)
        with torch.no_grad():
            ref = theirs(x, hidden, t, encoder_attention_mask=mask, controlnet_block_samples=residuals).sample
            out = ours(x, t, Conditioning(TextEmbeddings(hidden, mask), residuals=residuals))
            plain = ours(x, t, Conditioning(TextEmbeddings(hidden, mask)))
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        assert (out - plain).abs().max() > 1e-3  # the residuals matter
    with pytest.raises(ValueError, match="4 residuals for a 4-block model"):
        ours(x, t, Conditioning(TextEmbeddings(hidden, mask), residuals=residuals + residuals[:1]))
    with pytest.raises(TypeError, match="takes a Conditioning"):
        ours(x, t, TextEmbeddings(hidden, mask))
