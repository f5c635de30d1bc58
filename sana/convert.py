"""NVlabs/Sana training checkpoints (.pth) -> the diffusers transformer layout this project loads.

The original code stores the DiT under different names and fuses some projections (self-attention q/k/v in
one `qkv` matrix, cross-attention k/v in one `kv_linear`). The mapping below is the published one (the
diffusers conversion script); keys the original keeps but never uses at inference (`pos_embed`, the learned
null caption `y_embedder.y_embedding`, `logvar_linear`) are dropped. Anything else unknown is an error.

Only `torch.load(weights_only=True)` is used: a .pth is a pickle, and a pickle can run code.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from sana.config import ConfigError
from sana.errors import UserError
from sana.models.controlnet import ControlNetConfig, SanaControlNet
from sana.models.dit import DIT_PRESETS, DiTConfig, SanaDiT
from sana.weights import CheckpointError, check_keys

# Whole-model renames of a module (its .weight/.bias follow) or of one parameter (original -> diffusers).
RENAMES = {
    "x_embedder.proj": "patch_embed.proj",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "t_embedder.mlp.0": "time_embed.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_embed.emb.timestep_embedder.linear_2",
    "t_block.1": "time_embed.linear",
    "attention_y_norm": "caption_norm",
    "final_layer.linear": "proj_out",
    "final_layer.scale_shift_table": "scale_shift_table",
}
# Per-block renames, under blocks.{i}. -> transformer_blocks.{i}.
BLOCK_RENAMES = {
    "scale_shift_table": "scale_shift_table",
    "attn.proj": "attn1.to_out.0",
    "attn.q_norm": "attn1.norm_q",
    "attn.k_norm": "attn1.norm_k",
    "mlp.inverted_conv.conv": "ff.conv_inverted",
    "mlp.depth_conv.conv": "ff.conv_depth",
    "mlp.point_conv.conv": "ff.conv_point",
    "cross_attn.q_linear": "attn2.to_q",
    "cross_attn.proj": "attn2.to_out.0",
    "cross_attn.q_norm": "attn2.norm_q",
    "cross_attn.k_norm": "attn2.norm_k",
}
# Fused projections, split along the output dimension in this order.
BLOCK_SPLITS = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
UNUSED = re.compile(r"^(pos_embed|y_embedder\.y_embedding|logvar_linear\..*)$")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$|^blocks\.(\d+)\.(scale_shift_table)$")

# The original code names its models by width; the cross-attention split is not visible in shapes.
_CROSS_BY_WIDTH = {1152: (16, 72), 2240: (20, 112)}
_INTERPOLATION_BY_SIZE = {512: None, 1024: None, 2048: 1.0, 4096: 2.0}
_NEEDED_TO_INFER = ("patch_embed.proj.weight", "proj_out.weight", "caption_projection.linear_1.weight")


def read_original_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The DiT state dict inside an original .pth (top level or under "state_dict")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such checkpoint file: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # unpickling refused or failed: say which file, and why, on one line
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} as a weights-only .pth: {reason}") from None
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds no tensor state dict (top level or under 'state_dict')")
    return state


def _convert_block_param(
    prefix: str, name: str, leaf: str, value: torch.Tensor, out: dict[str, torch.Tensor]
) -> bool:
    """Put one original block parameter (`name`.`leaf`, e.g. "attn.qkv", "weight") into `out` under `prefix`
    (e.g. "transformer_blocks.3"), split if fused; False if the name is unknown."""
    if name in BLOCK_RENAMES:
        out[f"{prefix}.{BLOCK_RENAMES[name]}.{leaf}"] = value
    elif name in BLOCK_SPLITS:
        targets = BLOCK_SPLITS[name]
        for target, part in zip(targets, value.chunk(len(targets), dim=0), strict=True):
            out[f"{prefix}.{target}.{leaf}"] = part.clone()  # own storage, so saving does not share
    else:
        return False
    return True


def convert_state_dict(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename and split original keys; every key must be known, mapped or deliberately dropped."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in original.items():
        if UNUSED.match(key):
            continue
        if key in RENAMES:  # a parameter renamed whole (scale_shift_table)
            out[RENAMES[key]] = value
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in RENAMES:
            out[f"{RENAMES[stem]}.{leaf}"] = value
            continue
        m = _BLOCK_KEY.match(key)
        if m is None:
            unknown.append(key)
            continue
        if m.group(5):  # blocks.{i}.scale_shift_table
            out[f"transformer_blocks.{m.group(4)}.scale_shift_table"] = value
            continue
        if not _convert_block_param(f"transformer_blocks.{m.group(1)}", m.group(2), m.group(3), value, out):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unknown keys in original checkpoint: {', '.join(sorted(unknown)[:10])}")
    return out


def _inferred_widths(state: dict[str, torch.Tensor], image_size: int, needed: tuple[str, ...]) -> dict[str, Any]:
    """The config fields a DiT and a ControlNet share, read from a converted state dict's shapes and the size."""
    if image_size not in _INTERPOLATION_BY_SIZE:
        raise UserError(f"image size must be one of {sorted(_INTERPOLATION_BY_SIZE)}, got {image_size}")
    missing = [k for k in needed if k not in state]
    if missing or not any(k.startswith("transformer_blocks.") for k in state):
        raise CheckpointError(f"cannot infer the model from a checkpoint without {', '.join(missing) or 'blocks'}")
    width = state["patch_embed.proj.weight"].shape[0]
    if width not in _CROSS_BY_WIDTH:
        raise CheckpointError(f"unknown model width {width}; pass a preset instead")
    heads, head_dim = _CROSS_BY_WIDTH[width]
    return dict(
        in_channels=state["patch_embed.proj.weight"].shape[1],
        num_attention_heads=width // 32,
        attention_head_dim=32,
        num_layers=1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks.")),
        num_cross_attention_heads=heads,
        cross_attention_head_dim=head_dim,
        cross_attention_dim=width,
        caption_channels=state["caption_projection.linear_1.weight"].shape[1],
        sample_size=image_size // 32,
        interpolation_scale=_INTERPOLATION_BY_SIZE[image_size],
    )


