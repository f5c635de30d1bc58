"""The example workflows in comfyui/workflows/, loaded and run as plain Python (tests/comfyui/support.py), each
compared with what `sana generate` makes for the same settings (its pipeline, or the shipped model's reference
PNGs, which tests/test_reference_images.py pins to the pipeline).

Workflows that name a published model (Hub id) run here on a tiny random model folder with the same loading-
relevant config; the shipped-model ones run unchanged. tests/comfyui/test_integration.py runs them in a real
ComfyUI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui import NODE_CLASS_MAPPINGS
from comfyui.nodes import SanaModelLoader, SanaVAEDecode
from sana.lora import merge_lora, read_lora
from sana.pipeline import SanaPipeline
from tests.comfyui.support import (
    EXAMPLES,
    PROMPT,
    FakeComfy,
    core_nodes,
    example_image,
    load_workflow,
    random_lora,
    run_workflow,
    shipped,
    sprint_folder,
    tiny_4k_folder,
    ui_to_api,
)

REFERENCE = Path(__file__).resolve().parents[1] / "reference"


def same_picture(ours: np.ndarray, ref: np.ndarray) -> None:
    """The project's parity criterion: at most 2 levels of 255 on at least 99.9 % of pixels."""
    assert ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    assert (diff <= 2).mean() >= 0.999, f"max diff {diff.max()}, share > 2: {(diff > 2).mean():.4%}"


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


@pytest.fixture
def comfy(tmp_path, monkeypatch) -> FakeComfy:
    return FakeComfy(tmp_path / "models").install(monkeypatch)


@pytest.fixture
def classes(tmp_path):
    (tmp_path / "input").mkdir()
    return {**NODE_CLASS_MAPPINGS, **core_nodes(tmp_path / "input")}


@pytest.fixture(scope="module")
def shipped_pipe():
    return SanaPipeline.from_pretrained(shipped())


def with_model(api: dict, folder: Path) -> dict:
    """The workflow with its loader pointed at `folder` in float32 (a tiny stand-in for the published model)."""
    loader = next(node for node in api.values() if node["class_type"] == "SanaModelLoader")
    loader["inputs"].update(model_path=str(folder), dtype="fp32")
    return api


@pytest.mark.parametrize("name", EXAMPLES)
def test_ui_and_api_forms_are_the_same_graph(name, classes):
    api = load_workflow(name, "api")
    for node in api.values():
        node.pop("_meta", None)
    assert ui_to_api(load_workflow(name, "ui"), classes) == api


def test_text_to_image_workflow_makes_the_shipped_model_reference(classes):
    """Flow-DPM-Solver, 20 steps, the model's guidance 2.5, seed 0: `sana generate PROMPT --seed 0`."""
    nodes, _ = run_workflow(load_workflow("text_to_image"), classes)
    ref = pixels(Image.open(REFERENCE / "dpm_default_0.png"))
    same_picture(nodes["7"].saved[0], ref)


def test_4k_workflow_samples_a_4096_latent_and_decodes_in_tiles(classes, tmp_path, monkeypatch):
    """The 4K model's loading (sin-cos positions at latent side 128, interpolation 2) and sampling at 4096 x 4096
    give the pipeline's latents (4 steps here instead of the workflow's 20, for time); the decode node tiles
    when one pass would not fit in memory and gives the untiled picture (checked on a 1024 px crop with the
    free memory made small, for time). The whole workflow, 4096 x 4096 picture against the pipeline's:
    test_4k_workflow_end_to_end (slow)."""
    from sana.models.dcae import DCAE

    folder = tiny_4k_folder(tmp_path / "tiny-4k")
    api = with_model(load_workflow("4k"), folder)
    api["5"]["inputs"]["steps"] = 4
    _, results = run_workflow(api, classes, outputs=["5"])
    latent = results["5"][0]["samples"]
    assert latent.shape == (1, 32, 128, 128)
    pipe = results["1"][0].pipe
    assert pipe.transformer.config.interpolation_scale == 2.0 and pipe.default_size == 4096
    ref = pipe(PROMPT, seed=[0], steps=4, guidance_scale=4.5, sampler="dpm", output_type="latent")
    torch.testing.assert_close(latent, ref, rtol=0, atol=1e-5)

    tiles, decode = [], DCAE.decode

    def spy(self, z, tile=None):
        tiles.append(tile)
        return decode(self, z, tile=tile)

    monkeypatch.setattr(DCAE, "decode", spy)
    part = {"samples": latent[..., :32, :32]}
    whole = SanaVAEDecode().decode(results["1"][0], part)[0]  # 1024 px: fits in memory, one pass
    monkeypatch.setattr(type(pipe.placement), "headroom", lambda self: 64 * 2**20)  # as if 64 MiB were free
    tiled = SanaVAEDecode().decode(results["1"][0], part)[0]
    assert tiles[0] is None and tiles[1] is not None and tiles[1] < 32
    torch.testing.assert_close(tiled, whole, rtol=0, atol=1e-4)


