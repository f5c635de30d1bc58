"""The ComfyUI nodes as plain Python on tiny random models: the same latents and images as SanaPipeline for the
same settings (every sampler, guidance, PAG, Sprint, img2img, inpainting, ControlNet, LoRA), what ComfyUI sees
(progress per step, Interrupt between steps, validation messages, memory registration), and that no node
changes a value another branch holds."""

from __future__ import annotations

import dataclasses
import gc
import inspect
import weakref

import numpy as np
import pytest
import torch

from comfyui import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from comfyui.nodes import (
    SanaControlNetApply,
    SanaControlNetLoader,
    SanaEmptyLatent,
    SanaLoraLoader,
    SanaModel,
    SanaModelLoader,
    SanaSampler,
    SanaTextEncode,
    SanaVAEDecode,
    SanaVAEEncode,
)
from sana.errors import UserError
from sana.lora import merge_lora, read_lora, save_lora
from sana.models.controlnet import SanaControlNet
from sana.pipeline import SanaPipeline
from sana.weights import save_model
from tests.comfyui.support import (
    FakeComfy,
    Interrupted,
    perturbed,
    random_lora,
    sprint_folder,
    tiny_folder,
)

SIZE = 64  # pixels; the tiny model's 4x DC-AE makes 16 x 16 latents


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def model(folder) -> SanaModel:
    return SanaModelLoader().load(str(folder))[0]


@pytest.fixture(scope="module")
def pipe(model) -> SanaPipeline:
    return model.pipe


@pytest.fixture
def comfy(tmp_path, monkeypatch) -> FakeComfy:
    return FakeComfy(tmp_path / "models").install(monkeypatch)


def encode(model, text, **kw):
    return SanaTextEncode().encode(model, text, **kw)[0]


def empty(model, batch=1, size=SIZE):
    return SanaEmptyLatent().generate(size, size, batch, model=model)[0]


def sample(model, positive="a red circle", negative="", latent=None, **kw):
    settings = dict(seed=3, steps=4, cfg=4.5, sampler_name="flow_dpm_solver", denoise=1.0)
    settings.update(kw)
    positive = encode(model, positive) if isinstance(positive, str) else positive
    negative = encode(model, negative) if isinstance(negative, str) else negative
    latent = empty(model) if latent is None else latent
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return SanaSampler().sample(model, positive, negative, latent, **settings)[0]


def reference(pipe, prompt="a red circle", **kw):
    settings = dict(seed=[3], steps=4, guidance_scale=4.5, sampler="dpm", height=SIZE, width=SIZE)
    settings.update(kw)
    return pipe(prompt, output_type="latent", use_resolution_binning=False, **settings)


# ------------------------------------------------------------------------------------------ the node table


def test_nodes_declare_the_issue_inputs_and_everything_else_is_optional():
    required = {
        "SanaModelLoader": ["model_path"],
        "SanaTextEncode": ["model", "text"],
        "SanaEmptyLatent": ["width", "height", "batch_size"],
        "SanaSampler": [
            "model",
            "positive",
            "negative",
            "latent_image",
            "seed",
            "steps",
            "cfg",
            "sampler_name",
            "denoise",
        ],
        "SanaVAEDecode": ["model", "samples"],
        "SanaVAEEncode": ["model", "pixels"],
        "SanaLoraLoader": ["model", "lora_path", "strength"],
    }
    for name, inputs in required.items():
        spec = NODE_CLASS_MAPPINGS[name].INPUT_TYPES()
        assert list(spec["required"]) == inputs, name
        function = getattr(NODE_CLASS_MAPPINGS[name], NODE_CLASS_MAPPINGS[name].FUNCTION)
        defaults = {k for k, p in inspect.signature(function).parameters.items() if p.default is not p.empty}
        assert set(spec.get("optional", {})) <= defaults, name  # optional inputs have a default in the node
    assert set(NODE_DISPLAY_NAME_MAPPINGS) == set(NODE_CLASS_MAPPINGS)
    sampler = SanaSampler.INPUT_TYPES()["required"]
    assert sampler["sampler_name"][0] == ["flow_dpm_solver", "flow_euler", "scm"]
    assert sampler["steps"][1]["min"] == 1  # ComfyUI refuses steps 0 before running
    assert SanaEmptyLatent.RETURN_TYPES == SanaSampler.RETURN_TYPES == SanaVAEEncode.RETURN_TYPES == ("LATENT",)
    assert SanaVAEDecode.RETURN_TYPES == ("IMAGE",)


def test_empty_latent_is_comfyui_latent_of_the_model_shape(model):
    latent = SanaEmptyLatent().generate(1024, 512, 2)[0]
    assert latent["samples"].shape == (2, 32, 16, 32) and not latent["samples"].any()  # published models
    assert empty(model, batch=3)["samples"].shape == (3, 4, 16, 16)  # the tiny model: 4 channels, 4x


