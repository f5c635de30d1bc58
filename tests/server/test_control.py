"""ControlNet on `sana serve`: `control_image` / `control_scale` on the generation, job and edit routes.

A tiny random model (a 3-block DiT, a random 2-block ControlNet, 64 x 64 pixels, 2 steps): the official `openai`
client's images equal `pipe(..., control_image=...)` for the same seeds, requests with different control images
share a batch (each image still equals the image made alone) while other scales and plain text to image are
keyed apart, every bad control input is a one-line 400 naming the field before anything is queued, and `sana
serve --controlnet` loads a ControlNet on top of a base folder.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import json
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from sana.cli.main import main as sana_main
from sana.images import PARAMETERS_KEY
from sana.models.controlnet import ControlNetConfig, SanaControlNet
from sana.models.dit import SanaDiT
from sana.pipeline import SanaPipeline
from sana.pretrained import save_components
from sana.tiny import tiny_components
from tests.server.test_app import assert_same_picture, pixels, running

PROMPT = "a red circle above a blue square"
GENERATIONS = "/v1/images/generations"
EDITS = "/v1/images/edits"


def randomize(module: torch.nn.Module, seed: int, std: float) -> torch.nn.Module:
    """Every parameter perturbed, the ControlNet's zero-initialised projections included (so it steers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
    return module.eval()


def controlled_components(seed: int = 0):
    """The tiny model with a 3-block DiT (a 2-block ControlNet fits it) and a random ControlNet."""
    parts = tiny_components(seed=seed)
    config = dataclasses.replace(parts.transformer.config, num_layers=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        dit = SanaDiT(config)
        dit.init_weights()
    parts.transformer = randomize(dit, seed=seed + 2, std=0.05)
    parts.controlnet = randomize(SanaControlNet(ControlNetConfig.from_dit(config, 2)), seed=seed + 3, std=0.2)
    return parts


def control_picture(seed: int = 0, side: int = 64) -> Image.Image:
    """Random 8 x 8 blocks: structure at the scale the tiny 4x DC-AE latent sees."""
    blocks = np.random.default_rng(seed).integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks.repeat(8, 0).repeat(8, 1))


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def array(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-controlnet-model")
    save_components(controlled_components(), root)
    return root


@pytest.fixture(scope="module")
def pipe(folder):
    return SanaPipeline.from_pretrained(folder)


@pytest.fixture(scope="module")
def plain(pipe):
    """The same base model without a ControlNet."""
    return SanaPipeline(pipe.transformer, pipe.vae, pipe.text_encoder, pipe.scheduler)


def _app(pipe):
    from sana.server.app import create_app

    return create_app(pipe, model_name="tiny", max_batch=4, max_queue=16, max_images=4, max_steps=20,
                      max_body_bytes=4096, max_upload_bytes=256 << 10)  # fmt: skip


@pytest.fixture(scope="module")
def served(pipe):
    """(url, app) of the model with its ControlNet; JSON bodies of 4 KiB, image bodies of 256 KiB."""
    app = _app(pipe)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def served_plain(plain):
    app = _app(plain)
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served[0]}/v1", api_key="x", max_retries=0)


# ---------------------------------------------------------------------------------------------- images


def test_openai_client_control_image_equals_the_pipeline(client, pipe):
    control = control_picture()
    result = client.images.generate(
        model="tiny",
        prompt=PROMPT,
        n=2,
        size="64x64",
        response_format="b64_json",
        extra_body={"seed": 3, "num_inference_steps": 2, "control_image": b64(png(control)), "control_scale": 0.7},
    )
    expected = pipe(PROMPT, seed=[3, 4], steps=2, control_image=control, control_scale=0.7, images_per_prompt=2)
    got = [base64.b64decode(item.b64_json) for item in result.data]
    for data, image in zip(got, expected, strict=True):
        assert_same_picture(pixels(data), array(image))
    # The control image steers: without it the same seeds draw other pictures.
    unsteered = pipe(PROMPT, seed=[3, 4], steps=2, images_per_prompt=2)
    for data, image in zip(got, unsteered, strict=True):
        assert np.abs(pixels(data) - array(image)).mean() > 1
    parameters = json.loads(Image.open(io.BytesIO(got[0])).info[PARAMETERS_KEY])
    assert parameters["control_scale"] == 0.7 and parameters["seed"] == 3


