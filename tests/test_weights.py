"""Weights I/O: diffusers-layout component folders, strict key checks, bad files, atomic writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sana.config import ConfigError
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.types import Conditioning, TextEmbeddings
from sana.weights import INDEX_NAME, WEIGHTS_NAME, CheckpointError, atomic_write, load_model, save_model

diffusers = pytest.importorskip("diffusers")


@pytest.fixture
def tiny_dit() -> SanaDiT:
    torch.manual_seed(0)
    model = SanaDiT(DIT_PRESETS["tiny"])
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes the output path; make every weight matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _inputs(model: SanaDiT):
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    text = TextEmbeddings(torch.randn(2, 5, cfg.caption_channels, generator=g), torch.ones(2, 5, dtype=torch.long))
    return x, torch.tensor([999.0, 10.0]), Conditioning(text)


def test_round_trip_and_dtypes(tiny_dit, tmp_path):
    save_model(tiny_dit, tmp_path / "transformer")
    loaded = load_model(SanaDiT, tmp_path / "transformer")
    assert loaded.config == tiny_dit.config
    for k, v in tiny_dit.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x, t, cond = _inputs(tiny_dit)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, t, cond), tiny_dit(x, t, cond), rtol=0, atol=0)
    for dtype in (torch.bfloat16, torch.float16):
        low = load_model(SanaDiT, tmp_path / "transformer", dtype=dtype)
        assert all(p.dtype == dtype for p in low.parameters())
        assert not any(p.is_meta for p in low.parameters())


def test_diffusers_reads_what_we_write_and_we_read_what_it_writes(tiny_dit, tmp_path):
    save_model(tiny_dit, tmp_path / "ours")
    theirs = diffusers.SanaTransformer2DModel.from_pretrained(tmp_path / "ours").eval()
    x, t, cond = _inputs(tiny_dit)
    with torch.no_grad():
        ref = theirs(x, cond.text.hidden, t, encoder_attention_mask=cond.text.mask).sample
        torch.testing.assert_close(tiny_dit(x, t, cond), ref, rtol=1e-4, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")
    again = load_model(SanaDiT, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(again(x, t, cond), ref, rtol=1e-4, atol=1e-5)


def test_sharded_checkpoint_loads(tiny_dit, tmp_path):
    folder = tmp_path / "sharded"
    save_model(tiny_dit, folder)
    state = load_file(folder / WEIGHTS_NAME)
    (folder / WEIGHTS_NAME).unlink()
    keys = sorted(state)
    shards = {"a.safetensors": keys[: len(keys) // 2], "b.safetensors": keys[len(keys) // 2 :]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, folder / name)
    weight_map = {k: name for name, ks in shards.items() for k in ks}
    (folder / INDEX_NAME).write_text(json.dumps({"weight_map": weight_map}))
    loaded = load_model(SanaDiT, folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def _rewrite(folder, edit) -> None:
    state = load_file(folder / WEIGHTS_NAME)
    edit(state)
    save_file(state, folder / WEIGHTS_NAME)


def test_missing_unexpected_and_misshaped_keys_are_listed(tiny_dit, tmp_path):
    folder = tmp_path / "t"
    save_model(tiny_dit, folder)
    _rewrite(folder, lambda s: s.pop("proj_out.bias"))
    with pytest.raises(CheckpointError, match=r"missing keys: proj_out\.bias"):
        load_model(SanaDiT, folder)
    save_model(tiny_dit, folder)
    _rewrite(folder, lambda s: s.update({"extra.weight": torch.zeros(1), "other": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra\.weight, other"):
        load_model(SanaDiT, folder)
    save_model(tiny_dit, folder)
    _rewrite(folder, lambda s: s.update({"caption_norm.weight": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"shape mismatch: caption_norm\.weight \(3,\) != \(16,\)"):
        load_model(SanaDiT, folder)


def test_truncated_and_foreign_files_fail_with_one_line(tiny_dit, tmp_path):
    folder = tmp_path / "t"
    save_model(tiny_dit, folder)
    path = folder / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as err:
        load_model(SanaDiT, folder)
    assert "\n" not in str(err.value)
    torch.save(tiny_dit.state_dict(), path)  # a pickle under the safetensors name
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_model(SanaDiT, folder)
    path.unlink()
    (folder / "model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="convert it with `sana convert`"):
        load_model(SanaDiT, folder)


def test_config_with_unknown_field_is_rejected_by_name(tiny_dit, tmp_path):
    folder = tmp_path / "t"
    save_model(tiny_dit, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_layerz"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown field.*num_layerz"):
        load_model(SanaDiT, folder)
    with pytest.raises(CheckpointError, match="no such model folder"):
        load_model(SanaDiT, tmp_path / "nowhere")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("good")

    def broken(p):
        p.write_text("half")
        raise KeyboardInterrupt  # like a kill in the middle of a save

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, broken)
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]
