"""The shipped model's build steps that are not training: assembling the encoders' folder, shipping."""

from __future__ import annotations

import json

import pytest
import torch

from sana.pretrained import load_components, model_instruction, save_components, write_instruction
from sana.shapes import build
from sana.tiny import tiny_components


@pytest.fixture()
def trained(tmp_path):
    """Stand-ins for the three training runs' exports, made of the tiny model's parts."""
    parts = tiny_components(seed=0)
    full = tmp_path / "full"
    save_components(parts, full)
    return parts, full


def test_components_folder_serves_sana_cache_and_declares_bare_captions(tmp_path, trained):
    _, full = trained
    out = build.assemble_components(full, full, tmp_path / "components", flow_shift=1.0)
    parts = load_components(out, parts=("vae", "text_encoder"))
    assert parts.text_encoder.instruction is None and model_instruction(out) is None
    assert parts.scheduler.flow_shift == 1.0 and parts.scheduler.sampler == "dpm"
    index = json.loads((out / "model_index.json").read_text())
    assert "transformer" not in index and index["vae"] == ["diffusers", "AutoencoderDC"]
    assert not (tmp_path / ".tmp-components").exists()


def test_ship_writes_float16_under_budget_or_nothing(tmp_path, trained, monkeypatch):
    parts, full = trained
    write_instruction(full, None)
    out = build.ship(full, tmp_path / "shipped")
    shipped = load_components(out, dtype=torch.float32)
    for name in ("transformer", "vae"):
        ref = getattr(parts, name).state_dict()
        for k, v in getattr(shipped, name).state_dict().items():
            assert torch.equal(v, ref[k].half().float()), k
    assert shipped.text_encoder.instruction is None

    monkeypatch.setattr(build, "SHIPPED_BUDGET_BYTES", 1000)
    with pytest.raises(RuntimeError, match="over the 30 MiB budget"):
        build.ship(full, tmp_path / "too-big")
    assert not (tmp_path / "too-big").exists() and not (tmp_path / ".tmp-too-big").exists()