def test_a_job_takes_a_data_url_and_the_default_scale(served, pipe):
    url, _ = served
    control = control_picture(seed=1, side=96)  # another size: fitted to 64 x 64 as the pipeline fits it
    body = {"prompt": PROMPT, "seed": 8, "num_inference_steps": 2,
            "control_image": "data:image/png;base64," + b64(png(control))}  # fmt: skip
    job = httpx.post(url + "/v1/jobs", json=body).json()
    for _ in range(600):
        state = httpx.get(job["url"]).json()
        if state["status"] not in ("queued", "running"):
            break
        time.sleep(0.05)
    assert state["status"] == "done", state
    data = httpx.get(state["images"][0]).content
    expected = pipe(PROMPT, seed=[8], steps=2, control_image=control)[0]  # control_scale 1
    assert_same_picture(pixels(data), array(expected))


def test_an_edit_with_a_control_image_equals_the_pipeline(served, pipe):
    url, _ = served
    source = pipe("a green triangle", seed=1, steps=2)[0]
    control = control_picture(seed=2)
    files = [
        ("image", ("in.png", png(source), "image/png")),
        ("control_image", ("c.png", png(control), "image/png")),
    ]
    data = {"prompt": PROMPT, "seed": "5", "num_inference_steps": "2", "strength": "0.8", "control_scale": "0.5"}
    r = httpx.post(url + EDITS, files=files, data=data, timeout=60)
    assert r.status_code == 200, r.text
    got = pixels(base64.b64decode(r.json()["data"][0]["b64_json"]))
    edit = dict(seed=[5], steps=2, image=source, strength=0.8)
    expected = pipe(PROMPT, control_image=control, control_scale=0.5, **edit)[0]
    assert_same_picture(got, array(expected))
    alone = pipe(PROMPT, **edit)[0]  # the same edit, not steered
    assert np.abs(got - array(alone)).mean() > 1


def test_control_images_share_a_batch_other_scales_and_plain_requests_do_not(pipe):
    """Queued before the worker starts: A (scale 1), plain, B (scale 1), C (scale 0.5) run as [A, B], [plain], [C];
    every image equals the one made alone."""
    from sana.server.app import ControlInput, batch_key
    from sana.server.engine import Engine, ImageSpec
    from sana.server.schemas import Resolved

    work = Resolved(PROMPT, "", 1, 64, 64, 2, 4.5, "dpm", 0.0, (0,), "b64_json", "png")
    controls = [ControlInput(control_picture(1), 1.0), None, ControlInput(control_picture(2), 1.0),
                ControlInput(control_picture(3), 0.5)]  # fmt: skip
    sizes = []
    engine = Engine(pipe, max_batch=4, on_batch=lambda n, s: sizes.append(n))
    jobs = []
    for i, control in enumerate(controls):
        image = None if control is None else control.image
        spec = ImageSpec(PROMPT, "", 10 + i, control=image)
        jobs.append(engine.submit(batch_key(work, control=control), [spec]))
    engine.start()
    for job in jobs:
        asyncio.run(asyncio.wait_for(job.wait(), 60))
    engine.stop()
    assert sizes == [2, 1, 1] and all(job.status == "done" for job in jobs)
    for i, (job, control) in enumerate(zip(jobs, controls, strict=True)):
        data, _ = engine.image(job.image_names[0])
        steer = {} if control is None else {"control_image": control.image, "control_scale": control.scale}
        alone = pipe(PROMPT, seed=[10 + i], steps=2, guidance_scale=4.5, **steer)[0]
        assert_same_picture(pixels(data), array(alone))


def test_config_says_whether_a_controlnet_is_served(served, served_plain):
    assert httpx.get(served[0] + "/v1/config").json()["controlnet"] is True
    assert httpx.get(served_plain[0] + "/v1/config").json()["controlnet"] is False


def test_with_a_controlnet_generation_bodies_may_be_as_large_as_uploads(served, served_plain):
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    body = {"prompt": PROMPT, "num_inference_steps": 1, "control_image": b64(png(Image.fromarray(noise)))}
    assert len(json.dumps(body)) > 4096  # over --max-body-bytes, within --max-upload-bytes
    r = httpx.post(served[0] + GENERATIONS, json=body, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(served_plain[0] + GENERATIONS, json=body)
    assert r.status_code == 413 and "larger than 4096 bytes" in r.json()["error"]["message"]


# ---------------------------------------------------------------------------------------------- errors

CONTROL = b64(png(control_picture()))
TRUNCATED = b64(png(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)))[:300])
BAD_JSON = [
    ({"control_image": CONTROL}, "plain", "control_image", "this server has no ControlNet"),
    ({"control_image": b64(b"not an image")}, "served", "control_image", "is not an image file PIL can read"),
    ({"control_image": TRUNCATED}, "served", "control_image", "the uploaded control image cannot be decoded"),
    ({"control_image": "@@not base64@@"}, "served", "control_image", "control_image is not base64 data"),
    ({"control_image": "data:image/png,abc"}, "served", "control_image", "a data: URL must carry base64"),
    ({"control_image": " "}, "served", "control_image", "control_image is empty"),
    ({"control_image": 5}, "served", "control_image", "input should be a valid string"),
    ({"control_image": CONTROL, "control_scale": "1"}, "served", "control_scale", "valid number"),
    ({"control_scale": 0.5}, "served", "control_scale", "control_scale needs a control_image"),
]


