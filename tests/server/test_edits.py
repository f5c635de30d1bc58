"""`POST /v1/images/edits`: OpenAI's image edit on `sana serve`, with the official `openai` client.

The shipped model at 256 x 256 and 2-3 steps: img2img and inpainting answers equal the pipeline's own images
(OpenAI's mask convention: transparent = repaint; without a mask, the image's own transparency), edits of
different requests batch together and still equal each image made alone, and bad images, masks and fields get
one-line 400s naming the field, before any model work.
"""

from __future__ import annotations

import asyncio
import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.server.test_app import assert_same_picture, pixels, running

PROMPT = "a yellow square above a blue square"
EDITS = "/v1/images/edits"


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pipe():
    from sana.pipeline import SanaPipeline
    from sana.pretrained import shipped_model

    return SanaPipeline.from_pretrained(shipped_model())


@pytest.fixture(scope="module")
def source(pipe):
    return pipe("a red circle above a blue square", seed=1, steps=3)[0]


@pytest.fixture(scope="module")
def served(pipe):
    """(url, app): the shipped model as "shapes", at most 4 images, 50 steps and a 64 KiB edit body."""
    from sana.server.app import create_app

    app = create_app(pipe, model_name="shapes", max_batch=4, max_queue=16, max_images=4, max_steps=50,
                     max_body_bytes=4096, max_upload_bytes=64 << 10)  # fmt: skip
    with running(app) as url:
        yield url, app


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=f"{served[0]}/v1", api_key="x", max_retries=0)


def openai_mask() -> Image.Image:
    """OpenAI's mask: transparent where to edit (the top half), opaque elsewhere."""
    mask = Image.new("RGBA", (256, 256), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 256, 128))
    return mask


def top_half() -> Image.Image:
    mask = Image.new("L", (256, 256), 0)
    mask.paste(255, (0, 0, 256, 128))
    return mask


def test_openai_client_img2img_equals_the_pipeline(client, pipe, source):
    result = client.images.edit(
        model="shapes",
        image=("in.png", png(source), "image/png"),
        prompt=PROMPT,
        n=2,
        size="256x256",
        response_format="b64_json",
        extra_body={"seed": 4, "num_inference_steps": 3, "strength": 0.7},
    )
    assert len(result.data) == 2
    expected = pipe(PROMPT, seed=[4, 5], steps=3, image=source, strength=0.7, images_per_prompt=2)
    for item, image in zip(result.data, expected, strict=True):
        assert_same_picture(pixels(base64.b64decode(item.b64_json)), np.asarray(image).astype(np.int16))
    a, b = (pixels(base64.b64decode(item.b64_json)) for item in result.data)
    assert np.abs(a - b).mean() > 1  # each image its own seed


def test_openai_client_inpainting_with_a_transparent_mask(client, pipe, source):
    result = client.images.edit(
        image=("in.png", png(source), "image/png"),
        mask=("mask.png", png(openai_mask()), "image/png"),
        prompt=PROMPT,
        extra_body={"seed": 5, "num_inference_steps": 3},  # strength: 1 with a mask
    )
    got = pixels(base64.b64decode(result.data[0].b64_json))
    expected = pipe(PROMPT, seed=[5], steps=3, image=source, mask_image=top_half())[0]
    assert_same_picture(got, np.asarray(expected).astype(np.int16))
    original = np.asarray(source).astype(np.int16)
    assert np.abs(got[140:] - original[140:]).max() <= 2  # the opaque half is kept
    assert np.abs(got[:116] - original[:116]).mean() > 5  # the transparent half is repainted


def test_without_a_mask_the_images_transparency_is_the_mask(client, pipe, source):
    rgba = source.convert("RGBA")
    rgba.paste((0, 0, 0, 0), (0, 0, 256, 128))
    result = client.images.edit(
        image=("in.png", png(rgba), "image/png"), prompt=PROMPT, extra_body={"seed": 6, "num_inference_steps": 2}
    )
    expected = pipe(PROMPT, seed=[6], steps=2, image=rgba, mask_image=top_half())[0]
    assert_same_picture(pixels(base64.b64decode(result.data[0].b64_json)), np.asarray(expected).astype(np.int16))


