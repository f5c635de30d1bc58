"""img2img: Sana-Sprint against diffusers' SanaSprintImg2ImgPipeline (random weights), and for every sampler the
two ends of the strength scale on the shipped model (1: the text-to-image picture; small: the input almost
unchanged), the steps a strength runs, bad input refused in one line before any model work, and the CLI."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from PIL import Image

from sana.cli.main import main
from sana.errors import MissingFileError, UserError
from sana.generation import plan_request
from sana.images import read_parameters
from sana.models.dit import SanaDiT
from sana.models.text_encoder import DEFAULT_INSTRUCTION
from sana.pipeline import SanaPipeline
from sana.pretrained import SchedulerSpec, save_components, shipped_model
from sana.samplers import SAMPLERS
from sana.tiny import tiny_components

PROMPT = "a green triangle"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def noise_image(h: int, w: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 256, (h, w, 3), np.uint8))


@pytest.fixture(scope="module")
def shipped():
    return SanaPipeline.from_pretrained(shipped_model())


@pytest.fixture(scope="module")
def source(shipped):
    """A picture the shipped model draws (256 x 256), the input of the img2img runs."""
    return shipped("a red circle above a blue square", seed=1, steps=4)[0]


@pytest.fixture(scope="module")
def sprint_folder(tmp_path_factory):
    """A tiny random Sana-Sprint folder (guidance embedding, sCM), as in test_pipeline's Sprint comparison."""
    root = tmp_path_factory.mktemp("tiny-sprint")
    parts = tiny_components(seed=2)
    config = dataclasses.replace(parts.transformer.config, guidance_embeds=True, qk_norm="rms_norm_across_heads")
    torch.manual_seed(0)
    parts.transformer = SanaDiT(config).eval()
    parts.scheduler = SchedulerSpec(sampler="scm")
    save_components(parts, root)
    return root


@pytest.mark.parametrize(
    "steps, strength, size",
    [(2, 0.6, (64, 96)), (4, 0.5, (128, 192))],  # the second image is resized (same aspect ratio) to 64x96
)
def test_sprint_img2img_matches_diffusers(sprint_folder, steps, strength, size):
    diffusers = pytest.importorskip("diffusers")
    ours = SanaPipeline.from_pretrained(sprint_folder)
    theirs = diffusers.SanaSprintImg2ImgPipeline.from_pretrained(sprint_folder)
    image = noise_image(*size)
    ref = theirs(
        "a bird",
        image=image,
        strength=strength,
        num_inference_steps=steps,
        intermediate_timesteps=1.3 if steps == 2 else None,  # the reference allows its default only at 2 steps
        guidance_scale=4.5,
        height=64,
        width=96,
        generator=torch.Generator("cpu").manual_seed(5),
        complex_human_instruction=DEFAULT_INSTRUCTION.split("\n"),
        use_resolution_binning=False,
    ).images[0]
    out = ours(
        "a bird", image=image, strength=strength, steps=steps, guidance_scale=4.5, height=64, width=96, seed=5
    )
    diff = np.abs(pixels(out[0]) - pixels(ref))
    assert (diff <= 2).mean() >= 0.999, f"max diff {diff.max()}, share > 2: {(diff > 2).mean():.4f}"
    # Not trivially equal: another strength starts elsewhere and gives another picture.
    other = ours("a bird", image=image, strength=0.25, steps=4, guidance_scale=4.5, height=64, width=96, seed=5)
    assert np.abs(pixels(other[0]) - pixels(ref)).mean() > 1


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_strength_one_is_text_to_image_and_a_small_strength_keeps_the_input(shipped, source, sampler):
    text_to_image = shipped(PROMPT, seed=3, steps=4, sampler=sampler)[0]
    full = shipped(PROMPT, seed=3, steps=4, sampler=sampler, image=source, strength=1.0)[0]
    assert np.array_equal(pixels(full), pixels(text_to_image))
    distance = {}
    for strength in (0.1, 0.5):  # 1 and 5 of 10 steps
        out = shipped(PROMPT, seed=3, steps=10, sampler=sampler, image=source, strength=strength)[0]
        distance[strength] = np.abs(pixels(out) - pixels(source)).mean()
    distance[1.0] = np.abs(pixels(full) - pixels(source)).mean()
    assert distance[0.1] < 3, distance  # the input, nearly unchanged (the autoencoder's round trip included)
    assert distance[0.1] < distance[0.5] < distance[1.0], distance


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_a_strength_runs_the_tail_of_the_text_to_image_schedule(shipped, source, sampler):
    """ceil(strength x steps) steps run (the reference's rule), at the times of text to image's last steps."""
    full, part = [], []
    shipped(PROMPT, seed=0, steps=6, sampler=sampler, callback=full.append, output_type="latent")
    shipped(PROMPT, seed=0, steps=6, sampler=sampler, image=source, strength=0.4, callback=part.append,
            output_type="latent")  # fmt: skip
    assert len(part) == math.ceil(0.4 * 6) == 3
    assert [info.t for info in part] == [info.t for info in full[-3:]]


def test_the_parameters_record_the_strength(shipped, source, tmp_path):
    from sana.images import save_image

    out = shipped(PROMPT, seed=2, steps=2, image=source, strength=0.5)[0]
    params = read_parameters(save_image(out, tmp_path / "out.png"))
    assert params["strength"] == 0.5 and params["inpainting"] is False


