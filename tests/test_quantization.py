"""Quantization through torchao (sana/quantization.py): each mode on tiny models against the unquantized one,
which layers each mode quantizes, quantized folders (written once, loaded without quantizing again, read
without pickle), and the one-line errors for what cannot be done."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from sana import quantization
from sana.cli.main import main
from sana.errors import UserError
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.pipeline import SanaPipeline
from sana.pretrained import save_components
from sana.quantization import (
    QUANTIZATION_FILE,
    QUANTIZED_WEIGHTS,
    check_mode,
    dit_targets,
    iter_quantized,
    quantization_of,
    quantize_dit,
    quantize_text_model,
    weight_bytes,
    write_quantized_folder,
)
from sana.tiny import tiny_components
from sana.types import Conditioning, TextEmbeddings
from sana.weights import CheckpointError

KW = dict(seed=0, steps=2, height=64, width=64, output_type="pt")

# A DiT at 128 wide (4 heads x 32), 2 blocks: big enough for per-channel int8 to behave as at real widths.
SMALL_DIT = dataclasses.replace(
    DIT_PRESETS["tiny"],
    num_attention_heads=4,
    attention_head_dim=32,
    cross_attention_dim=128,
    num_cross_attention_heads=4,
    cross_attention_head_dim=32,
    caption_channels=64,
)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny") / "model"
    save_components(tiny_components(seed=0), root)
    return root


@pytest.fixture(scope="module")
def reference(folder):
    return SanaPipeline.from_pretrained(folder)("a red cat", **KW)


def small_dit(seed: int = 0) -> SanaDiT:
    torch.manual_seed(seed)
    model = SanaDiT(SMALL_DIT).eval()
    model.init_weights()
    with torch.no_grad():  # init_weights zeroes the output path; make every layer matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def velocity(model: SanaDiT) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, SMALL_DIT.in_channels, 8, 8, generator=g)
    text = TextEmbeddings(torch.randn(2, 12, SMALL_DIT.caption_channels, generator=g), torch.ones(2, 12))
    with torch.no_grad():
        return model(x, torch.tensor([900.0, 300.0]), Conditioning(text))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------------------------------------- the modes


@pytest.mark.parametrize(("mode", "bound"), [("int8", 0.02), ("w8a8", 0.05)])
def test_dit_mode_stays_close_to_the_unquantized_velocity(mode, bound):
    """Per-channel int8 weights carry ~0.4 % relative error per layer, per-token int8 activations ~1 %; through
    two blocks the velocity stays within a few percent, and it must differ (the weights really changed)."""
    ref = velocity(small_dit())
    model = quantize_dit(small_dit(), mode)
    err = relative_error(velocity(model), ref)
    assert 1e-4 < err < bound, err
    assert quantization_of(model) == mode


def test_which_dit_layers_each_mode_quantizes():
    model = quantize_dit(small_dit(), "w8a8")
    quantized = {name.removesuffix(".weight") for name, _ in iter_quantized(model)}
    per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0"}
    per_block |= {"ff.conv_inverted", "ff.conv_point"}  # the 1x1 convolutions, now nn.Linear
    assert quantized == {f"transformer_blocks.{i}.{name}" for i in range(2) for name in per_block}
    # kept: the cross-attention keys/values (the paper's exception) and everything off the image tokens
    assert not hasattr(model.transformer_blocks[0].attn2.to_k.weight, "__tensor_flatten__")

    weight_only = quantize_dit(small_dit(), "int8")
    names = {name.removesuffix(".weight") for name, _ in iter_quantized(weight_only)}
    assert "transformer_blocks.0.attn2.to_k" in names and "caption_projection.linear_1" in names
    assert "proj_out" not in names and "time_embed.linear" in names
    # the FFN's 1x1 conv weights keep their names, now as (out, in) matrices
    assert weight_only.state_dict()["transformer_blocks.0.ff.conv_inverted.weight"].shape == (2 * 320, 128)
    assert set(dit_targets(weight_only, "int8")) == names


def test_text_encoder_int8_stays_close(folder):
    parts = tiny_components(seed=0)
    encoder = parts.text_encoder
    ref = encoder.encode(["a red cat on a mat"]).hidden
    quantize_text_model(encoder.model, "int8")
    out = encoder.encode(["a red cat on a mat"]).hidden
    err = relative_error(out, ref)
    assert 0 < err < 0.05, err
    linears = [m for m in encoder.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(hasattr(m.weight, "__tensor_flatten__") for m in linears)


def test_weight_bytes_are_exact():
    layer = nn.Sequential(nn.Linear(64, 32))
    assert weight_bytes(layer) == (32 * 64 + 32) * 4
    quantization.torchao_quantization().quantize_(layer, quantization._config("int8", torch.device("cpu")))
    # int8 data, a float32 scale and an int8 zero point per output channel, the float32 bias
    assert weight_bytes(layer) == 32 * 64 + 32 * 4 + 32 + 32 * 4


def test_pipeline_quantized_at_load_generates_close_images(folder, reference):
    pipe = SanaPipeline.from_pretrained(folder, quantize="int8", quantize_text_encoder="int8")
    assert quantization_of(pipe.transformer) == "int8" and quantization_of(pipe.text_encoder.model) == "int8"
    out = pipe("a red cat", **KW)
    assert 0 < (out - reference).abs().mean() < 0.02
    with pytest.raises(UserError, match="cannot merge a LoRA into a DiT quantized to int8"):
        pipe.load_lora("unused.safetensors")


def test_quantizing_while_reading_equals_quantizing_the_loaded_model(folder):
    """The streaming loader (block by block) builds the same weights as quantizing a fully loaded DiT, which is
    what `sana generate --lora ... --quantize` does after the merge."""
    streamed = SanaPipeline.from_pretrained(folder, quantize="w8a8")
    after = SanaPipeline.from_pretrained(folder)
    quantization.quantize_pipeline_transformer(after, "w8a8")
    a, b = streamed.transformer.state_dict(), after.transformer.state_dict()
    assert a.keys() == b.keys()
    plain = lambda t: t.dequantize() if hasattr(t, "qdata") else t
    for key in a:
        assert type(a[key]) is type(b[key]) and torch.equal(plain(a[key]), plain(b[key])), key
    assert torch.equal(streamed("a red cat", **KW), after("a red cat", **KW))


# --------------------------------------------------------------------------------------- what cannot run


@pytest.mark.parametrize("component", ["transformer", "text_encoder"])
def test_int4_on_the_cpu_is_a_one_line_error_naming_what_runs(component):
    with pytest.raises(UserError) as err:
        check_mode("int4", component, "cpu", torch.float32)
    message = str(err.value)
    assert "\n" not in message and "CUDA only" in message
    assert message.endswith("modes that run here: w8a8, int8" if component == "transformer" else "here: int8")


def test_int4_on_cuda_needs_bfloat16_and_unknown_modes_are_named():
    with pytest.raises(UserError, match="computes in bfloat16: use dtype bf16; modes that run here: w8a8, int8"):
        check_mode("int4", "transformer", "cuda", torch.float16)
    with pytest.raises(UserError, match="unknown text encoder quantization 'w8a8'; choose one of int8, int4"):
        check_mode("w8a8", "text_encoder", "cpu", torch.float32)


def test_a_mode_that_cannot_run_fails_before_loading(folder, monkeypatch):
    monkeypatch.setattr("sana.pipeline.load_components", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(UserError, match="int4"):
        SanaPipeline.from_pretrained(folder, quantize_text_encoder="int4")


# ------------------------------------------------------------------------------------------------ folders


@pytest.fixture(scope="module")
def quantized(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "model-int8"
    assert main(["quantize", str(folder), str(out), "--quantize", "w8a8", "--quantize-text-encoder", "int8"]) == 0
    return out


def test_quantized_folder_loads_without_quantizing_again(folder, quantized, monkeypatch):
    at_load = SanaPipeline.from_pretrained(folder, quantize="w8a8", quantize_text_encoder="int8")(
        "a red cat", **KW
    )
    assert json.loads((quantized / QUANTIZATION_FILE).read_text())["transformer"] == "w8a8"
    assert (quantized / "transformer" / QUANTIZED_WEIGHTS).is_file()
    assert not (quantized / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert (quantized / "vae" / "diffusion_pytorch_model.safetensors").is_file()  # the rest is copied as is
    monkeypatch.setattr(quantization, "_quantize_layers", lambda *a: pytest.fail("quantized again"))
    pipe = SanaPipeline.from_pretrained(quantized)
    assert quantization_of(pipe.transformer) == "w8a8" and quantization_of(pipe.text_encoder.model) == "int8"
    assert torch.equal(pipe("a red cat", **KW), at_load)
    # bfloat16 from the same float32 folder: scales and high-precision weights are cast, the integers kept
    low = SanaPipeline.from_pretrained(quantized, dtype="bf16")
    assert next(p for _, p in iter_quantized(low.transformer)).dtype == torch.bfloat16
    assert (low("a red cat", **KW) - at_load).abs().mean() < 0.05


def test_quantized_folders_refuse_what_they_cannot_do(folder, quantized, tmp_path, capsys):
    with pytest.raises(UserError, match="is already quantized .DiT w8a8, text encoder int8.; quantize the orig"):
        write_quantized_folder(quantized, tmp_path / "again", transformer="int8", text_encoder=None)
    assert main(["quantize", str(folder), str(quantized), "--quantize", "int8"]) == 2  # the output exists
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", str(folder), str(tmp_path / "x")]) == 2
    assert "nothing to quantize" in capsys.readouterr().err
    with pytest.raises(UserError, match="already quantized to w8a8: load it without asking for int8"):
        SanaPipeline.from_pretrained(quantized, quantize="int8")
    assert not (tmp_path / "again").exists() and not list(tmp_path.glob(".*partial"))


def test_a_quantized_file_naming_other_types_is_refused(quantized, tmp_path):
    """The header is checked against the allow-list before torchao builds anything from it."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    path = bad / "transformer" / QUANTIZED_WEIGHTS
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = next(k for k, v in metadata.items() if "Int8Tensor" in v)
    metadata[name] = metadata[name].replace('"PerRow"', '"os.system"')
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CheckpointError, match="unexpected type 'os.system' in the quantization header"):
        SanaPipeline.from_pretrained(bad)
    path.unlink()
    with pytest.raises(CheckpointError, match="no quantized.safetensors in"):
        SanaPipeline.from_pretrained(bad)


def test_generate_and_its_errors_from_the_command_line(quantized, tmp_path, capsys):
    out = tmp_path / "cat.png"
    assert (
        main(["generate", "a red cat", "--model", str(quantized), "--steps", "1", "-o", str(out), "--quiet"]) == 0
    )
    assert out.is_file()
    capsys.readouterr()
    for argv, message in [
        (["--quantize", "int4"], "int4 weight-only kernels (tinygemm, mslk) run on CUDA only"),
        (["--offload", "model"], "the compute device is the CPU: there is nothing to offload"),
        (["--low-memory", "--offload", "sequential"], "--low-memory and --offload contradict each other"),
        (["--max-memory", "lots"], "cannot read memory size 'lots'"),
    ]:
        assert main(["generate", "a cat", "--model", str(quantized), "-o", str(out), *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