# --------------------------------------------------------------------------------------- parity with pipeline


@pytest.mark.parametrize(
    ("node_kw", "pipe_kw"),
    [
        ({}, {}),
        ({"sampler_name": "flow_euler", "steps": 3}, {"sampler": "euler", "steps": 3}),
        ({"cfg": 1.0}, {"guidance_scale": 1.0}),
        ({"pag_scale": 1.5, "pag_layers": "0, 1"}, {"pag_scale": 1.5, "pag_layers": (0, 1)}),
        ({"flow_shift": 6.0}, {}),
    ],
    ids=["dpm", "euler", "no-cfg", "pag", "flow-shift"],
)
def test_sampler_gives_the_pipeline_latents(model, pipe, node_kw, pipe_kw):
    out = sample(model, negative="blurry", **node_kw)
    if "flow_shift" in node_kw:  # the override is the model folder's shift changed, nothing else
        shifted = SanaPipeline(
            pipe.transformer,
            pipe.vae,
            pipe.text_encoder,
            dataclasses.replace(pipe.scheduler, flow_shift=node_kw["flow_shift"]),
            placement=pipe.placement,
        )
        ref = reference(shifted, negative_prompt="blurry")
        assert not torch.allclose(ref, reference(pipe, negative_prompt="blurry"))
    else:
        ref = reference(pipe, negative_prompt="blurry", **pipe_kw)
    torch.testing.assert_close(out["samples"], ref, rtol=0, atol=1e-5)


def test_a_batch_draws_seed_plus_i_and_a_picked_latent_keeps_its_number(model, pipe):
    out = sample(model, latent=empty(model, batch=2), seed=10)["samples"]
    ref = reference(pipe, prompt=["a red circle"] * 2, seed=[10, 11])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    picked = dict(empty(model), batch_index=[1])  # what ComfyUI's LatentFromBatch makes
    torch.testing.assert_close(sample(model, latent=picked, seed=10)["samples"], ref[1:], rtol=0, atol=1e-5)


def test_sprint_model_samples_as_the_pipeline(tmp_path):
    sprint = SanaModelLoader().load(str(sprint_folder(tmp_path)))[0]
    out = sample(sprint, steps=2, sampler_name="scm", cfg=4.5)["samples"]
    ref = reference(sprint.pipe, steps=2, sampler="scm", guidance_scale=4.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_decode_and_encode_are_the_dc_ae(model, pipe):
    latent = sample(model)
    image = SanaVAEDecode().decode(model, latent)[0]
    assert image.shape == (1, SIZE, SIZE, 3) and image.min() >= 0 and image.max() <= 1
    ref = pipe("a red circle", seed=[3], steps=4, height=SIZE, width=SIZE, output_type="pt")
    torch.testing.assert_close(image, (ref * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1), rtol=0, atol=1e-5)
    back = SanaVAEEncode().encode(model, image)[0]["samples"]
    with torch.no_grad():
        direct = pipe.vae.encode(image.permute(0, 3, 1, 2) * 2 - 1)
    torch.testing.assert_close(back, direct, rtol=0, atol=1e-6)


def test_img2img_denoise_is_the_pipeline_strength(model, pipe):
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, SIZE, SIZE, 3, generator=g)
    init = SanaVAEEncode().encode(model, pixels)[0]
    out = sample(model, latent=init, denoise=0.5)["samples"]
    ref = reference(pipe, image=pixels.permute(0, 3, 1, 2) * 2 - 1, strength=0.5)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(out, sample(model, latent=init)["samples"])  # denoise 1 ignores the latent