@pytest.mark.parametrize(("fields", "server", "param", "words"), BAD_JSON, ids=[b[3] for b in BAD_JSON])
@pytest.mark.parametrize("path", [GENERATIONS, "/v1/jobs"])
def test_a_bad_control_field_is_a_one_line_400_before_queueing(request, path, fields, server, param, words):
    url, app = request.getfixturevalue({"plain": "served_plain", "served": "served"}[server])
    r = httpx.post(url + path, json={"prompt": PROMPT, "num_inference_steps": 2, **fields}, timeout=30)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"], error
    assert app.state.engine.queue_depth == 0


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_a_control_scale_that_is_not_finite_is_refused(served, value):
    url, _ = served
    body = f'{{"prompt": "a", "control_image": "{CONTROL}", "control_scale": {value}}}'
    r = httpx.post(url + GENERATIONS, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "control_scale" and "finite" in r.json()["error"]["message"]


PNG_CONTROL = png(control_picture())


def _edit(control=(PNG_CONTROL,), as_text=False, **fields):
    files = [("image", ("in.png", png(control_picture(5)), "image/png"))]
    files += [("control_image", ("c.png", data, "image/png")) for data in control]
    data = {"prompt": PROMPT, "num_inference_steps": "2", **fields}
    if as_text:
        data["control_image"] = "c.png"
    return {"files": files, "data": data}


BAD_EDITS = [
    (_edit(), "plain", "control_image", "this server has no ControlNet"),
    (_edit(control=[b"not an image"]), "served", "control_image", "the uploaded control image is not an image"),
    (_edit(control=[PNG_CONTROL] * 2), "served", "control_image", "send one file"),
    (_edit(control=[], as_text=True), "served", "control_image", "must be an image file upload"),
    (_edit(control_scale="nan"), "served", "control_scale", "finite"),
    (_edit(control_scale="strong"), "served", "control_scale", "control_scale must be a number"),
    (_edit(control=[], control_scale="0.5"), "served", "control_scale", "needs a control_image"),
]


@pytest.mark.parametrize(("form", "server", "param", "words"), BAD_EDITS, ids=[b[3] for b in BAD_EDITS])
def test_a_bad_control_field_of_an_edit_is_a_one_line_400(request, form, server, param, words):
    url, app = request.getfixturevalue({"plain": "served_plain", "served": "served"}[server])
    r = httpx.post(url + EDITS, **form, timeout=30)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"], error
    assert app.state.engine.queue_depth == 0


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def started(monkeypatch):
    """`sana serve` up to the point where uvicorn would listen: the app it built, or None."""
    import uvicorn

    apps = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: apps.append(self.config.app))
    threads = torch.get_num_threads()
    try:
        yield apps
    finally:
        torch.set_num_threads(threads)  # `sana serve` keeps the main thread to one torch thread


def test_sana_serve_controlnet_loads_one_on_top_of_a_base(folder, pipe, tmp_path, started, capsys):
    parts = controlled_components()
    parts.controlnet = None
    save_components(parts, tmp_path / "base")
    assert sana_main(["serve", "--model", str(tmp_path / "base"), "--controlnet", str(folder), "--port", "0"]) == 0
    (app,) = started
    served_pipe = app.state.pipe
    assert served_pipe.controlnet is not None
    kw = dict(control_image=control_picture(), seed=[1], steps=2, output_type="pt")
    assert torch.equal(served_pipe(PROMPT, **kw), pipe(PROMPT, **kw))  # the ControlNet of `folder`, on the base
    # A folder holding no ControlNet fails in one line before the model loads.
    capsys.readouterr()
    assert sana_main(["serve", "--model", str(tmp_path / "base"), "--controlnet", str(tmp_path / "base")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a Sana ControlNet" in err and len(started) == 1, err
