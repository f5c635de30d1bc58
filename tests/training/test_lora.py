"""LoRA fine-tuning (peft) and LoRA inference (merged, no peft): training touches only the LoRA factors, resumes
exactly, exports diffusers' format; our merge gives the same transformer output and image as diffusers'
`load_lora_weights`; `sana generate --lora` applies it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sana.config import ConfigError
from sana.lora import LORA_WEIGHTS, read_lora
from sana.pipeline import SanaPipeline
from sana.pretrained import save_components
from sana.tiny import TINY_TEXT_HIDDEN, tiny_components
from sana.training.config import LoRAConfig
from sana.training.loop import train
from sana.training.lora import apply_lora, export_lora
from sana.types import Conditioning, TextEmbeddings
from sana.weights import load_model
from tests.training.test_loop import one_thread, tiny_config  # noqa: F401 (fixture)

pytest.importorskip("peft")

PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A saved tiny model folder (random weights, nonzero everywhere): the pretrained model LoRA adapts."""
    return save_components(tiny_components(seed=0), tmp_path_factory.mktemp("tiny-sana"))


class FixedBatch:
    """The sana.data contract at its simplest: the same cached batch forever (so a resume sees the same data)."""

    def __init__(self, *, seed: int, rank: int, world_size: int, batch_size: int = 2) -> None:
        g = torch.Generator().manual_seed(5 + rank)
        self.batch = {
            "latents": torch.randn(batch_size, 4, 8, 8, generator=g),
            "text_hidden": torch.randn(batch_size, 5, TINY_TEXT_HIDDEN, generator=g),
            "text_mask": torch.ones(batch_size, 5, dtype=torch.long),
        }
        self.null_text = TextEmbeddings(torch.randn(1, 1, TINY_TEXT_HIDDEN, generator=g), torch.ones(1, 1).long())

    def __iter__(self):
        while True:
            yield self.batch


def lora_config(run_dir, folder, **extra):
    lora = {"enabled": True, "rank": 4, "alpha": 8.0, **extra.pop("lora", {})}
    return tiny_config(
        run_dir, model={"preset": None, "pretrained": str(folder)}, optim={"lr": 1e-2}, lora=lora, **extra
    )


def random_lora(folder, tmp_path, *, rank=4, alpha=8.0, std=0.2):
    """A LoRA with a visible effect (B is random, not peft's zeros), exported as a training run would."""
    model = apply_lora(load_model(type(tiny_components().transformer), folder / "transformer"),
                       LoRAConfig(enabled=True, rank=rank, alpha=alpha))  # fmt: skip
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    return export_lora(tmp_path / "lora", model, weights).parent


def dit_inputs(batch: int = 2):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(batch, 4, 16, 16, generator=g)
    t = torch.tensor([800.0, 250.0])[:batch]
    hidden = torch.randn(batch, 7, TINY_TEXT_HIDDEN, generator=g)
    mask = torch.ones(batch, 7, dtype=torch.long)
    mask[1, 4:] = 0
    return x, t, hidden, mask


# ------------------------------------------------------------------------------------------------ training


def test_lora_run_trains_only_lora_and_exports(tmp_path, folder):
    validation = {"every": 3, "prompts": ["a cat"], "steps": 2}  # drawn with the merged weights
    result = train(lora_config(tmp_path / "run", folder, max_steps=3, validation=validation), data=FixedBatch)
    assert (tmp_path / "run" / "validation" / "step-000003.png").is_file()
    base = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))

    # The checkpoint holds the wrapped model: base weights untouched, LoRA factors trained.
    state = load_file(str(result.checkpoint / "model.safetensors"))
    lora_keys = [k for k in state if ".lora_" in k]
    assert len(lora_keys) == 2 * 2 * 8  # 2 blocks x (attn1, attn2) x (q, k, v, out) x (A, B)
    for name, tensor in state.items():
        if ".lora_" not in name:
            torch.testing.assert_close(tensor, base[name.replace(".base_layer.", ".")], rtol=0, atol=0)
    assert all(state[k].abs().max() > 0 for k in lora_keys if ".lora_B." in k)  # B starts at 0 and moved
    assert set(load_file(str(result.checkpoint / "ema.safetensors"))) == set(lora_keys)

    # Export: diffusers-named LoRA file, and the merged model = base + (alpha / r) B A from the EMA weights.
    assert result.lora == tmp_path / "run" / "lora" / LORA_WEIGHTS
    layers = read_lora(result.lora)
    assert len(layers) == 16 and "transformer_blocks.0.attn1.to_out.0" in layers
    assert all(k.startswith("transformer.") for k in load_file(str(result.lora)))
    merged = load_file(str(result.final_model / "transformer" / "diffusion_pytorch_model.safetensors"))
    assert set(merged) == set(base)
    ema = load_file(str(result.checkpoint / "ema.safetensors"))
    name = "transformer_blocks.1.attn2.to_v"
    a, b = ema[f"{name}.lora_A.default.weight"], ema[f"{name}.lora_B.default.weight"]
    torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + 2.0 * b @ a)
    assert not torch.equal(merged[f"{name}.weight"], base[f"{name}.weight"])
    torch.testing.assert_close(merged["proj_out.weight"], base["proj_out.weight"], rtol=0, atol=0)
    assert (result.final_model / "vae").is_dir()  # a complete model folder: `sana generate --model` works


