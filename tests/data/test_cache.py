"""The latent cache: cached batches equal encoding raw batches, resume after interruption, atomic shards, CLI."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

from sana.cli.main import main
from sana.data import DataConfig, build_cache, build_loader, load_null_text
from sana.pretrained import save_components
from sana.tiny import tiny_components
from tests.data import test_sources as src

# Six images in two buckets at 64 (64x64 and 32x96), some with several scored captions.
SPECS = src.SPECS[:6]
SCORES = {"animals/cat": [0.30, 0.33], "bird": [0.2, 0.21], "car": [0.31, 0.26]}


@pytest.fixture(scope="module")
def models():
    parts = tiny_components(seed=0)
    return parts.vae, parts.text_encoder


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(src.write_jsonl(tmp_path_factory.mktemp("raw"), SPECS, SCORES))


def build(manifest, out, models, **kw):
    vae, text_encoder = models
    data = DataConfig(path=manifest, resolution=64)
    return build_cache(data, out, vae=vae, text_encoder=text_encoder, shard_size=2, batch_size=3, **kw)


def test_cached_batches_equal_encoding_raw_batches(manifest, tmp_path, models):
    vae, text_encoder = models
    report = build(manifest, tmp_path, models)
    assert (report.samples, report.shards_written, report.shards_reused) == (6, 3, 0)
    raw = build_loader(DataConfig(path=manifest, batch_size=2, resolution=64, caption_temperature=0.02), seed=4)
    cfg = DataConfig(path=str(tmp_path), batch_size=2, resolution=64, caption_temperature=0.02)
    cached = build_loader(cfg, seed=4)
    assert cached.batches_per_epoch == raw.batches_per_epoch == 3
    it_raw, it_cached = iter(raw), iter(cached)
    for _ in range(raw.batches_per_epoch + 1):  # into the second epoch, whose caption draws differ
        r, c = next(it_raw), next(it_cached)
        assert c["keys"] == r["keys"]
        with torch.no_grad():
            torch.testing.assert_close(c["latents"], vae.encode(r["images"]), atol=1e-5, rtol=1e-5)
            text = text_encoder.encode(r["captions"])
        assert c["text_mask"].dtype == torch.int64 and torch.equal(c["text_mask"], text.mask)
        assert c["text_hidden"].shape == text.hidden.shape
        attended = text.mask.bool()
        torch.testing.assert_close(c["text_hidden"][attended], text.hidden[attended], atol=1e-5, rtol=1e-5)
        assert c["text_hidden"][~attended].abs().max() == 0
    null = load_null_text(tmp_path)
    expected = text_encoder.encode_unconditional([""])
    assert torch.equal(null.mask, expected.mask) and torch.allclose(null.hidden, expected.hidden)


def test_resume_after_interruption_reuses_finished_shards(manifest, tmp_path, models):
    build(manifest, tmp_path, models)
    shards = sorted(tmp_path.glob("shard-*.safetensors"))
    index = json.loads((tmp_path / "index.json").read_text())
    before = {p.name: os.stat(p).st_ino for p in shards}
    shards[-1].unlink()
    (tmp_path / "index.json").unlink()
    report = build(manifest, tmp_path, models)
    assert (report.shards_written, report.shards_reused) == (1, 2)
    assert {p.name: os.stat(p).st_ino for p in shards[:-1]} == {n: before[n] for n in list(before)[:-1]}
    assert json.loads((tmp_path / "index.json").read_text()) == index
    with pytest.raises(ValueError, match="other settings"):
        vae, text_encoder = models
        build_cache(
            DataConfig(path=manifest, resolution=96), tmp_path, vae=vae, text_encoder=text_encoder, shard_size=2
        )


def test_a_crash_while_writing_leaves_no_half_shard(manifest, tmp_path, models, monkeypatch):
    import safetensors.torch

    real_save, calls = safetensors.torch.save_file, []

    def dying_save(tensors, path, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            with open(path, "wb") as f:
                f.write(b"\x00" * 100)  # half a file ...
            raise KeyboardInterrupt  # ... then the process is interrupted
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        build(manifest, tmp_path, models)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.safetensors"]  # no temp file, no index
    with safe_open(str(tmp_path / "shard-00000.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 6  # two complete samples
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert build(manifest, tmp_path, models).shards_reused == 1


def test_cache_kind_checks_resolution(manifest, tmp_path, models):
    build(manifest, tmp_path, models)
    with pytest.raises(ValueError, match="set resolution: 64 and buckets: true"):
        build_loader(DataConfig(path=str(tmp_path), resolution=512), seed=0)


def test_cli_cache_flags_and_config(manifest, tmp_path, capsys):
    model = tmp_path / "model"
    save_components(tiny_components(seed=0), model)
    out = tmp_path / "cache"
    argv = ["cache", manifest, "--model", str(model), "--out", str(out), "--resolution", "64", "--shard-size", "4"]
    assert main(argv) == 0
    assert "cached 6 samples" in capsys.readouterr().out
    config = tmp_path / "cache.yaml"
    config.write_text(f"data: {{path: {manifest}, resolution: 64}}\nmodel: {model}\nout: {out}\nshard_size: 4\n")
    assert main(["cache", "--config", str(config)]) == 0
    assert "2 reused" in capsys.readouterr().out
    assert main(["cache", "--config", str(config), "--out", "x"]) == 2
    assert "either --config or DATA" in capsys.readouterr().err


def test_undecodable_images_are_left_out_and_reported(tmp_path, models):
    root = src.write_folder(tmp_path / "raw", src.SPECS[:3])
    data = (root / "bird.png").read_bytes()
    (root / "bird.png").write_bytes(data[: len(data) // 2])  # truncated: passes the header scan
    vae, text_encoder = models
    report = build_cache(
        DataConfig(path=str(root), resolution=64), tmp_path / "c", vae=vae, text_encoder=text_encoder
    )
    assert report.samples == 2 and list(report.unreadable) == ["bird"]
    loader = build_loader(DataConfig(path=str(tmp_path / "c"), batch_size=2, resolution=64), seed=0)
    assert list(loader.stats.unreadable) == ["bird"] and sorted(next(iter(loader))["keys"]) == [
        "animals/cat",
        "animals/dog",
    ]


def test_the_instruction_each_chi_setting_gives(tmp_path):
    """chi unset: the folder's declared instruction; true: the default text; false: none; chi_file: its text;
    false with a file is refused when the config is made, before any model is loaded."""
    from sana.config import ConfigError
    from sana.data.cache import CacheConfig, load_encoders
    from sana.models.text_encoder import DEFAULT_INSTRUCTION
    from sana.pretrained import write_instruction

    model = tmp_path / "model"
    save_components(tiny_components(seed=0), model)
    write_instruction(model, "Declared:\n")
    chi = tmp_path / "chi.txt"
    chi.write_text("From the file:\n")
    data = DataConfig(path="unused", resolution=64)
    expected = {None: "Declared:\n", True: DEFAULT_INSTRUCTION, False: None}
    for setting, text in expected.items():
        cfg = CacheConfig(data=data, model=str(model), out="unused", chi=setting)
        assert load_encoders(cfg)[1].instruction == text, setting
    from_file = CacheConfig(data=data, model=str(model), out="unused", chi_file=str(chi))
    assert load_encoders(from_file)[1].instruction == chi.read_text()
    with pytest.raises(ConfigError, match="contradict"):
        CacheConfig(data=data, model=str(model), out="unused", chi=False, chi_file=str(chi))
