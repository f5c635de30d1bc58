"""Tiled DC-AE decoding: memory bounded by one tile plus the output, and the same image as an untiled decode.

Why not blended windows (decode overlapping latent windows independently, cross-fade the overlaps, as
diffusers' `enable_tiling` does)? The decoder's EfficientViT stages use *global* linear attention: every output
pixel depends on sums over the whole latent, and a window sees only its own part. With the f32c32 config and
random weights, windows of 32 latents with any overlap land 0.12-0.14 mean absolute difference from the untiled
image (diffusers' 512 px / 448 stride scheme: 0.20), far beyond the 1e-2 we want; only larger windows shrink it.

What is done instead, exactly:

* The decoder runs step by step (stem, then each block of each stage from the deepest, then the head). Up to and
  including the last attention block, each step's input and output are kept whole. These stages are 1x-4x the
  latent resolution, so a whole map is small (at 4096x4096: at most 512 x 512 x 512 floats, 0.5 GB), while the
  steps' *internal* tensors (8x expansions, stacked q/k/v) are computed tile by tile.
* A local step (convolutions, norms, activations, up-sampling) is applied on tiles widened by a halo of its
  receptive-field radius and cropped back (`tiled_local`): an exact partition, no blending needed, because the
  halo holds every input the kept pixels depend on and a tile at the image border sees the same zero padding.
* An attention step makes two passes over tiles. ReLU linear attention only needs, per head,
  KV = sum_m relu(k_m) v_m^T and z = sum_m relu(k_m) over all positions m (`sana.models.attention`); the first
  pass accumulates these (float32) from every tile, the second computes each tile's queries against them.
* After the last attention block only local steps remain (the high-resolution ResBlock stages and the head,
  where the memory is); they are fused into one function and run tile by tile straight into the preallocated
  output, with a halo equal to their summed receptive field.

So the result equals the untiled decode up to float32 summation order (about 1e-6), and peak memory is the
weights, the output, the largest whole low-resolution map (twice) and one tile's activations. (That bound
relies on attention living in the deep, low-resolution stages, as in every published DC-AE; a config with
attention at full resolution would still decode exactly, keeping whole maps up to that stage.)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sana.errors import UserError
from sana.models.attention import LINEAR_ATTENTION_EPS
from sana.models.dcae_blocks import (
    ChannelRMSNorm,
    EfficientViTBlock,
    GLUMBConv,
    MultiscaleLinearAttention,
    ResBlock,
    UpBlock,
)

# Latents per tile side: 768 px of f32c32 output. The fused high-resolution tail sets the peak: a few 128-channel
# float32 maps of one (768 + 2 x 56 halo)^2 px tile, ~0.4 GB each. Decoding 4096^2, tile 32 peaked at 6.3 GB in
# all (16 threads), so 24 leaves room under the 6 GB goal; larger tiles are a little faster (less halo).
DEFAULT_TILE = 24

# ------------------------------------------------------------------------------------------------- tiling


def check_tile(tile: int) -> None:
    if not isinstance(tile, int) or isinstance(tile, bool) or tile <= 0:
        raise UserError(f"tiled decode: tile must be a positive int (latent pixels), got {tile!r}")


def tile_bounds(size: int, core: int) -> list[tuple[int, int]]:
    """[start, end) ranges of at most `core` pixels that cover [0, size) exactly once, as even as possible
    (so no thin last tile pays a full halo for a few pixels)."""
    n = math.ceil(size / core)
    cuts = [i * size // n for i in range(n + 1)]
    return list(zip(cuts[:-1], cuts[1:], strict=True))


def _window(start: int, end: int, halo: int, size: int) -> tuple[int, int]:
    return max(start - halo, 0), min(end + halo, size)


def tiled_local(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, *, core: int, halo: int, scale: int = 1
) -> torch.Tensor:
    """fn(x) computed tile by tile: (B, C, H, W) -> (B, C', H*scale, W*scale).

    Each tile of at most core x core input pixels is widened by `halo` pixels (clipped at the image border),
    passed through fn, and cropped back to the tile. Exact when fn is local with a receptive-field radius of at
    most `halo` input pixels and pads with zeros at the border (convolutions, per-pixel norms, activations,
    nearest / pixel-shuffle up-sampling). Memory: the output plus one widened tile's worth of fn.
    """
    b, _, h, w = x.shape
    out = None
    for y0, y1 in tile_bounds(h, core):
        wy0, wy1 = _window(y0, y1, halo, h)
        for x0, x1 in tile_bounds(w, core):
            wx0, wx1 = _window(x0, x1, halo, w)
            y = fn(x[:, :, wy0:wy1, wx0:wx1])  # (B, C', (wy1-wy0)*s, (wx1-wx0)*s)
            if out is None:  # allocated once fn's channels and dtype are known
                out = y.new_empty(b, y.shape[1], h * scale, w * scale)
            expected = (b, out.shape[1], (wy1 - wy0) * scale, (wx1 - wx0) * scale)
            if tuple(y.shape) != expected:
                raise ValueError(f"tiled_local: fn returned shape {tuple(y.shape)}, expected {expected}")
            s = scale
            out[:, :, y0 * s : y1 * s, x0 * s : x1 * s] = y[
                :, :, (y0 - wy0) * s : (y1 - wy0) * s, (x0 - wx0) * s : (x1 - wx0) * s
            ]
            del y  # before the next tile is computed
    return out


# ------------------------------------------------------------------------------------- receptive fields

_POINTWISE = (ChannelRMSNorm, nn.BatchNorm2d, nn.SiLU, nn.ReLU, nn.GELU, nn.Mish, nn.Identity)


def receptive_radius(module: nn.Module) -> float:
    """How far (in the module's input pixels) an output pixel of a local decoder module can see."""
    if isinstance(module, nn.Conv2d):
        if module.stride != (1, 1) or isinstance(module.padding, str):
            raise TypeError(f"tiled decode: unsupported conv (stride {module.stride}, padding {module.padding})")
        return max(d * (k - 1) / 2 for d, k in zip(module.dilation, module.kernel_size, strict=True))
    if isinstance(module, UpBlock):  # nearest 2x then conv: the conv's radius counts at double resolution
        r = receptive_radius(module.conv)
        return r / 2 if module.interpolate else r
    if isinstance(module, ResBlock):
        return receptive_radius(module.conv1) + receptive_radius(module.conv2)
    if isinstance(module, GLUMBConv):
        return sum(receptive_radius(m) for m in (module.conv_inverted, module.conv_depth, module.conv_point))
    if isinstance(module, _POINTWISE):
        return 0.0
    raise TypeError(f"tiled decode: no receptive field known for {type(module).__name__}")


def upscale(module: nn.Module) -> int:
    return 2 if isinstance(module, UpBlock) else 1


# ----------------------------------------------------------------------------------- global attention


def _qkv_scales(attn: MultiscaleLinearAttention, x: torch.Tensor) -> list[torch.Tensor]:
    """The 1 + K (B, 3C, h, w) q/k/v maps of `attn` (plain projections, then each multi-scale aggregate)."""
    w_qkv = torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])  # (3C, C)
    qkv = F.linear(x.movedim(1, -1), w_qkv).movedim(-1, 1)  # (B, 3C, h, w)
    return [qkv] + [ms(qkv) for ms in attn.to_qkv_multiscale]