def test_lora_run_resumes_exactly(tmp_path, folder):
    extra = {"checkpoint": {"every": 2}}
    straight = train(lora_config(tmp_path / "a", folder, max_steps=4, **extra), data=FixedBatch)
    train(lora_config(tmp_path / "b", folder, max_steps=2, **extra), data=FixedBatch)
    resumed = train(
        lora_config(tmp_path / "b", folder, max_steps=4, checkpoint={"every": 2, "resume": "latest"}),
        data=FixedBatch,
    )
    assert resumed.losses == straight.losses[2:]
    a, b = load_file(str(straight.lora)), load_file(str(resumed.lora))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_config_errors(tmp_path, folder):
    with pytest.raises(ConfigError, match="needs model.pretrained"):
        tiny_config(tmp_path, lora={"enabled": True})
    with pytest.raises(ConfigError, match="lora.rank"):
        lora_config(tmp_path, folder, lora={"rank": 0})
    with pytest.raises(ConfigError, match="unknown key lora.rnk"):
        lora_config(tmp_path, folder, lora={"rnk": 4})
    model = tiny_components().transformer
    with pytest.raises(ConfigError, match="linear layers; transformer_blocks.0.ff.conv_inverted"):
        apply_lora(model, LoRAConfig(enabled=True, targets=("conv_inverted",)))
    with pytest.raises(ConfigError, match="match no module"):
        apply_lora(model, LoRAConfig(enabled=True, targets=("to_qq",)))


# ----------------------------------------------------------------------------------- inference vs diffusers


def test_merged_lora_matches_diffusers_and_peft(tmp_path, folder):
    """Ours: W + s B A merged without peft. diffusers: load_lora_weights + set_adapters (unfused) and fuse_lora.
    peft: the training-time wrapped model. All give the same transformer output."""
    diffusers = pytest.importorskip("diffusers")
    lora_dir = random_lora(folder, tmp_path)
    scale = 0.7
    x, t, hidden, mask = dit_inputs()

    ours = SanaPipeline.from_pretrained(folder)
    plain = ours.transformer(x, t, Conditioning(TextEmbeddings(hidden, mask)))
    assert len(ours.load_lora(lora_dir, scale)) == 16
    out = ours.transformer(x, t, Conditioning(TextEmbeddings(hidden, mask)))
    assert (out - plain).abs().max() > 1e-2 * plain.abs().max()  # the LoRA matters

    unfused, fused = diffusers.SanaPipeline.from_pretrained(folder), diffusers.SanaPipeline.from_pretrained(folder)
    unfused.load_lora_weights(lora_dir, adapter_name="style")
    unfused.set_adapters("style", adapter_weights=scale)
    fused.load_lora_weights(lora_dir)
    fused.fuse_lora(lora_scale=scale)
    for theirs in (unfused, fused):
        with torch.no_grad():
            expected = theirs.transformer(
                x, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask, return_dict=False
            )[0]
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)

    # scale 1 = the peft-wrapped training model (alpha / r = 2 folded into the exported B).
    wrapped = apply_lora(load_model(type(ours.transformer), folder / "transformer"),
                         LoRAConfig(enabled=True, rank=4, alpha=8.0))  # fmt: skip
    layers = read_lora(lora_dir)
    with torch.no_grad():
        for module, layer in layers.items():
            wrapped.get_submodule(f"{module}.lora_A.default").weight.copy_(layer.down)
            wrapped.get_submodule(f"{module}.lora_B.default").weight.copy_(layer.up / 2.0)
    wrapped.eval()
    one = SanaPipeline.from_pretrained(folder)
    one.load_lora(lora_dir)
    cond = Conditioning(TextEmbeddings(hidden, mask))
    with torch.no_grad():
        torch.testing.assert_close(one.transformer(x, t, cond), wrapped(x, t, cond), atol=1e-5, rtol=1e-4)