@pytest.mark.slow
def test_4k_workflow_end_to_end(classes, tmp_path):
    folder = tiny_4k_folder(tmp_path / "tiny-4k")
    nodes, results = run_workflow(with_model(load_workflow("4k"), folder), classes)
    pipe = results["1"][0].pipe
    ref = pipe(PROMPT, seed=[0], steps=20, guidance_scale=4.5, sampler="dpm")[0]
    assert nodes["7"].saved[0].shape == (4096, 4096, 3)
    same_picture(nodes["7"].saved[0], pixels(ref))


def test_sprint_workflow_two_steps(classes, tmp_path):
    folder = sprint_folder(tmp_path / "tiny-sprint")
    nodes, results = run_workflow(with_model(load_workflow("sprint_2_steps"), folder), classes)
    pipe = results["1"][0].pipe
    ref = pipe(PROMPT, seed=[0], steps=2, guidance_scale=4.5, sampler="scm", height=1024, width=1024)[0]
    same_picture(nodes["7"].saved[0], pixels(ref))


def test_img2img_workflow_from_a_loaded_image(classes, tmp_path, shipped_pipe):
    """LoadImage -> ImageScale -> SanaVAEEncode -> SanaSampler(denoise 0.6): `sana generate --image IMG
    --strength 0.6`."""
    image = example_image(tmp_path / "input" / "sana_example.png")
    nodes, _ = run_workflow(load_workflow("img2img"), classes)
    ref = shipped_pipe(PROMPT, seed=[0], image=str(image), strength=0.6, sampler="dpm")[0]
    same_picture(nodes["7"].saved[0], pixels(ref))
    plain = pixels(Image.open(REFERENCE / "dpm_default_0.png"))
    assert np.abs(nodes["7"].saved[0].astype(int) - plain).mean() > 5  # the image steered the picture


def test_lora_workflow_with_and_without_the_lora(comfy, classes, shipped_pipe):
    """One graph, two samplers on the loader's output: through SanaLoraLoader it is `sana generate --lora`,
    directly it is the plain model's picture, whichever runs first."""
    file = comfy.models_dir / "loras" / "sana_example_lora.safetensors"
    shutil.move(random_lora(shipped_pipe.transformer, comfy.models_dir / "loras" / "tmp", seed=1, std=1.0), file)
    nodes, _ = run_workflow(load_workflow("lora"), classes)
    record = merge_lora(shipped_pipe.transformer, read_lora(file))
    try:
        ref = shipped_pipe(PROMPT, seed=[0], sampler="dpm")[0]
    finally:
        record.remove()
    same_picture(nodes["7"].saved[0], pixels(ref))
    same_picture(nodes["11"].saved[0], pixels(Image.open(REFERENCE / "dpm_default_0.png")))
    assert np.abs(nodes["7"].saved[0].astype(int) - nodes["11"].saved[0]).mean() > 3  # the LoRA did something


def test_loader_default_is_the_shipped_model():
    assert SanaModelLoader().load("")[0].source == str(shipped())