def _heads(qkv: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, ...]:
    """(B, 3C, h, w) -> q, k, v, each (B, C/d, h*w, d): head g is the g-th run of 3d consecutive channels, the
    grouping the published weights were trained with (see `MultiscaleLinearAttention`)."""
    b, c3, h, w = qkv.shape
    heads = qkv.movedim(1, -1).reshape(b, h * w, c3 // (3 * head_dim), 3 * head_dim).transpose(1, 2)
    return heads.chunk(3, dim=-1)


def tiled_attention(attn: MultiscaleLinearAttention, x: torch.Tensor, *, core: int) -> torch.Tensor:
    """attn(x) (global multi-scale ReLU linear attention with its normalised residual), tile by tile.

    Pass 1 sums KV = relu(k)^T v and z = relu(k) over every position (float32, as the untiled layer does);
    pass 2 recomputes each tile's queries and applies them. The q/k/v maps are local (a per-pixel projection
    and depthwise convs), so they are computed on halo-widened tiles and cropped, as in `tiled_local`.
    """
    b, c, h, w = x.shape
    d = attn.head_dim
    halo = math.ceil(max((receptive_radius(ms.proj_in) for ms in attn.to_qkv_multiscale), default=0))
    tiles = [(ys, xs) for ys in tile_bounds(h, core) for xs in tile_bounds(w, core)]

    def tile_maps(ys: tuple[int, int], xs: tuple[int, int]) -> list[torch.Tensor]:
        (y0, y1), (x0, x1) = ys, xs
        (wy0, wy1), (wx0, wx1) = _window(y0, y1, halo, h), _window(x0, x1, halo, w)
        maps = _qkv_scales(attn, x[:, :, wy0:wy1, wx0:wx1])
        return [m[:, :, y0 - wy0 : y1 - wy0, x0 - wx0 : x1 - wx0] for m in maps]  # each (B, 3C, th, tw)

    # float32 sums whatever the dtype, and no autocast: the precision policy of `relu_linear_attention`.
    no_autocast = torch.autocast(x.device.type, enabled=False)
    kv: list[torch.Tensor] = []  # per scale (B, C/d, d, d)
    z: list[torch.Tensor] = []  # per scale (B, C/d, d)
    for ys, xs in tiles:
        for i, qkv in enumerate(tile_maps(ys, xs)):
            _, k, v = _heads(qkv, d)
            with no_autocast:
                k = F.relu(k).float()
                kv_i, z_i = k.transpose(-1, -2) @ v.float(), k.sum(dim=-2)
            if i == len(kv):
                kv.append(kv_i)
                z.append(z_i)
            else:
                kv[i] += kv_i
                z[i] += z_i

    out = torch.empty_like(x)
    w_out = attn.to_out.weight.split(c, dim=1)  # one (C, C) block per scale
    for (y0, y1), (x0, x1) in tiles:
        n = (y1 - y0) * (x1 - x0)
        acc = None
        for i, qkv in enumerate(tile_maps((y0, y1), (x0, x1))):
            with no_autocast:
                q = F.relu(_heads(qkv, d)[0]).float()  # (B, C/d, n, d)
                o = (q @ kv[i]) / (q @ z[i].unsqueeze(-1) + LINEAR_ATTENTION_EPS)  # (B, C/d, n, d)
            o = o.to(x.dtype).transpose(1, 2).reshape(b * n, c)  # (B*n, C), channel = head * d + j
            acc = F.linear(o, w_out[i]) if acc is None else acc.addmm_(o, w_out[i].t())  # (B*n, C)
        acc = acc.view(b, y1 - y0, x1 - x0, c).movedim(-1, 1)  # (B, C, th, tw)
        out[:, :, y0:y1, x0:x1] = attn.norm_out(acc).add_(x[:, :, y0:y1, x0:x1])
    return out


# ---------------------------------------------------------------------------------------------- decoder


@dataclass(frozen=True)
class _Step:
    fn: Callable[[torch.Tensor], torch.Tensor]
    radius: float | None  # None: global (an attention layer)
    scale: int = 1


def _decoder_steps(decoder: nn.Module) -> list[_Step]:
    """The decoder's forward as a flat list of steps, in execution order (mirrors `sana.models.dcae.Decoder`'s
    forward; this module works on the blocks of dcae_blocks.py and does not import dcae.py, which uses it)."""

    def stem(z: torch.Tensor) -> torch.Tensor:
        h = decoder.conv_in(z)
        return h + z.repeat_interleave(decoder.in_repeats, dim=1) if decoder.in_shortcut else h

    steps = [_Step(stem, receptive_radius(decoder.conv_in))]
    for stage in reversed(decoder.up_blocks):
        for block in stage:
            if isinstance(block, EfficientViTBlock):
                steps.append(_Step(block.attn, None))
                steps.append(_Step(block.conv_out, receptive_radius(block.conv_out)))
            else:
                steps.append(_Step(block, receptive_radius(block), upscale(block)))
    for module in (decoder.norm_out, decoder.conv_act, decoder.conv_out):
        steps.append(_Step(module, receptive_radius(module), upscale(module)))
    return steps


def _fuse(steps: list[_Step]) -> tuple[Callable[[torch.Tensor], torch.Tensor], int, int]:
    """One function for a run of local steps, its receptive-field radius in input pixels, and its scale."""
    radius, scale = 0.0, 1
    for step in steps:
        radius += step.radius / scale  # a step at `scale` x resolution sees step.radius / scale input pixels
        scale *= step.scale

    def fused(x: torch.Tensor) -> torch.Tensor:
        for step in steps:
            x = step.fn(x)
        return x

    return fused, math.ceil(radius), scale


@torch.no_grad()
def tiled_decode(decoder: nn.Module, z: torch.Tensor, *, tile: int = DEFAULT_TILE) -> torch.Tensor:
    """decoder(z) for a `sana.models.dcae.Decoder` and a (B, C_lat, h, w) latent (already divided by the scaling
    factor), computed in tiles of about tile x tile latents (tile * f pixels on the output side). Same result as
    decoder(z) up to float summation order; a latent no larger than one tile is decoded in one call, exactly.
    Inference only."""
    check_tile(tile)
    if z.ndim != 4:
        raise ValueError(f"tiled decode expects a (B, C, h, w) latent, got shape {tuple(z.shape)}")
    if z.shape[-2] <= tile and z.shape[-1] <= tile:
        return decoder(z)
    if z.shape[0] > 1:  # one image at a time: a tile's activations then do not grow with the batch
        first = tiled_decode(decoder, z[:1], tile=tile)
        out = first.new_empty(z.shape[0], *first.shape[1:])
        out[:1] = first
        del first
        for i in range(1, z.shape[0]):
            out[i : i + 1] = tiled_decode(decoder, z[i : i + 1], tile=tile)
        return out
    steps = _decoder_steps(decoder)
    last_global = max((i for i, s in enumerate(steps) if s.radius is None), default=-1)
    x, scale = z, 1  # scale: resolution of x relative to the latent
    for step in steps[: last_global + 1]:
        if step.radius is None:
            x = tiled_attention(step.fn, x, core=tile * scale)
        else:
            x = tiled_local(step.fn, x, core=tile * scale, halo=math.ceil(step.radius), scale=step.scale)
            scale *= step.scale
    tail, halo, tail_scale = _fuse(steps[last_global + 1 :])
    return tiled_local(tail, x, core=tile * scale, halo=halo, scale=tail_scale)


# ------------------------------------------------------------------------------------------------- memory
#
# How much memory a decode takes beyond the weights, estimated from the decoder's structure, so the pipeline
# decodes in one pass when that fits the memory free and in tiles otherwise (`sana.generation.vae_tile_for`).
#
# Decoder stage s runs at 1/2^s of the output side with c_s channels: its maps hold c_s / 4^s values per
# output pixel (`map_width`). The widest of them (stage 0 in every published DC-AE: 128 channels at full
# resolution) sets the peak of a one-pass decode, which holds about UNTILED_MAPS such maps at once. Measured on
# the CPU with the real f32c32 config (random weights, 2 threads), peak RSS above the loaded model per output
# pixel: 2630 / 2435 / 2323 bytes at 512^2 / 1024^2 / 1536^2 in float32 (5.1 / 4.8 / 4.5 maps of 128 float32
# channels); bfloat16 took 0.88x the float32 figure at 1024^2 (the norms compute in float32), so the float32
# figure serves every dtype. A tiled decode holds the output, the largest whole low-resolution map twice (the
# input and output of an attention step), and one halo-widened tile of the fused high-resolution tail.
# ESTIMATE_MARGIN on top keeps the estimate above every measurement (docs/low-memory.md has the table).

UNTILED_MAPS = 5.2  # float32 maps of the widest stage alive at once (the largest measured, 512^2)
TILED_MAPS = 5.2  # the same inside one tile of the tail
ESTIMATE_MARGIN = 1.25
FLOAT32 = 4
TILE_CHOICES = (DEFAULT_TILE, 16, 12, 8, 4)  # tried in this order: the largest that fits


def map_width(config) -> float:
    """Channels per output pixel of the decoder's widest stage map: max over stages s of c_s / 4^s (a `DCAEConfig`;
    the head runs at full resolution on stage 0's channels, or stage 1's when stage 0 is empty)."""
    channels, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
    widths = [c / 4**s for s, (c, n) in enumerate(zip(channels, layers, strict=True)) if n > 0]
    return max([*widths, channels[0] if layers[0] > 0 else channels[1]])


def untiled_decode_bytes(config, batch: int, height: int, width: int) -> int:
    """Estimated peak bytes of a one-pass decode of `batch` images of height x width pixels."""
    return int(ESTIMATE_MARGIN * UNTILED_MAPS * FLOAT32 * map_width(config) * batch * height * width)


def tiled_decode_bytes(decoder: nn.Module, config, batch: int, height: int, width: int, tile: int) -> int:
    """Estimated peak bytes of `tiled_decode(decoder, ...)` in tiles of `tile` latents: the output (and its
    float32 copy), twice the largest whole map up to the last attention step, one widened tile of the tail."""
    channels, layers = config.decoder_block_out_channels, config.decoder_layers_per_block
    n, f = config.num_stages, config.spatial_compression
    types = config.stage_block_types("decoder")
    attention = [s for s in range(n) if layers[s] > 0 and types[s] == "EfficientViTBlock"]
    first = min(attention, default=n - 1)  # the shallowest stage run before the tail (stages run deepest first)
    latent = (height // f) * (width // f)
    whole = 2 * max(channels[s] * latent * 4 ** (n - 1 - s) for s in range(first, n))  # values
    steps = _decoder_steps(decoder)
    last_global = max((i for i, s in enumerate(steps) if s.radius is None), default=-1)
    scale = math.prod(s.scale for s in steps[: last_global + 1])
    _, halo, tail_scale = _fuse(steps[last_global + 1 :])
    side = (min(tile, max(height, width) // f) * scale + 2 * halo) * tail_scale  # output pixels of a window
    tail = TILED_MAPS * map_width(config) * side * side
    output = 2 * 3 * batch * height * width
    return int(ESTIMATE_MARGIN * FLOAT32 * (whole + tail + output))


def choose_tile(decoder: nn.Module, config, batch: int, height: int, width: int, headroom: int) -> int | None:
    """None (one pass) when the one-pass estimate fits in `headroom` bytes; else the largest of TILE_CHOICES whose
    tiled estimate fits (the smallest when none does: the least memory there is)."""
    if untiled_decode_bytes(config, batch, height, width) <= headroom:
        return None
    for tile in TILE_CHOICES:
        if tiled_decode_bytes(decoder, config, batch, height, width, tile) <= headroom:
            return tile
    return TILE_CHOICES[-1]