def test_same_image_as_diffusers_with_lora(tmp_path, folder):
    diffusers = pytest.importorskip("diffusers")
    from tests.test_pipeline import as_array, assert_same_png, reference

    lora_dir = random_lora(folder, tmp_path)
    kw = dict(num_inference_steps=6, guidance_scale=4.5, height=64, width=64)
    theirs = diffusers.SanaPipeline.from_pretrained(folder)
    theirs.load_lora_weights(lora_dir, adapter_name="style")
    theirs.set_adapters("style", adapter_weights=1.5)
    ref = reference(theirs, PROMPT, seed=3, chi=True, **kw)
    ours = SanaPipeline.from_pretrained(folder)
    plain = ours(PROMPT, seed=3, steps=6, guidance_scale=4.5, height=64, width=64)
    ours.load_lora(lora_dir, 1.5)
    out = ours(PROMPT, seed=3, steps=6, guidance_scale=4.5, height=64, width=64)
    assert_same_png(out[0], ref[0])
    assert np.abs(as_array(out[0]) - as_array(plain[0])).mean() > 1


def test_lora_file_with_diffusers_alpha_metadata(tmp_path, folder):
    """A file written by diffusers' save_lora_weights with adapter metadata (lora_alpha != r, B not scaled):
    our reader applies alpha / r as diffusers does."""
    diffusers = pytest.importorskip("diffusers")
    layers = read_lora(random_lora(folder, tmp_path))
    raw = {}
    for module, layer in layers.items():
        raw[f"{module}.lora_A.weight"], raw[f"{module}.lora_B.weight"] = layer.down, layer.up
    metadata = {"r": 4, "lora_alpha": 2.0, "target_modules": sorted(layers)}  # alpha / r = 0.5
    diffusers.SanaPipeline.save_lora_weights(
        tmp_path / "other", transformer_lora_layers=raw, transformer_lora_adapter_metadata=metadata
    )
    read = read_lora(tmp_path / "other")
    assert all(layer.factor == 0.5 for layer in read.values())

    x, t, hidden, mask = dit_inputs()
    ours = SanaPipeline.from_pretrained(folder)
    ours.load_lora(tmp_path / "other", 2.0)
    theirs = diffusers.SanaPipeline.from_pretrained(folder)
    theirs.load_lora_weights(tmp_path / "other")
    theirs.fuse_lora(lora_scale=2.0)
    with torch.no_grad():
        expected = theirs.transformer(
            x, encoder_hidden_states=hidden, timestep=t, encoder_attention_mask=mask, return_dict=False
        )[0]
        torch.testing.assert_close(ours.transformer(x, t, Conditioning(TextEmbeddings(hidden, mask))), expected,
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


def test_merge_rejects_bad_files(tmp_path, folder):
    from safetensors.torch import save_file

    pipe = SanaPipeline.from_pretrained(folder)
    with pytest.raises(FileNotFoundError):
        pipe.load_lora(tmp_path / "nowhere")
    save_file({"transformer.x.lora_down.weight": torch.zeros(2, 2)}, str(tmp_path / "kohya.safetensors"))
    with pytest.raises(ValueError, match="unexpected key"):
        pipe.load_lora(tmp_path / "kohya.safetensors")
    save_file({"transformer.nope.lora_A.weight": torch.zeros(2, 16), "transformer.nope.lora_B.weight":
               torch.zeros(16, 2)}, str(tmp_path / "other.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="does not have"):
        pipe.load_lora(tmp_path / "other.safetensors")


# --------------------------------------------------------------------------------------------------- CLI


def test_generate_cli_with_lora(tmp_path, folder):
    from PIL import Image

    from sana.cli.main import main

    lora_dir = random_lora(folder, tmp_path)
    common = [PROMPT, "--model", str(folder), "--seed", "1", "--steps", "3", "--quiet"]
    assert main(["generate", *common, "-o", str(tmp_path / "plain.png")]) == 0
    assert main(["generate", *common, "--lora", str(lora_dir), "-o", str(tmp_path / "lora.png")]) == 0
    zero = ["--lora", str(lora_dir / LORA_WEIGHTS), "--lora-scale", "0"]
    assert main(["generate", *common, *zero, "-o", str(tmp_path / "zero.png")]) == 0

    def read(name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / name), dtype=np.int16)

    assert np.abs(read("lora.png") - read("plain.png")).mean() > 1
    assert np.array_equal(read("zero.png"), read("plain.png"))
    assert main(["generate", *common, "--lora", str(tmp_path / "missing"), "-o", str(tmp_path / "x.png")]) == 2