def infer_config(state: dict[str, torch.Tensor], image_size: int) -> DiTConfig:
    """The DiTConfig of a converted state dict: widths and depth from shapes, positions from the size."""
    return DiTConfig(
        **_inferred_widths(state, image_size, _NEEDED_TO_INFER),
        out_channels=state["proj_out.weight"].shape[0],
        qk_norm="rms_norm_across_heads" if "transformer_blocks.0.attn1.norm_q.weight" in state else None,
    )


def flow_shift_for(image_size: int) -> float:
    """Sampling shift the published schedulers use: 6 for 4K, 3 otherwise."""
    return 6.0 if image_size >= 4096 else 3.0


def convert_checkpoint(
    path: str | Path, *, image_size: int = 1024, preset: str | None = None, dtype: torch.dtype | None = None
) -> SanaDiT:
    """An original .pth as a loaded SanaDiT (config inferred, or taken from a named preset)."""
    original = read_original_checkpoint(path)
    if is_controlnet_checkpoint(original):
        raise CheckpointError(f"{path} is a ControlNet checkpoint: convert it with convert_controlnet_checkpoint")
    return _dit_from(convert_state_dict(original), image_size, preset, dtype, Path(path))


def _dit_from(
    state: dict[str, torch.Tensor], image_size: int, preset: Preset, dtype: torch.dtype | None, path: Path
) -> SanaDiT:
    config = infer_config(state, image_size) if preset is None else _preset_config(preset)
    return _filled(SanaDiT, config, state, dtype, path)


Preset = str | DiTConfig | None  # a DIT_PRESETS name, a config (e.g. a base folder's), or None: inferred


def _preset_config(preset: str | DiTConfig) -> DiTConfig:
    if isinstance(preset, DiTConfig):
        return preset
    if preset not in DIT_PRESETS:
        raise UserError(f"unknown preset {preset!r}; choose from {', '.join(DIT_PRESETS)}")
    return DIT_PRESETS[preset]