def test_edits_of_different_requests_share_a_batch_and_equal_images_made_alone(pipe, source):
    from sana.server.app import EditInput, batch_key
    from sana.server.engine import Engine, ImageSpec
    from sana.server.schemas import Resolved

    work = Resolved(PROMPT, "", 1, 256, 256, 2, 2.5, "dpm", 0.0, (0,), "b64_json", "png")
    flipped = source.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    edits = [EditInput(source, top_half(), 1.0), EditInput(flipped, None, 1.0)]  # inpainting beside img2img
    sizes = []
    engine = Engine(pipe, on_batch=lambda n, s: sizes.append(n))
    jobs = [engine.submit(batch_key(work, e), [ImageSpec(PROMPT, "", 7 + i, e.image, e.mask)])
            for i, e in enumerate(edits)]  # fmt: skip
    engine.start()  # both queued before the worker starts: one batch
    for job in jobs:
        asyncio.run(asyncio.wait_for(job.wait(), 60))
    engine.stop()
    assert sizes == [2] and all(job.status == "done" for job in jobs)
    for i, (job, edit) in enumerate(zip(jobs, edits, strict=True)):
        data, _ = engine.image(job.image_names[0])
        alone = pipe(PROMPT, seed=[7 + i], steps=2, image=edit.image, mask_image=edit.mask, strength=1.0)[0]
        assert_same_picture(pixels(data), np.asarray(alone).astype(np.int16))
    # Text to image never joins an edit's batch.
    assert batch_key(work) != batch_key(work, edits[1])


# ------------------------------------------------------------------------------------ malformed requests


def _form(image=True, mask=None, **fields):
    files = []
    if image is True:
        files.append(("image", ("in.png", png(Image.new("RGB", (64, 64), "red")), "image/png")))
    elif image is not None:
        files += [("image", ("in.png", data, "image/png")) for data in image]
    if mask is not None:
        files.append(("mask", ("mask.png", mask, "image/png")))
    data = {"prompt": PROMPT, "num_inference_steps": "2", **fields}
    return {"files": files, "data": {k: v for k, v in data.items() if v is not None}}


NOISE = np.random.RandomState(0).randint(0, 256, (64, 64, 3), np.uint8)
BAD_EDITS = [
    (_form(image=None), "image", "image is required"),
    (_form(image=[b"not an image"]), "image", "the uploaded image is not an image file PIL can read"),
    (_form(image=[png(Image.fromarray(NOISE))[:300]]), "image", "the uploaded image cannot be decoded"),
    (_form(image=[png(Image.new("RGB", (8, 8)))] * 2), "image", "send one file"),
    (_form(mask=b"\x89PNG broken"), "mask", "the uploaded mask"),
    (_form(strength="0"), "strength", "strength must be in (0, 1]"),
    (_form(strength="1.5"), "strength", "strength must be in (0, 1]"),
    (_form(strength="high"), "strength", "strength must be a number"),
    (_form(strength="nan"), "strength", "finite"),
    (_form(n="two"), "n", "n must be an integer"),
    (_form(n="9"), "n", "n must be between 1 and 4"),
    (_form(size="100x100"), "size", "multiples of 32"),
    (_form(stream="true"), "stream", "streaming is not supported"),
    (_form(num_steps="3"), "num_steps", "unknown field"),
    (_form(prompt=None), "prompt", "prompt is required"),
]


@pytest.mark.parametrize(("form", "param", "words"), BAD_EDITS, ids=[b[2] for b in BAD_EDITS])
def test_a_bad_edit_gets_a_one_line_400_naming_the_field(served, form, param, words):
    url, app = served
    r = httpx.post(url + EDITS, **form, timeout=30)
    assert r.status_code == 400, r.text[:300]
    error = r.json()["error"]
    assert error["param"] == param and words in error["message"] and "\n" not in error["message"], error
    assert app.state.engine.queue_depth == 0


def test_edits_need_multipart_files_and_a_bounded_body(served):
    url, _ = served
    r = httpx.post(url + EDITS, json={"prompt": PROMPT, "image": "aGVsbG8="})
    assert r.status_code == 400 and "multipart/form-data" in r.json()["error"]["message"]
    r = httpx.post(url + EDITS, data={"prompt": PROMPT, "image": "in.png"})  # a text field, not a file
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    big = np.random.RandomState(0).randint(0, 256, (256, 256, 3), np.uint8)  # ~200 KB of PNG: over 64 KiB
    r = httpx.post(url + EDITS, **_form(image=[png(Image.fromarray(big))]))
    assert r.status_code == 413 and "larger than 65536 bytes" in r.json()["error"]["message"]
    # An edit body above the generations' 4 KiB limit but within the upload limit is fine.
    ok = httpx.post(url + EDITS, **_form(image=[png(Image.fromarray(big[:64, :64]))], seed="1"), timeout=60)
    assert ok.status_code == 200, ok.text
    assert httpx.get(url + EDITS).status_code == 405
