"""The model shipped inside the package: complete, small, the CLI's default, and the same image under diffusers'
SanaPipeline as here. (How well it follows prompts is measured by benchmarks/shapes_quality.py, docs/shapes.md.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sana.pipeline import SanaPipeline
from sana.pretrained import (
    SHIPPED_MODEL_DIR,
    SchedulerSpec,
    default_model,
    load_components,
    read_sampling,
    shipped_model,
)
from sana.shapes.build import CONFIGS, SAMPLING, SHIPPED_BUDGET_BYTES, folder_bytes
from sana.training import load_train_config

DEMO_PROMPT = "a red circle above a blue square"


@pytest.fixture(scope="module")
def pipe():
    return SanaPipeline.from_pretrained(SHIPPED_MODEL_DIR)


def test_shipped_folder_is_complete_small_and_the_default():
    assert shipped_model() == SHIPPED_MODEL_DIR and default_model() == SHIPPED_MODEL_DIR
    assert folder_bytes(SHIPPED_MODEL_DIR) <= SHIPPED_BUDGET_BYTES
    # Trained on bare captions: the folder says so, and the loaded text encoder adds no prefix.
    declared = json.loads((SHIPPED_MODEL_DIR / "instruction.json").read_text())
    assert declared == {"complex_human_instruction": None}
    # Its measured steps and guidance (sana/shapes/build.py SAMPLING) are what a call naming neither uses, and the
    # folder declares exactly what differs from the usual settings (the guidance).
    assert read_sampling(SHIPPED_MODEL_DIR) == SchedulerSpec(**SAMPLING).sampling() == {"guidance_scale": 2.5}
    spec = load_components(SHIPPED_MODEL_DIR, parts=()).scheduler
    assert (spec.steps, spec.guidance_scale) == (SAMPLING["steps"], SAMPLING["guidance_scale"])
    parts = load_components(SHIPPED_MODEL_DIR)
    # The build's last fine-tune: sincos positions on, and sampling with the time shift it trained with.
    last = load_train_config(Path(__file__).parents[2] / CONFIGS["dit_groups"])
    assert parts.transformer.config.interpolation_scale == 1.0
    assert parts.scheduler.flow_shift == last.flow.shift == 3.0
    assert parts.text_encoder.instruction is None
    assert parts.transformer.config.sample_size * parts.vae.config.spatial_compression == 256
    index = json.loads((SHIPPED_MODEL_DIR / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SanaTransformer2DModel"]
    from safetensors import safe_open

    with safe_open(str(SHIPPED_MODEL_DIR / "transformer" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}


def test_diffusers_draws_the_same_image_from_the_shipped_folder(pipe):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.SanaPipeline.from_pretrained(SHIPPED_MODEL_DIR, torch_dtype=torch.float32)
    ref = theirs(
        DEMO_PROMPT,
        generator=torch.Generator("cpu").manual_seed(3),
        num_inference_steps=SAMPLING["steps"],  # what ours uses below, naming neither
        guidance_scale=SAMPLING["guidance_scale"],
        height=256,
        width=256,
        complex_human_instruction=None,  # what instruction.json declares
        use_resolution_binning=False,  # diffusers has no table for 256 px models; ours is exact at 256
    ).images[0]
    ours = pipe(DEMO_PROMPT, seed=3)[0]
    diff = np.abs(np.asarray(ours, dtype=np.int16) - np.asarray(ref, dtype=np.int16))
    assert (diff <= 2).mean() >= 0.999, f"max diff {diff.max()}, share > 2: {(diff > 2).mean():.4f}"


def test_the_shipped_model_draws_the_single_object_it_is_asked_for(pipe):
    """The right picture, for the simplest prompts: eight fresh single-object prompts ("a green triangle", ...) at
    the model's default settings; the analyzer must find the asked colour and shape in at least seven.
    On the benchmark the shipped model gets 98 % of these right (docs/shapes.md); a model right 38 % of the
    time (an early one) would pass this 0.6 % of the time (binomial). Counts are still below their target
    (README)."""
    from sana.shapes.evaluate import evaluate_shapes

    report = evaluate_shapes(pipe, n_per_category=8, seed=7, categories=["single"])
    right = [r["correct"] for r in report.records]
    assert sum(right) >= 7, [(r["prompt"], r["analysis"]["objects"]) for r in report.records]
