"""The building blocks of the DC-AE (sana/models/dcae.py, which assembles them into the encoder and the decoder
and documents the architecture): the channel RMSNorm, the residual conv block, the EfficientViT block
(multi-scale ReLU linear attention + GLU-MBConv) and the resampling blocks with their space-to-channel
shortcuts. Tiled decoding (dcae_tiling.py) dispatches on these classes, so they live below both modules.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sana.models.attention import relu_linear_attention
from sana.models.layers import RMSNorm

NORM_EPS = 1e-5


class ChannelRMSNorm(RMSNorm):
    """RMSNorm (with bias) over the channel dim of a (B, C, H, W) map: the statistic is per pixel.

    Same parameters and precision policy as the parent; the reduction runs over dim 1 directly, the sum of
    squares is one fused reduction (no full-size x**2 is materialised) and the affine part is one fused
    multiply-add, because at decoder resolution every extra full-size pass is measurable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        l2 = torch.linalg.vector_norm(xf, dim=1, keepdim=True)  # (B, 1, H, W); not in place: autograd keeps it
        inv_rms = torch.rsqrt(l2.square() / x.shape[1] + self.eps)  # (B, 1, H, W)
        y = (xf * inv_rms).to(x.dtype)  # (B, C, H, W)
        weight = self.weight.to(x.dtype)[:, None, None]
        if self.bias is None:
            return y * weight
        return torch.addcmul(self.bias.to(x.dtype)[:, None, None], y, weight)


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "rms_norm":
        return ChannelRMSNorm(channels, eps=NORM_EPS, bias=True)
    return nn.BatchNorm2d(channels, eps=NORM_EPS)


def make_act(name: str) -> nn.Module:
    """Activations run in place: their input is always a fresh conv output that nothing else reads."""
    if name in ("silu", "swish"):
        return nn.SiLU(inplace=True)
    if name == "relu":
        return nn.ReLU(inplace=True)
    if name == "mish":
        return nn.Mish(inplace=True)
    return nn.GELU()  # exact erf form, as in the reference


# ----------------------------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
    """x + norm(conv3x3(act(conv3x3(x)))). The second conv has no bias: the norm's bias takes its place."""

    def __init__(self, channels: int, norm: str = "rms_norm", act: str = "silu") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.nonlinearity = make_act(act)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.norm = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(self.nonlinearity(self.conv1(x)))  # (B, C, H, W)
        return self.norm(h).add_(x)  # the norm output is fresh, so the residual can be added in place


class MultiscaleProjection(nn.Module):
    """One extra scale for q, k and v: a depthwise kxk conv (spatial aggregation), then a 1x1 conv that mixes
    channels only inside each head's group (groups = 3 * heads)."""

    def __init__(self, channels: int, heads: int, kernel_size: int) -> None:
        super().__init__()
        self.proj_in = nn.Conv2d(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False
        )
        self.proj_out = nn.Conv2d(channels, channels, 1, groups=3 * heads, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.proj_in(x))


class MultiscaleLinearAttention(nn.Module):
    """EfficientViT multi-scale ReLU linear attention with a normalised residual: x + norm(out(attn(x))).

    q, k, v (C channels each) are concatenated with their multi-scale aggregates into 3C(1 + K) channels and
    cut into groups of 3 * head_dim *consecutive* channels; each group is one head and splits into its own
    q, k and v. So with one extra scale there are 2C / head_dim heads, and head 0 takes q, k and v all from
    to_q's output. This grouping is how the published weights were trained (the original model used one
    fused qkv conv) and must not be "fixed" into per-projection heads.
    """

    def __init__(self, channels: int, head_dim: int, norm: str, kernel_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.head_dim = head_dim
        heads = channels // head_dim
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_qkv_multiscale = nn.ModuleList(MultiscaleProjection(3 * channels, heads, k) for k in kernel_sizes)
        self.to_out = nn.Linear(channels * (1 + len(kernel_sizes)), channels, bias=False)
        self.norm_out = make_norm(norm, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # One GEMM for q, k and v (their weights stacked) instead of three plus a concatenation.
        w_qkv = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])  # (3C, C)
        qkv = F.linear(x.movedim(1, -1), w_qkv).movedim(-1, 1)  # (B, 3C, H, W), channels-last in memory
        scales = [qkv] + [ms(qkv) for ms in self.to_qkv_multiscale]  # 1 + K maps of (B, 3C, H, W)
        # 3C is a multiple of 3d, so no head straddles two scales: each scale is attended on its own and to_out,
        # split by input columns, sums their projections. Same result as concatenating the scales first.
        out = None
        for qkv_s, w_out in zip(scales, self.to_out.weight.split(c, dim=1), strict=True):
            heads = qkv_s.movedim(1, -1).reshape(b, h * w, -1, 3 * self.head_dim)  # (B, N, C/d, 3d)
            heads = heads.transpose(1, 2)  # (B, C/d, N, 3d)
            q, k, v = heads.chunk(3, dim=-1)  # each (B, C/d, N, d)
            o = relu_linear_attention(q, k, v)  # (B, C/d, N, d); quadratic form when N <= d, fp32 sums
            o = o.transpose(1, 2).reshape(b * h * w, c)  # (B*N, C), channel = head * d + j
            out = F.linear(o, w_out) if out is None else out.addmm_(o, w_out.t())  # (B*N, C)
        out = out.view(b, h, w, c).movedim(-1, 1)  # (B, C, H, W)
        return self.norm_out(out).add_(x)


