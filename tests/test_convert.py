"""`sana convert`: original NVlabs .pth -> diffusers layout, by the published key map."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from sana.convert import convert_checkpoint, convert_state_dict, infer_config, read_original_checkpoint
from sana.models.dit import DIT_PRESETS, DiTConfig, SanaDiT
from sana.weights import CheckpointError


def to_original(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """Our (diffusers-named) state dict written back in the original code's names, fused as it fuses them."""
    inverse = {
        "patch_embed.proj": "x_embedder.proj",
        "caption_projection.linear_1": "y_embedder.y_proj.fc1",
        "caption_projection.linear_2": "y_embedder.y_proj.fc2",
        "time_embed.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
        "time_embed.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
        "time_embed.linear": "t_block.1",
        "caption_norm": "attention_y_norm",
        "proj_out": "final_layer.linear",
    }
    out = {"final_layer.scale_shift_table": state["scale_shift_table"]}
    for ours, theirs in inverse.items():
        for leaf in ("weight", "bias"):
            if f"{ours}.{leaf}" in state:
                out[f"{theirs}.{leaf}"] = state[f"{ours}.{leaf}"]
    for i in range(layers):
        b = f"transformer_blocks.{i}"
        o = f"blocks.{i}"
        out[f"{o}.scale_shift_table"] = state[f"{b}.scale_shift_table"]
        out[f"{o}.attn.qkv.weight"] = torch.cat([state[f"{b}.attn1.to_{x}.weight"] for x in "qkv"])
        for leaf in ("weight", "bias"):
            out[f"{o}.attn.proj.{leaf}"] = state[f"{b}.attn1.to_out.0.{leaf}"]
            out[f"{o}.cross_attn.q_linear.{leaf}"] = state[f"{b}.attn2.to_q.{leaf}"]
            out[f"{o}.cross_attn.kv_linear.{leaf}"] = torch.cat([state[f"{b}.attn2.to_{x}.{leaf}"] for x in "kv"])
            out[f"{o}.cross_attn.proj.{leaf}"] = state[f"{b}.attn2.to_out.0.{leaf}"]
            out[f"{o}.mlp.inverted_conv.conv.{leaf}"] = state[f"{b}.ff.conv_inverted.{leaf}"]
            out[f"{o}.mlp.depth_conv.conv.{leaf}"] = state[f"{b}.ff.conv_depth.{leaf}"]
        out[f"{o}.mlp.point_conv.conv.weight"] = state[f"{b}.ff.conv_point.weight"]
        for attn, name in (("attn1", "attn"), ("attn2", "cross_attn")):
            for x in "qk":
                if f"{b}.{attn}.norm_{x}.weight" in state:
                    out[f"{o}.{name}.{x}_norm.weight"] = state[f"{b}.{attn}.norm_{x}.weight"]
    # Keys the original keeps but inference never uses.
    out["pos_embed"] = torch.zeros(1, 4, 16)
    out["y_embedder.y_embedding"] = torch.zeros(3, 8)
    return out


def _random_model(config: DiTConfig) -> SanaDiT:
    torch.manual_seed(0)
    model = SanaDiT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    return model


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_convert_recovers_every_tensor(tmp_path, qk_norm):
    config = dataclasses.replace(DIT_PRESETS["tiny"], qk_norm=qk_norm)
    model = _random_model(config)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": to_original(model.state_dict(), config.num_layers), "step": 5}, path)
    converted = convert_state_dict(read_original_checkpoint(path))
    assert converted.keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(converted[k], v), k


def test_infer_config_of_a_600m_width_slice():
    config = dataclasses.replace(DIT_PRESETS["sana-600m-2k"], num_layers=1)
    with torch.device("meta"):
        state = SanaDiT(config).state_dict()
    assert infer_config(state, 2048) == config
    with pytest.raises(ValueError, match="image size must be one of"):
        infer_config(state, 768)


def test_convert_checkpoint_with_preset_and_dtype(tmp_path):
    config = DIT_PRESETS["tiny"]
    model = _random_model(config)
    path = tmp_path / "ckpt.pth"
    torch.save(to_original(model.state_dict(), config.num_layers), path)  # top-level state dict also works
    loaded = convert_checkpoint(path, preset="tiny", dtype=torch.bfloat16)
    assert loaded.config == config
    assert torch.equal(loaded.proj_out.weight, model.proj_out.weight.bfloat16())
    with pytest.raises(CheckpointError, match="missing keys"):
        convert_checkpoint(path, preset="sana-600m-1024")


def test_unknown_keys_and_unsafe_pickles_are_refused(tmp_path):
    config = DIT_PRESETS["tiny"]
    state = to_original(_random_model(config).state_dict(), config.num_layers)
    state["blocks.0.attn.something_new.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"unknown keys.*something_new"):
        convert_state_dict(state)
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"a": torch.zeros(1)}, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(CheckpointError, match="weights-only"):
        read_original_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        read_original_checkpoint(tmp_path / "missing.pth")