# ------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def no_model_work(shipped, monkeypatch):
    def forbidden(*a, **k):
        raise AssertionError("model work started")

    for module, name in ((shipped.text_encoder, "encode"), (shipped.transformer, "forward"),
                         (shipped.vae, "encode"), (shipped.vae, "decode")):  # fmt: skip
        monkeypatch.setattr(module, name, forbidden)
    return shipped


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(image="{png}", strength=0.0), UserError, r"^strength must be a number in \(0, 1\], got 0\.0$"),
        (dict(image="{png}", strength=1.5), UserError, r"^strength must be a number in \(0, 1\], got 1\.5$"),
        (dict(image="{png}", strength=-0.2), UserError, r"strength must be a number in \(0, 1\]"),
        (dict(image="{png}", strength=math.nan), UserError, r"strength must be a number in \(0, 1\], got nan"),
        (dict(image="{png}", strength=True), UserError, r"strength must be a number in \(0, 1\], got True"),
        (dict(image="{png}", strength="0.5"), UserError, r"strength must be a number in \(0, 1\], got '0.5'"),
        (dict(strength=0.5), UserError, r"^strength 0\.5 needs an input image to start from: pass image=$"),
        (dict(mask_image="{png}"), UserError, r"^a mask needs an image to repaint: pass image= too$"),
        (dict(image="{missing}"), MissingFileError, r"^image not found: .*missing\.png$"),
        (dict(image="{text}"), UserError, r"^image .*notes\.txt is not an image file PIL can read$"),
        (dict(image="{png}", mask_image="{missing}"), MissingFileError, r"^mask not found: .*missing\.png$"),
        (dict(image="{png}", mask_image="{text}"), UserError, r"^mask .*notes\.txt is not an image file"),
        (dict(image=["{png}"] * 3), UserError, r"^got 3 images for 1 prompts: give 1, or 1 per prompt$"),
    ],
)
def test_bad_image_input_is_one_line_before_model_work(no_model_work, tmp_path, kwargs, error, message):
    noise_image(32, 32).save(tmp_path / "in.png")
    (tmp_path / "notes.txt").write_text("not an image")
    names = {"{png}": tmp_path / "in.png", "{missing}": tmp_path / "missing.png", "{text}": tmp_path / "notes.txt"}

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        return str(names[value]) if isinstance(value, str) and value in names else value

    kwargs = {k: fill(v) for k, v in kwargs.items()}
    with pytest.raises(error, match=message) as info:
        no_model_work(PROMPT, steps=2, **kwargs)
    assert "\n" not in str(info.value)
    with pytest.raises(error, match=message):  # the server's check: the plan alone says the same
        no_model_work.plan(PROMPT, steps=2, **kwargs)


def test_plan_fits_the_inputs_to_the_output_size_and_says_so(shipped):
    plan = plan_request(shipped.facts, ["a", "b"], images_per_prompt=2, image=noise_image(100, 300),
                        mask_image=[Image.new("L", (256, 256)), Image.new("L", (64, 64), 255)])  # fmt: skip
    assert plan.image.shape == (4, 3, 256, 256) and plan.mask.shape == (4, 1, 256, 256)
    assert plan.mask[:2].eq(0).all() and plan.mask[2:].eq(1).all()  # one mask per prompt, for its images
    assert plan.notes == (
        "image 300x100 resized and centre-cropped to 256x256",
        "mask 256x256, 64x64 resized and centre-cropped to 256x256",
    )


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_img2img_and_inpainting_say_when_they_resize(source, tmp_path, capsys):
    wide = tmp_path / "wide.png"
    source.resize((384, 256)).save(wide)
    mask = tmp_path / "mask.png"
    Image.new("L", (256, 256), 0).save(mask)  # nothing to repaint: the picture must stay the input's
    out = tmp_path / "out.png"
    code = main(["generate", PROMPT, "--image", str(wide), "--mask", str(mask), "--seed", "0", "--steps", "2",
                 "-o", str(out), "--quiet"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err.strip() == "image 384x256 resized and centre-cropped to 256x256"
    fitted = np.asarray(Image.open(wide).convert("RGB").resize((256, 256), box=(64, 0, 320, 256)), np.int16)
    assert np.abs(pixels(Image.open(out).convert("RGB")) - fitted).max() <= 2
    assert read_parameters(out)["inpainting"] is True and read_parameters(out)["strength"] == 1.0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mask", "{png}"], "--mask needs --image"),
        (["--strength", "0.5"], "--strength needs --image"),
        (["--image", "{png}", "--strength", "0"], "--strength must be in (0, 1], got 0.0"),
        (["--image", "{png}", "--strength", "nan"], "--strength must be in (0, 1], got nan"),
        (["--image", "{dir}/missing.png"], "image not found:"),
        (["--image", "{png}", "--mask", "{dir}/notes.txt"], "is not an image file PIL can read"),
    ],
)
def test_cli_bad_image_input_fails_before_loading(tmp_path, capsys, extra, message):
    noise_image(32, 32).save(tmp_path / "in.png")
    (tmp_path / "notes.txt").write_text("not an image")
    extra = [e.replace("{png}", str(tmp_path / "in.png")).replace("{dir}", str(tmp_path)) for e in extra]
    code = main(["generate", PROMPT, "--model", str(tmp_path / "no-model"), *extra])  # loading would fail
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1, err