def test_noise_mask_inpaints_as_the_pipeline(model, pipe):
    g = torch.Generator().manual_seed(1)
    pixels = torch.rand(1, SIZE, SIZE, 3, generator=g)
    mask = torch.zeros(1, SIZE, SIZE)
    mask[:, 8:40, 16:56] = 1  # 1 = repaint, as ComfyUI's masks
    latent = dict(SanaVAEEncode().encode(model, pixels)[0], noise_mask=mask[:, None])  # SetLatentNoiseMask
    out = sample(model, latent=latent, denoise=0.8)["samples"]
    image = pixels.permute(0, 3, 1, 2) * 2 - 1
    ref = reference(pipe, image=image, mask_image=mask[:, None], strength=0.8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    kept = latent["samples"][..., 12:, :]  # latent rows below the mask's reach are the input's own
    torch.testing.assert_close(out[..., 12:, :], kept, rtol=0, atol=1e-5)


def test_controlnet_nodes_steer_as_the_pipeline(model, pipe, tmp_path):
    controlnet = perturbed(SanaControlNet.from_transformer(pipe.transformer, num_layers=1), seed=6, std=0.1)
    save_model(controlnet, tmp_path / "controlnet")
    loaded = SanaControlNetLoader().load(model, str(tmp_path / "controlnet"))[0]
    g = torch.Generator().manual_seed(2)
    control = torch.rand(1, SIZE, SIZE, 3, generator=g)
    positive = SanaControlNetApply().apply(encode(model, "a red circle"), loaded, control, 0.8)[0]
    out = sample(model, positive=positive)["samples"]
    steered = SanaPipeline(
        pipe.transformer, pipe.vae, pipe.text_encoder, pipe.scheduler, controlnet=loaded.controlnet
    )
    ref = reference(steered, control_image=control.permute(0, 3, 1, 2) * 2 - 1, control_scale=0.8)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(out, sample(model)["samples"], atol=1e-3)  # the ControlNet changed something
    assert SanaControlNetLoader.VALIDATE_INPUTS(controlnet_path=str(tmp_path / "nothing")).startswith("no such")


def test_instruction_options(model, folder):
    bare = SanaPipeline.from_pretrained(folder, instruction=None)
    off = encode(model, "a cat", instruction="off")
    with torch.no_grad():
        ref = bare.text_encoder.encode(["a cat"])
        neg = bare.text_encoder.encode_unconditional(["a cat"])
    torch.testing.assert_close(off.positive.hidden, ref.hidden)
    torch.testing.assert_close(off.negative.hidden, neg.hidden)
    default = encode(model, "a cat")
    assert not torch.allclose(default.positive.hidden, off.positive.hidden)  # the tiny folder has the CHI
    custom = encode(model, "a cat", instruction="custom", custom_instruction="Draw this: ")
    assert not torch.allclose(custom.positive.hidden, default.positive.hidden)
    with pytest.raises(UserError, match="custom_instruction is empty"):
        encode(model, "a cat", instruction="custom")


# ---------------------------------------------------------------------------------------------------- LoRA


def test_lora_node_leaves_other_branches_plain_and_restores_weights(model, pipe, tmp_path):
    lora = random_lora(pipe.transformer, tmp_path / "lora")
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    plain = sample(model)["samples"]
    adapted = SanaLoraLoader().load(model, str(lora), 0.8)[0]
    assert model.loras == () and len(adapted.loras) == 1  # the input value is untouched
    with_lora = sample(adapted)["samples"]
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())
    # Another branch using the loader's output, after the LoRA branch ran: still the plain model.
    torch.testing.assert_close(sample(model)["samples"], plain, rtol=0, atol=0)
    # The LoRA branch gives what the pipeline gives with the LoRA merged (as `sana generate --lora`).
    record = merge_lora(pipe.transformer, read_lora(lora), 0.8)
    try:
        ref = reference(pipe)
    finally:
        record.remove()
    torch.testing.assert_close(with_lora, ref, rtol=0, atol=1e-5)
    assert not torch.allclose(with_lora, plain, atol=1e-3)
    # Two LoRAs stack in order and come off in reverse.
    twice = SanaLoraLoader().load(adapted, str(lora), -0.8)[0]
    torch.testing.assert_close(sample(twice)["samples"], plain, rtol=0, atol=1e-4)
    assert all(torch.equal(v, before[k]) for k, v in pipe.transformer.state_dict().items())


def test_lora_that_does_not_fit_fails_on_its_node(model, pipe, tmp_path):
    layers = read_lora(random_lora(pipe.transformer, tmp_path / "lora"))
    first = next(iter(layers))
    save_lora(tmp_path / "bad", {first: dataclasses.replace(layers[first], down=torch.zeros(2, 3))})
    with pytest.raises(UserError, match="does not fit"):
        SanaLoraLoader().load(model, str(tmp_path / "bad"), 1.0)
    assert SanaLoraLoader.VALIDATE_INPUTS(lora_path=str(tmp_path / "missing")).startswith("no LoRA at")


# -------------------------------------------------------------------------------------- ComfyUI behaviour


def test_progress_bar_per_step_and_models_loaded_before_use(comfy, folder):
    model = SanaModelLoader().load(str(folder))[0]
    assert set(model.patchers) == {"transformer", "vae", "text_encoder"}
    patchers = model.patchers
    assert patchers["transformer"].model.component is model.pipe.transformer
    assert patchers["text_encoder"].model.component is model.pipe.text_encoder.model
    positive = encode(model, "a red circle")
    assert comfy.loads[-1] == [patchers["text_encoder"]]
    with torch.inference_mode():
        SanaSampler().sample(model, positive, positive, empty(model), 1, 5, 4.5, "flow_euler", 1.0, unique_id="7")
    assert comfy.progress == [("7", i, 5) for i in range(1, 6)]
    assert comfy.loads[-1] == [patchers["transformer"]]
    SanaVAEDecode().decode(model, empty(model))
    assert comfy.loads[-1] == [patchers["vae"]]
    comfy.progress.clear()
    latent = SanaVAEEncode().encode(model, torch.rand(1, SIZE, SIZE, 3))[0]
    with torch.inference_mode():
        SanaSampler().sample(model, positive, positive, latent, 1, 10, 4.5, "flow_euler", 0.3, unique_id="7")
    assert comfy.progress == [("7", i, 3) for i in range(1, 4)]  # img2img runs ceil(0.3 * 10) steps


