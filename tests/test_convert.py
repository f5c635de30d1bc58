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


# ------------------------------------------------------------------------------------------- ControlNets


def to_original_controlnet(base, controlnet, with_base: bool = True) -> dict[str, torch.Tensor]:
    """A ControlNet and its base written as the original code saves its `SanaMSControlNet`: the base's keys (the
    embedders shared), `controlnet.{i}.copied_block.*` in the base's block names, `before_proj`, `after_proj`."""
    state, base_state = controlnet.state_dict(), base.state_dict()
    head = {k: base_state[k] for k in ("scale_shift_table", "proj_out.weight", "proj_out.bias")}
    copied = to_original({**state, **head}, controlnet.config.num_layers)  # the copied blocks in original names
    out = to_original(base_state, base.config.num_layers if with_base else 0)
    if not with_base:  # only the embedders the ControlNet shares
        out = {k: v for k, v in out.items() if not k.startswith("final_layer.")}
    for key, value in copied.items():
        if key.startswith("blocks."):
            i, rest = key.removeprefix("blocks.").split(".", 1)
            out[f"controlnet.{i}.copied_block.{rest}"] = value
    for leaf in ("weight", "bias"):
        out[f"controlnet.0.before_proj.{leaf}"] = state[f"input_block.{leaf}"]
        for i in range(controlnet.config.num_layers):
            out[f"controlnet.{i}.after_proj.{leaf}"] = state[f"controlnet_blocks.{i}.{leaf}"]
    return out


def _controlnet_pair(seed: int = 0):
    """A random 3-block tiny base and a 2-block ControlNet sharing its embedders (as the original's does)."""
    from sana.models.controlnet import SanaControlNet

    g = torch.Generator().manual_seed(seed)
    base = SanaDiT(dataclasses.replace(DIT_PRESETS["tiny"], num_layers=3))
    with torch.no_grad():  # moderate activations, so the ControlNet's part is not lost in the base's
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    controlnet = SanaControlNet.from_transformer(base, 2)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("transformer_blocks.", "input_block.", "controlnet_blocks.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return base.eval(), controlnet.eval()


def test_convert_controlnet_recovers_every_tensor(tmp_path):
    from sana.convert import convert_controlnet_checkpoint, convert_controlnet_state_dict

    base, controlnet = _controlnet_pair()
    original = to_original_controlnet(base, controlnet)
    state, base_state = convert_controlnet_state_dict(original)
    assert state.keys() == controlnet.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in controlnet.state_dict().items())
    assert base_state.keys() == base.state_dict().keys()
    torch.save({"state_dict": original}, tmp_path / "cn.pth")
    loaded, loaded_base = convert_controlnet_checkpoint(tmp_path / "cn.pth", preset=base.config)
    assert loaded.config == controlnet.config and loaded_base.config == base.config
    # Without the base's blocks the file still gives the ControlNet.
    torch.save(to_original_controlnet(base, controlnet, with_base=False), tmp_path / "alone.pth")
    alone, none = convert_controlnet_checkpoint(tmp_path / "alone.pth", preset=base.config)
    assert none is None and all(torch.equal(alone.state_dict()[k], v) for k, v in controlnet.state_dict().items())
    with pytest.raises(CheckpointError, match="is a ControlNet checkpoint"):
        convert_checkpoint(tmp_path / "cn.pth")
    original["controlnet.1.before_proj.weight"] = torch.zeros(1)
    with pytest.raises(
        CheckpointError, match=r"unknown keys in original ControlNet checkpoint: controlnet.1.before"
    ):
        convert_controlnet_state_dict(original)


def test_converted_controlnet_folder_runs_in_diffusers_as_the_models_it_came_from(tmp_path, capsys):
    """Property: `sana convert` on the original layout writes folders that diffusers loads, and diffusers'
    ControlNet + transformer on them give the output of the models the checkpoint was written from."""
    diffusers = pytest.importorskip("diffusers")
    from sana.cli.main import main
    from sana.generation import controlled_model, dit_model
    from sana.pretrained import save_components
    from sana.tiny import tiny_components
    from sana.types import Conditioning, TextEmbeddings

    base, controlnet = _controlnet_pair(seed=1)
    parts = tiny_components(seed=0)  # a folder whose transformer has the base's config: what --base reads
    parts.transformer = _random_model(base.config)
    save_components(parts, tmp_path / "base")
    torch.save({"state_dict": to_original_controlnet(base, controlnet)}, tmp_path / "cn.pth")
    assert (
        main(["convert", str(tmp_path / "cn.pth"), str(tmp_path / "out"), "--base", str(tmp_path / "base")]) == 0
    )
    assert "wrote a complete model folder" in capsys.readouterr().out
    theirs_cn = diffusers.SanaControlNetModel.from_pretrained(tmp_path / "out" / "controlnet").eval()
    theirs = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "out" / "transformer").eval()

    g = torch.Generator().manual_seed(3)
    x, control = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 4, 8, 12, generator=g)
    hidden, mask = torch.randn(2, 5, 8, generator=g), torch.tensor([[1] * 5, [1, 1, 0, 0, 0]])
    t = torch.tensor([700.0, 20.0])
    with torch.no_grad():
        samples = theirs_cn(x, hidden, t, control, 0.8, encoder_attention_mask=mask, return_dict=False)[0]
        ref = theirs(x, hidden, t, encoder_attention_mask=mask, controlnet_block_samples=tuple(samples)).sample
        model = controlled_model(dit_model(base, torch.device("cpu"), torch.float32), controlnet, 0.8,
                                 torch.device("cpu"), torch.float32)  # fmt: skip
        out = model(x, t, Conditioning(TextEmbeddings(hidden, mask), control=control))
        plain = base(x, t, Conditioning(TextEmbeddings(hidden, mask)))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert (out - plain).abs().max() > 0.1 * ref.abs().max()  # the ControlNet matters


def test_convert_a_controlnet_onto_a_base_folder(tmp_path, capsys):
    """A ControlNet file without its base, with --base: a complete SanaControlNetPipeline folder; a base it does
    not fit is a one-line error naming the field, and nothing is written."""
    diffusers = pytest.importorskip("diffusers")
    from sana.cli.main import main
    from sana.models.controlnet import SanaControlNet
    from sana.models.dit import SanaDiT
    from sana.pretrained import save_components
    from sana.tiny import tiny_components

    parts = tiny_components(seed=0)
    parts.transformer = _random_model(dataclasses.replace(parts.transformer.config, num_layers=3)).eval()
    save_components(parts, tmp_path / "base")
    controlnet = SanaControlNet.from_transformer(parts.transformer, 2)
    torch.save(to_original_controlnet(parts.transformer, controlnet, with_base=False), tmp_path / "cn.pth")
    assert (
        main(["convert", str(tmp_path / "cn.pth"), str(tmp_path / "full"), "--base", str(tmp_path / "base")]) == 0
    )
    pipe = diffusers.SanaControlNetPipeline.from_pretrained(tmp_path / "full")
    assert isinstance(pipe.controlnet, diffusers.SanaControlNetModel)
    assert torch.equal(pipe.controlnet.input_block.weight, controlnet.input_block.weight)

    other = tiny_components(seed=0)
    config = dataclasses.replace(other.transformer.config, num_attention_heads=4, cross_attention_dim=32)
    other.transformer = SanaDiT(config)
    save_components(other, tmp_path / "wide")
    assert (
        main(["convert", str(tmp_path / "cn.pth"), str(tmp_path / "bad"), "--base", str(tmp_path / "wide")]) == 2
    )
    assert "num_attention_heads x attention_head_dim is 16, the base's is 32" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
