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

import torch

from sana.errors import UserError
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
        i, name, leaf = m.group(1), m.group(2), m.group(3)
        prefix = f"transformer_blocks.{i}"
        if name in BLOCK_RENAMES:
            out[f"{prefix}.{BLOCK_RENAMES[name]}.{leaf}"] = value
        elif name in BLOCK_SPLITS:
            targets = BLOCK_SPLITS[name]
            for target, part in zip(targets, value.chunk(len(targets), dim=0), strict=True):
                out[f"{prefix}.{target}.{leaf}"] = part.clone()  # own storage, so saving does not share
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unknown keys in original checkpoint: {', '.join(sorted(unknown)[:10])}")
    return out


def infer_config(state: dict[str, torch.Tensor], image_size: int) -> DiTConfig:
    """The DiTConfig of a converted state dict: widths and depth from shapes, positions from the size."""
    if image_size not in _INTERPOLATION_BY_SIZE:
        raise UserError(f"image size must be one of {sorted(_INTERPOLATION_BY_SIZE)}, got {image_size}")
    missing = [k for k in _NEEDED_TO_INFER if k not in state]
    if missing or not any(k.startswith("transformer_blocks.") for k in state):
        raise CheckpointError(f"cannot infer the model from a checkpoint without {', '.join(missing) or 'blocks'}")
    width = state["patch_embed.proj.weight"].shape[0]
    if width not in _CROSS_BY_WIDTH:
        raise CheckpointError(f"unknown model width {width}; pass a preset instead")
    heads, head_dim = _CROSS_BY_WIDTH[width]
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("transformer_blocks."))
    return DiTConfig(
        in_channels=state["patch_embed.proj.weight"].shape[1],
        out_channels=state["proj_out.weight"].shape[0],
        num_attention_heads=width // 32,
        attention_head_dim=32,
        num_layers=layers,
        num_cross_attention_heads=heads,
        cross_attention_head_dim=head_dim,
        cross_attention_dim=width,
        caption_channels=state["caption_projection.linear_1.weight"].shape[1],
        sample_size=image_size // 32,
        interpolation_scale=_INTERPOLATION_BY_SIZE[image_size],
        qk_norm="rms_norm_across_heads" if "transformer_blocks.0.attn1.norm_q.weight" in state else None,
    )


def flow_shift_for(image_size: int) -> float:
    """Sampling shift the published schedulers use: 6 for 4K, 3 otherwise."""
    return 6.0 if image_size >= 4096 else 3.0


def convert_checkpoint(
    path: str | Path, *, image_size: int = 1024, preset: str | None = None, dtype: torch.dtype | None = None
) -> SanaDiT:
    """An original .pth as a loaded SanaDiT (config inferred, or taken from a named preset)."""
    state = convert_state_dict(read_original_checkpoint(path))
    if preset is not None:
        if preset not in DIT_PRESETS:
            raise UserError(f"unknown preset {preset!r}; choose from {', '.join(DIT_PRESETS)}")
        config = DIT_PRESETS[preset]
    else:
        config = infer_config(state, image_size)
    with torch.device("meta"):
        model = SanaDiT(config)
    check_keys(model, {k: (tuple(v.shape), Path(path)) for k, v in state.items()}, str(path))
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