def test_low_memory_mode_leaves_the_offloaded_encoder_to_the_pipeline(comfy, folder):
    model = SanaModelLoader().load(str(folder), low_memory="text encoder offloaded")[0]
    assert model.pipe.placement.offloaded == ("text_encoder",)
    assert set(model.patchers) == {"transformer", "vae"}


def test_interrupt_stops_between_steps_and_the_weights_come_back(comfy, folder, tmp_path):
    model = SanaModelLoader().load(str(folder))[0]
    adapted = SanaLoraLoader().load(model, str(random_lora(model.pipe.transformer, tmp_path / "lora")), 1.0)[0]
    before = {k: v.clone() for k, v in model.pipe.transformer.state_dict().items()}
    comfy.interrupt_at = 2
    positive = encode(model, "a red circle")
    with pytest.raises(Interrupted), torch.inference_mode():
        SanaSampler().sample(adapted, positive, positive, empty(model), 1, 6, 4.5, "flow_dpm_solver", 1.0)
    assert [value for _, value, _ in comfy.progress] == [1, 2]  # stopped after step 2 of 6
    assert all(torch.equal(v, before[k]) for k, v in model.pipe.transformer.state_dict().items())


def test_model_is_released_with_the_output_that_holds_it(comfy, folder):
    """No module-level cache: once ComfyUI drops the loader's cached output, the models can be freed."""
    output = SanaModelLoader().load(str(folder))
    alive = weakref.ref(output[0].pipe.transformer)
    encode(output[0], "a cat")
    del output
    gc.collect()
    assert alive() is None


def test_model_folders_under_comfyui_models_are_offered(comfy, folder, tmp_path):
    import shutil

    shutil.copytree(folder, comfy.models_dir / "sana" / "tiny-sana")
    options = SanaModelLoader.INPUT_TYPES()["optional"]["model_folder"][0]
    assert options == ["none", "tiny-sana"]
    model = SanaModelLoader().load("", model_folder="tiny-sana")[0]
    assert model.source == str(comfy.models_dir / "sana" / "tiny-sana")


@pytest.mark.parametrize(
    ("node", "inputs", "message"),
    [
        (SanaEmptyLatent, dict(width=1000, height=512), "width must be a positive multiple of 32, got 1000"),
        (SanaEmptyLatent, dict(width=512, height=0), "height must be a positive multiple of 32, got 0"),
        (SanaModelLoader, dict(model_path="/no/such/folder"), "no such model folder: /no/such/folder"),
        (SanaSampler, dict(pag_layers="8, x"), "pag_layers must be block numbers"),
        (SanaLoraLoader, dict(lora_path=""), "lora_path is empty"),
    ],
)
def test_bad_values_fail_validation_with_one_line(node, inputs, message):
    verdict = node.VALIDATE_INPUTS(**inputs)
    assert isinstance(verdict, str) and verdict.startswith(message) and "\n" not in verdict


def test_bad_values_at_run_time_are_one_line_user_errors(model, comfy):
    with pytest.raises(UserError, match="steps must be a positive integer, got 0"):
        sample(model, steps=0)
    with pytest.raises(UserError, match="width must be a positive multiple of 32"):
        SanaEmptyLatent().generate(100, 64, 1, model=model)
    with pytest.raises(UserError, match="no such model folder"):
        SanaModelLoader().load("/no/such/folder")
    with pytest.raises(UserError, match="the latent has 32 channels, this model's have 4"):
        sample(model, latent=SanaEmptyLatent().generate(64, 64, 1)[0])
    with pytest.raises(UserError, match="not a multiple of 32"):
        SanaVAEEncode().encode(model, torch.rand(1, 50, 64, 3))
    assert np.isfinite(sample(model, steps=1)["samples"].numpy()).all()


def test_loader_low_memory_options_are_the_pipeline_s(folder):
    quantized = SanaModelLoader().load(str(folder), quantize="int8", quantize_text_encoder="int8")[0]
    ref = SanaPipeline.from_pretrained(folder, quantize="int8", quantize_text_encoder="int8")
    out = sample(quantized, negative="blurry")["samples"]
    torch.testing.assert_close(out, reference(ref, negative_prompt="blurry"), rtol=0, atol=1e-5)
    with pytest.raises(UserError, match="the compute device is the CPU: there is nothing to offload"):
        SanaModelLoader().load(str(folder), low_memory="model offload")