def _filled(cls: type, config: Any, state: dict[str, torch.Tensor], dtype: torch.dtype | None, path: Path):
    """`cls(config)` holding `state` exactly (every key checked first, one line naming what does not fit)."""
    with torch.device("meta"):
        model = cls(config)
    check_keys(model, {k: (tuple(v.shape), path) for k, v in state.items()}, str(path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


# ------------------------------------------------------------------------------------------- ControlNets
#
# The original ControlNet (NVlabs `SanaMSControlNet`) is one module holding the base DiT and, under
# `controlnet.{i}`, a copy of base block i (`copied_block`) with its output projection (`after_proj`); block 0
# also has the control input projection (`before_proj`). The embedders are the base's, shared. In diffusers'
# layout the ControlNet is its own model holding copies of those embedders: `input_block` is `before_proj`,
# `controlnet_blocks.{i}` is `after_proj`, and each copied block's names map as a base block's do.
# (The two code bases also wire the branch differently: the original feeds ControlNet block 0 with base block
# 0's output and adds residual i before base block i + 1; diffusers feeds it the patch embedding and adds
# residual i after base block i + 1. Converted weights run as diffusers runs them.)

_CONTROL_PROJECTION = re.compile(r"^controlnet\.(\d+)\.(before_proj|after_proj)\.(weight|bias)$")
_COPIED_BLOCK = re.compile(r"^controlnet\.(\d+)\.copied_block\.(?:(.+)\.(weight|bias)|(scale_shift_table))$")
# What the ControlNet copies from the base: the patch, time and caption embeddings.
SHARED_PREFIXES = ("patch_embed.", "time_embed.", "caption_projection.", "caption_norm.")


def is_controlnet_checkpoint(original: dict[str, torch.Tensor]) -> bool:
    return any(k.startswith("controlnet.") for k in original)


def convert_controlnet_state_dict(
    original: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """An original ControlNet checkpoint -> (the SanaControlNetModel state dict, the base DiT's state dict, or
    None when the file holds no base blocks). Every key must be known."""
    control = {k: v for k, v in original.items() if k.startswith("controlnet.")}
    base = convert_state_dict({k: v for k, v in original.items() if not k.startswith("controlnet.")})
    out = {k: v for k, v in base.items() if k.startswith(SHARED_PREFIXES)}
    unknown = []
    for key, value in control.items():
        m = _CONTROL_PROJECTION.match(key)
        if m is not None:
            i, kind, leaf = m.groups()
            if kind == "before_proj" and i == "0":
                out[f"input_block.{leaf}"] = value
            elif kind == "after_proj":
                out[f"controlnet_blocks.{i}.{leaf}"] = value
            else:
                unknown.append(key)
            continue
        m = _COPIED_BLOCK.match(key)
        if m is None:
            unknown.append(key)
        elif m.group(4):
            out[f"transformer_blocks.{m.group(1)}.scale_shift_table"] = value
        elif not _convert_block_param(f"transformer_blocks.{m.group(1)}", m.group(2), m.group(3), value, out):
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unknown keys in original ControlNet checkpoint: {', '.join(sorted(unknown)[:10])}")
    has_base = any(k.startswith("transformer_blocks.") for k in base)
    return out, base if has_base else None


def infer_controlnet_config(
    state: dict[str, torch.Tensor], image_size: int, base: DiTConfig | None = None
) -> ControlNetConfig:
    """The ControlNetConfig of a converted ControlNet state dict: the config of a ControlNet for `base` (the
    model it steers) with the depth of `state`, or without a base, widths (published ones only) and depth from
    the shapes. A state whose shapes cannot steer `base` is a one-line ConfigError naming the field."""
    needed = ("patch_embed.proj.weight", "caption_projection.linear_1.weight")
    if base is None:
        return ControlNetConfig(**_inferred_widths(state, image_size, needed))
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"cannot infer the ControlNet from a checkpoint without {', '.join(missing)}")
    width, in_channels = state["patch_embed.proj.weight"].shape[:2]
    seen = {
        "in_channels": (in_channels, base.in_channels),
        "caption_channels": (state["caption_projection.linear_1.weight"].shape[1], base.caption_channels),
        "num_attention_heads x attention_head_dim": (width, base.hidden_size),
    }
    for name, (mine, theirs) in seen.items():
        if mine != theirs:
            raise ConfigError(
                f"the ControlNet does not fit the base model: {name} is {mine}, the base's is {theirs}"
            )
    layers = 1 + max((int(k.split(".")[1]) for k in state if k.startswith("controlnet_blocks.")), default=-1)
    return ControlNetConfig.from_dit(base, layers)


def convert_controlnet_checkpoint(
    path: str | Path, *, image_size: int = 1024, preset: Preset = None, dtype: torch.dtype | None = None
) -> tuple[SanaControlNet, SanaDiT | None]:
    """An original ControlNet .pth as (the loaded SanaControlNet, the base SanaDiT it holds, or None).
    `preset` (a DIT_PRESETS name or a DiTConfig) is the base's config, else it is inferred from the shapes;
    the ControlNet's is the base's with its own depth (see `infer_controlnet_config`)."""
    original = read_original_checkpoint(path)
    if not is_controlnet_checkpoint(original):
        raise CheckpointError(
            f"{path} holds no ControlNet (no controlnet.* keys): convert it with convert_checkpoint"
        )
    model, controlnet = convert_original(original, image_size=image_size, preset=preset, dtype=dtype, source=path)
    return controlnet, model


def convert_original(
    original: dict[str, torch.Tensor],
    *,
    image_size: int = 1024,
    preset: Preset = None,
    dtype: torch.dtype | None = None,
    source: str | Path = "checkpoint",
) -> tuple[SanaDiT | None, SanaControlNet | None]:
    """An original state dict (`read_original_checkpoint`) as models: (the DiT, None) for a DiT checkpoint;
    (the base DiT or None, the ControlNet) for a ControlNet checkpoint. `source` names the file in errors."""
    path = Path(source)
    if not is_controlnet_checkpoint(original):
        return _dit_from(convert_state_dict(original), image_size, preset, dtype, path), None
    state, base_state = convert_controlnet_state_dict(original)
    base = None if base_state is None else _dit_from(base_state, image_size, preset, dtype, path)
    like = base.config if base is not None else None if preset is None else _preset_config(preset)
    config = infer_controlnet_config(state, image_size, like)
    return base, _filled(SanaControlNet, config, state, dtype, path)