class GLUMBConv(nn.Module):
    """Gated inverted-bottleneck conv with a normalised residual (expand ratio 4):
    1x1 up to 2 * 4C -> SiLU -> depthwise 3x3 -> value * SiLU(gate) -> 1x1 down to C -> RMSNorm -> + x.
    The first channel half is the value, the second the gate."""

    def __init__(self, channels: int, expand_ratio: int = 4) -> None:
        super().__init__()
        hidden = expand_ratio * channels
        self.conv_inverted = nn.Conv2d(channels, 2 * hidden, 1)
        self.conv_depth = nn.Conv2d(2 * hidden, 2 * hidden, 3, padding=1, groups=2 * hidden)
        self.conv_point = nn.Conv2d(hidden, channels, 1, bias=False)
        self.norm = ChannelRMSNorm(channels, eps=NORM_EPS, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_depth(F.silu(self.conv_inverted(x), inplace=True))  # (B, 8C, H, W)
        value, gate = h.chunk(2, dim=1)  # each (B, 4C, H, W)
        h = self.conv_point(value * F.silu(gate))  # (B, C, H, W)
        return self.norm(h).add_(x)


class EfficientViTBlock(nn.Module):
    """Global context (multi-scale linear attention) then local mixing (GLU-MBConv), each with a residual."""

    def __init__(self, channels: int, head_dim: int, norm: str, kernel_sizes: tuple[int, ...]) -> None:
        super().__init__()
        self.attn = MultiscaleLinearAttention(channels, head_dim, norm, kernel_sizes)
        self.conv_out = GLUMBConv(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.attn(x))


class DownBlock(nn.Module):
    """2x downsampling: a strided 3x3 conv (or a 3x3 conv then pixel-unshuffle), plus, as a shortcut, the
    pixel-unshuffled input with groups of 4 * C_in / C_out consecutive channels averaged."""

    def __init__(self, c_in: int, c_out: int, pixel_unshuffle: bool, shortcut: bool = True) -> None:
        super().__init__()
        self.pixel_unshuffle = pixel_unshuffle
        self.shortcut = shortcut
        self.group = 4 * c_in // c_out
        if pixel_unshuffle:
            self.conv = nn.Conv2d(c_in, c_out // 4, 3, padding=1)
        else:
            self.conv = nn.Conv2d(c_in, c_out, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if self.pixel_unshuffle:
            h = F.pixel_unshuffle(h, 2)  # (B, C_out, H/2, W/2)
        if not self.shortcut:
            return h
        s = F.pixel_unshuffle(x, 2)  # (B, 4 C_in, H/2, W/2)
        return h + s.unflatten(1, (-1, self.group)).mean(2)  # (B, C_out, H/2, W/2)


class UpBlock(nn.Module):
    """2x upsampling: nearest-neighbour resize then a 3x3 conv (or a 3x3 conv then pixel-shuffle), plus, as a
    shortcut, every input channel repeated 4 * C_out / C_in times and pixel-shuffled."""

    def __init__(self, c_in: int, c_out: int, interpolate: bool, shortcut: bool = True) -> None:
        super().__init__()
        self.interpolate = interpolate
        self.shortcut = shortcut
        self.repeats = 4 * c_out // c_in
        self.conv = nn.Conv2d(c_in, c_out if interpolate else 4 * c_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.interpolate:
            h = self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))  # (B, C_out, 2H, 2W)
        else:
            h = F.pixel_shuffle(self.conv(x), 2)  # (B, C_out, 2H, 2W)
        if not self.shortcut:
            return h
        # The shortcut is pixel_shuffle(x.repeat_interleave(r, dim=1)): output pixel (2i + a, 2j + b) of channel c
        # reads input channel (4c + 2a + b) // r. Written as a broadcast view and added in place it costs one
        # pass instead of two full-resolution copies (measurable at the decoder's top stage).
        b, c_in, hh, ww = x.shape
        s = x[:, :, None].expand(b, c_in, self.repeats, hh, ww)  # (B, C_in, r, H, W): r copies of each channel
        s = s.reshape(b, -1, 2, 2, hh, ww).permute(0, 1, 4, 2, 5, 3)  # (B, C_out, H, 2, W, 2) = (c, i, a, j, b)
        # The view only splits H and W, so it aliases h in either memory format a conv returns (NCHW, NHWC).
        h.view(b, -1, hh, 2, ww, 2).add_(s)
        return h  # (B, C_out, 2H, 2W)
