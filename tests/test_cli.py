"""The `sana` command: registered console script, generate / convert / demo, one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from sana.cli.main import main
from sana.images import read_parameters
from sana.pipeline import SanaPipeline
from sana.pretrained import save_components
from sana.tiny import tiny_components


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    save_components(tiny_components(seed=0), root)
    return root


def run(*args: str) -> int:
    return main([str(a) for a in args])


def test_console_script_is_installed():
    exe = shutil.which("sana", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert exe is not None, "the `sana` console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert "generate" in out and "convert" in out


def test_generate_one_image_to_a_file_equals_the_python_api(model_dir, tmp_path):
    out = tmp_path / "img.png"
    assert (
        run(
            "generate", "a red circle", "--model", model_dir, "--seed", 5, "--steps", 3, "--output", out, "--quiet"
        )
        == 0
    )
    expected = SanaPipeline.from_pretrained(model_dir)("a red circle", seed=[5], steps=3)[0]
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected))
    params = read_parameters(out)
    assert params["seed"] == 5 and params["prompt"] == "a red circle" and params["instruction"] is True


def test_generate_several_images_use_consecutive_seeds(model_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    out = tmp_path / "many"
    code = run("generate", "a bird", "--prompts-file", prompts, "--model", model_dir, "--seed", 10, "--steps", 2,
               "--images-per-prompt", 2, "--output", out, "--quiet", "--no-chi", "--sampler", "euler")  # fmt: skip
    assert code == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 6
    seeds = [read_parameters(f)["seed"] for f in files]
    assert seeds == list(range(10, 16))
    assert [read_parameters(f)["prompt"] for f in files[::2]] == ["a bird", "a cat", "a dog"]
    assert read_parameters(files[0])["instruction"] is False and read_parameters(files[0])["sampler"] == "euler"


def test_chi_file_is_used_verbatim(model_dir, tmp_path):
    chi = tmp_path / "chi.txt"
    chi.write_text("Describe it:\nUser Prompt: ")
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    run(
        "generate", "a cat", "--model", model_dir, "--seed", 1, "--steps", 2, "--chi-file", chi, "-o", a, "--quiet"
    )
    run("generate", "a cat", "--model", model_dir, "--seed", 1, "--steps", 2, "-o", b, "--quiet")
    assert not np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "0"], "steps must be a positive integer"),
        (["--guidance", "nan"], "guidance scale must be a finite number"),
        (["--height", "100"], "height must be a positive multiple of 32"),
        (["--width", "0"], "width must be a positive multiple of 32"),
        (["--output", "{file}/x.png"], "cannot write to"),
        (["--images-per-prompt", "2", "--output", "one.png"], "need a folder for --output"),
    ],
)
def test_bad_arguments_are_one_line_errors_before_loading(tmp_path, capsys, extra, message):
    # The model path does not exist: reaching the loader would give a different error.
    (tmp_path / "file").write_text("a file, not a folder")
    extra = [e.replace("{file}", str(tmp_path / "file")) for e in extra]
    code = run("generate", "a cat", "--model", tmp_path / "missing", *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_unknown_sampler_is_rejected_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        run("generate", "a cat", "--sampler", "heun")
    assert "invalid choice" in capsys.readouterr().err


def test_missing_model_and_no_shipped_model(tmp_path, capsys, monkeypatch):
    import sana.pretrained

    monkeypatch.setattr(sana.pretrained, "SHIPPED_MODEL_DIR", tmp_path / "none")
    assert run("generate", "a cat", "-o", tmp_path / "x.png") == 2
    assert "no --model given" in capsys.readouterr().err
    assert run("generate", "a cat", "--model", tmp_path / "nope", "-o", tmp_path / "x.png") == 2
    assert "no such model folder" in capsys.readouterr().err


def test_convert_writes_a_loadable_folder(model_dir, tmp_path, monkeypatch, capsys):
    from sana.models.dit import DIT_PRESETS
    from tests.test_convert import to_original

    dit = tiny_components(seed=3).transformer
    ckpt = tmp_path / "orig.pth"
    torch.save({"state_dict": to_original(dit.state_dict(), dit.config.num_layers)}, ckpt)
    out = tmp_path / "converted"
    assert run("convert", ckpt, out, "--preset", "tiny", "--base", model_dir) == 2  # other caption width
    assert "shape mismatch" in capsys.readouterr().err
    monkeypatch.setitem(DIT_PRESETS, "tiny-test", dit.config)
    assert run("convert", ckpt, out, "--preset", "tiny-test", "--base", model_dir) == 0
    pipe = SanaPipeline.from_pretrained(out)
    for k, v in dit.state_dict().items():
        assert torch.equal(pipe.transformer.state_dict()[k], v), k
    assert pipe.scheduler.flow_shift == 3.0


def test_demo_builds_a_model_and_writes_an_image(tmp_path, monkeypatch):
    import sana.pretrained

    monkeypatch.setattr(sana.pretrained, "SHIPPED_MODEL_DIR", tmp_path / "none")
    assert run("demo", "--out", tmp_path) == 0
    image = Image.open(tmp_path / "demo.png")
    assert image.size == (64, 64)
    assert read_parameters(tmp_path / "demo.png")["prompt"] == "a red circle above a blue square"


def test_building_the_parser_loads_no_torch():
    """`sana --help` stays instant: the sampler choices come from the registry only when a value is checked."""
    code = "import sys; from sana.cli.main import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
