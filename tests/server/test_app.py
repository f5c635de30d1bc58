"""`sana serve`'s HTTP side, end to end: the real app under uvicorn on a free port, real clients.

The shipped model at its native 256x256 and a few steps: the official `openai` client gets the pipeline's
images (and `sana generate`'s), malformed requests get one-line 4xx answers naming the field, the API key
guards every route but the open ones, jobs stream their events, a client that goes away cancels its job, a
full queue answers 429, /metrics counts, and SIGTERM lets running work finish before the process exits 0.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from sana.cli.main import main as sana_main

PROMPT = "a red circle above a blue square"
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """The app under uvicorn in a background thread; yields its base URL once it listens."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def pipe():
    from sana.pipeline import SanaPipeline
    from sana.pretrained import shipped_model

    return SanaPipeline.from_pretrained(shipped_model())


@pytest.fixture(scope="module")
def served(pipe):
    """(url, app): the shipped model as "shapes", a 4 KiB body limit, at most 4 images and 50 steps."""
    from sana.server.app import create_app

    app = create_app(
        pipe, model_name="shapes", max_batch=4, max_queue=16, max_images=4, max_steps=50, max_body_bytes=4096
    )
    with running(app) as url:
        yield url, app


@pytest.fixture
def gate(pipe):
    """A closed gate in front of every DiT forward: the engine's batch blocks until `gate.set()`."""
    event = threading.Event()
    handle = pipe.transformer.register_forward_pre_hook(lambda module, args: event.wait(60) and None)
    try:
        yield event
    finally:
        event.set()
        handle.remove()


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def assert_same_picture(a: np.ndarray, b: np.ndarray) -> None:
    """<= 2 levels apart on >= 99.9 % of the values (batching may change float rounding, not the picture)."""
    assert a.shape == b.shape
    assert (np.abs(a - b) <= 2).mean() >= 0.999, f"max diff {np.abs(a - b).max()}"


def metric(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels} in /metrics")


def wait_for(condition, seconds: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def sse(response: httpx.Response):
    """(event, data) pairs of a text/event-stream response, ignoring comments."""
    event, data = None, []
    for line in response.iter_lines():
        if line == "":
            if event is not None:
                yield event, json.loads("\n".join(data))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


# --------------------------------------------------------------------------------------- OpenAI client


def test_openai_client_gets_the_pipelines_images(served, pipe):
    from openai import OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    result = client.images.generate(
        model="shapes",
        prompt=PROMPT,
        n=2,
        size="256x256",
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 3, "guidance_scale": 2.5},
    )
    assert len(result.data) == 2 and result.created > 0
    expected = pipe(PROMPT, seed=[5, 6], steps=3, guidance_scale=2.5, images_per_prompt=2)
    for item, image in zip(result.data, expected, strict=True):
        assert_same_picture(pixels(base64.b64decode(item.b64_json)), np.asarray(image).astype(np.int16))

    # response_format url: the URLs download the same pictures
    by_url = client.images.generate(
        model="shapes",
        prompt=PROMPT,
        n=2,
        size="256x256",
        response_format="url",
        extra_body={"seed": 5, "num_inference_steps": 3, "guidance_scale": 2.5},
    )
    for item, image in zip(by_url.data, expected, strict=True):
        assert item.url.startswith(f"{url}/v1/images/")
        r = httpx.get(item.url)
        assert r.status_code == 200 and r.headers["content-type"] == "image/png"
        assert_same_picture(pixels(r.content), np.asarray(image).astype(np.int16))

    assert [m.id for m in client.models.list().data] == ["shapes"]


def test_output_formats_and_ignored_openai_fields(served):
    url, _ = served
    for fmt, media, magic in (("jpeg", "image/jpeg", b"\xff\xd8"), ("webp", "image/webp", b"RIFF")):
        body = {"prompt": PROMPT, "num_inference_steps": 2, "output_format": fmt, "response_format": "url",
                "quality": "hd", "style": "vivid", "user": "someone"}  # fmt: skip
        r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert r.status_code == 200, r.text
        image = httpx.get(r.json()["data"][0]["url"])
        assert image.headers["content-type"] == media and image.content.startswith(magic)
        assert Image.open(io.BytesIO(image.content)).size == (256, 256)


def test_b64_answers_leave_nothing_behind_and_url_answers_stay(served):
    """Memory stays steady: images sent in the response body are not kept; URL images are, until they expire."""
    url, app = served
    engine = app.state.engine
    before = engine.stored_bytes
    body = {"prompt": PROMPT, "num_inference_steps": 2, "seed": 1}
    assert httpx.post(f"{url}/v1/images/generations", json=body, timeout=60).status_code == 200
    assert engine.stored_bytes == before
    r = httpx.post(f"{url}/v1/images/generations", json={**body, "response_format": "url"}, timeout=60)
    assert engine.stored_bytes > before and httpx.get(r.json()["data"][0]["url"]).status_code == 200


def test_the_server_draws_what_sana_generate_draws(served, tmp_path):
    url, _ = served
    out = tmp_path / "cli.png"
    code = sana_main(["generate", PROMPT, "--seed", "11", "--steps", "3", "--output", str(out), "--quiet"])
    assert code == 0
    r = httpx.post(
        f"{url}/v1/images/generations",
        json={"prompt": PROMPT, "seed": 11, "num_inference_steps": 3},  # the model's guidance and size
        timeout=60,
    )
    assert r.status_code == 200, r.text
    item = r.json()["data"][0]
    assert item["seed"] == 11
    assert_same_picture(pixels(base64.b64decode(item["b64_json"])), pixels(out.read_bytes()))


# ------------------------------------------------------------------------------------ malformed requests

GEN = "/v1/images/generations"
OK = {"prompt": PROMPT, "num_inference_steps": 2}

# (method, path, body: dict -> JSON, str -> raw text, None -> no body), expected status, the field (or a
# word the message must contain)
BAD = [
    ("POST", GEN, "this is not json", 400, "JSON"),
    ("POST", GEN, "[1, 2]", 400, "object"),
    ("POST", GEN, "", 400, "empty"),
    ("POST", GEN, '{"prompt": "x",', 400, "JSON"),
    ("POST", GEN, {"n": 1}, 400, "prompt"),
    ("POST", GEN, {"prompt": None}, 400, "prompt"),
    ("POST", GEN, {"prompt": 5}, 400, "prompt"),
    ("POST", GEN, {**OK, "n": 0}, 400, "n"),
    ("POST", GEN, {**OK, "n": 5}, 400, "n"),
    ("POST", GEN, {**OK, "n": "2"}, 400, "n"),
    ("POST", GEN, {**OK, "n": True}, 400, "n"),
    ("POST", GEN, {**OK, "n": 1.5}, 400, "n"),
    ("POST", GEN, {**OK, "size": "0x256"}, 400, "size"),
    ("POST", GEN, {**OK, "size": "100000x256"}, 400, "size"),
    ("POST", GEN, {**OK, "size": "250x256"}, 400, "size"),
    ("POST", GEN, {**OK, "size": "abc"}, 400, "size"),
    ("POST", GEN, {**OK, "size": 256}, 400, "size"),
    ("POST", GEN, {**OK, "num_inference_steps": 0}, 400, "num_inference_steps"),
    ("POST", GEN, {**OK, "num_inference_steps": 51}, 400, "num_inference_steps"),
    ("POST", GEN, '{"prompt": "x", "guidance_scale": NaN}', 400, "guidance_scale"),
    ("POST", GEN, '{"prompt": "x", "guidance_scale": Infinity}', 400, "guidance_scale"),
    ("POST", GEN, {**OK, "guidance_scale": "high"}, 400, "guidance_scale"),
    ("POST", GEN, '{"prompt": "x", "pag_scale": -Infinity}', 400, "pag_scale"),
    ("POST", GEN, {**OK, "pag_scale": -1}, 400, "pag_scale"),
    ("POST", GEN, {**OK, "output_format": "gif"}, 400, "output_format"),
    ("POST", GEN, {**OK, "response_format": "binary"}, 400, "response_format"),
    ("POST", GEN, {**OK, "sampler": "ddim"}, 400, "sampler"),
    ("POST", GEN, {**OK, "seed": -1}, 400, "seed"),
    ("POST", GEN, {**OK, "seed": "5"}, 400, "seed"),
    ("POST", GEN, {**OK, "seed": 2**70}, 400, "seed"),
    ("POST", GEN, {**OK, "negative_prompt": 3}, 400, "negative_prompt"),
    ("POST", GEN, {**OK, "num_steps": 3}, 400, "num_steps"),
    ("POST", GEN, {**OK, "model": "dall-e-3"}, 400, "model"),
    ("POST", GEN, {**OK, "stream": True}, 400, "stream"),
    ("POST", GEN, {"prompt": "x" * 5000}, 413, "larger"),
    ("POST", "/v1/jobs", {**OK, "size": "256x0"}, 400, "size"),
    ("GET", "/v1/nothing", None, 404, "route"),
    ("GET", GEN, None, 405, "method"),
    ("DELETE", "/v1/models", None, 405, "method"),
    ("GET", "/v1/jobs/0123456789abcdef", None, 404, "job"),
    ("GET", "/v1/jobs/0123456789abcdef/events", None, 404, "job"),
    ("GET", "/v1/images/nothing.png", None, 404, "image"),
    ("GET", "/v1/images/..%2F..%2Fetc%2Fpasswd", None, 404, "image"),
    ("GET", "/v1/models/dall-e-3", None, 404, "model"),
]
FIELDS = {"prompt", "n", "size", "num_inference_steps", "guidance_scale", "pag_scale", "output_format",
          "response_format", "sampler", "seed", "negative_prompt", "num_steps", "model", "stream"}  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status", "names"), BAD, ids=[f"{b[2]!s:.40}" for b in BAD])
def test_a_bad_request_gets_a_one_line_4xx_naming_the_field(served, method, path, body, status, names):
    url, _ = served
    if isinstance(body, dict):
        r = httpx.request(method, url + path, json=body)
    else:
        r = httpx.request(method, url + path, content=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) >= {"message", "type", "param"}
    message = error["message"]
    assert message and "\n" not in message and len(message) < 300, message
    assert names in message, message
    if names in FIELDS:
        assert error["param"] == names


def test_the_server_still_answers_after_bad_requests(served):
    url, app = served
    for method, path, body, _, _ in BAD[:10]:
        httpx.request(method, url + path, **({"json": body} if isinstance(body, dict) else {"content": body}))
    r = httpx.post(url + GEN, json={**OK, "seed": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["data"][0]["seed"] == 3
    assert app.state.engine.queue_depth == 0


def test_a_content_length_over_the_limit_is_refused_before_reading(served):
    url, _ = served
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 413")


# ---------------------------------------------------------------------------------------------- API key


def test_the_api_key_guards_every_route_but_the_open_ones(pipe):
    from openai import AuthenticationError, OpenAI

    from sana.server.app import create_app

    app = create_app(pipe, model_name="shapes", max_batch=2, max_queue=4, api_key="s3cret")
    with running(app) as url:
        assert httpx.get(f"{url}/health").status_code == 200
        assert httpx.get(f"{url}/v1/config").json()["auth"] is True
        wrong = (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": "s3cret"},
            {"Authorization": "Basic s3cret"},
        )
        for headers in wrong:
            for method, path in (
                ("GET", "/v1/models"),
                ("GET", "/metrics"),
                ("POST", GEN),
                ("GET", "/v1/nothing"),
            ):
                r = httpx.request(method, url + path, headers=headers, json=OK)
                assert r.status_code == 401, (method, path, headers)
                assert r.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{url}/v1/models", headers=good).json()["data"][0]["id"] == "shapes"
        assert httpx.get(f"{url}/metrics", headers=good).status_code == 200

        with pytest.raises(AuthenticationError):
            OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")
        client = OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        result = client.images.generate(prompt=PROMPT, extra_body={"num_inference_steps": 2})
        assert len(result.data) == 1 and result.data[0].b64_json
        metrics = httpx.get(f"{url}/metrics", headers=good).text
        assert metric(metrics, "sana_errors_total", kind="auth") == 17


# ------------------------------------------------------------------------------------------------ jobs


def test_a_job_streams_queued_running_progress_done(served):
    url, _ = served
    r = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "n": 2, "seed": 9, "num_inference_steps": 4})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] in ("queued", "running") and job["seeds"] == [9, 10]
    with httpx.stream("GET", job["events_url"], timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = list(sse(response))
    kinds = [kind for kind, _ in events]
    assert kinds[0] == "queued" and "position" in events[0][1]
    assert kinds[kinds.index("running") :] == ["running"] + ["progress"] * 4 + ["done"], kinds
    assert [data["step"] for kind, data in events if kind == "progress"] == [1, 2, 3, 4]
    done = events[-1][1]
    assert done["seeds"] == [9, 10] and len(done["images"]) == 2
    for image_url in done["images"]:
        got = httpx.get(image_url)
        assert got.status_code == 200 and Image.open(io.BytesIO(got.content)).size == (256, 256)
    state = httpx.get(job["url"]).json()
    assert state["status"] == "done" and state["images"] == done["images"]

    # a late subscriber sees the whole story too
    with httpx.stream("GET", job["events_url"], timeout=60) as response:
        assert [kind for kind, _ in sse(response)] == kinds


def test_delete_cancels_a_queued_job(served, gate):
    url, app = served
    first = httpx.post(f"{url}/v1/jobs", json={**OK, "size": "256x512"}).json()
    wait_for(lambda: app.state.engine.get(first["id"]).status == "running", what="the first job to run")
    second = httpx.post(f"{url}/v1/jobs", json=OK).json()
    assert second["status"] == "queued"
    r = httpx.delete(second["url"])
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    with httpx.stream("GET", second["events_url"], timeout=30) as response:
        assert [kind for kind, _ in sse(response)] == ["queued", "cancelled"]
    gate.set()
    with httpx.stream("GET", first["events_url"], timeout=60) as response:
        assert [kind for kind, _ in sse(response)][-1] == "done"


def test_a_client_that_goes_away_cancels_its_job(served, gate):
    url, app = served
    before = metric(httpx.get(f"{url}/metrics").text, "sana_errors_total", kind="disconnected")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}{GEN}", json={**OK, "prompt": "gone"}, timeout=1.0)
    engine = app.state.engine
    wait_for(
        lambda: metric(httpx.get(f"{url}/metrics").text, "sana_errors_total", kind="disconnected") == before + 1,
        what="the disconnect to be noticed",
    )
    jobs = [job for job in engine._jobs.values() if job.images[0].prompt == "gone"]
    assert [job.status for job in jobs] == ["cancelled"]
    gate.set()
    r = httpx.post(f"{url}{GEN}", json=OK, timeout=60)
    assert r.status_code == 200


def test_a_full_queue_answers_429_with_retry_after(pipe, gate):
    from sana.server.app import create_app

    app = create_app(pipe, model_name="shapes", max_batch=1, max_queue=2)
    with running(app) as url:
        first = httpx.post(f"{url}/v1/jobs", json=OK).json()
        wait_for(lambda: app.state.engine.get(first["id"]).status == "running", what="the first job to run")
        assert httpx.post(f"{url}/v1/jobs", json={**OK, "n": 2}).status_code == 202
        r = httpx.post(f"{url}{GEN}", json=OK)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and "queue" in r.json()["error"]["message"]
        assert httpx.get(f"{url}/v1/config").json()["limits"]["max_images"] == 2  # capped by the queue
        metrics = httpx.get(f"{url}/metrics").text
        assert metric(metrics, "sana_queue_depth") == 2
        assert metric(metrics, "sana_errors_total", kind="queue_full") == 1
        gate.set()
        wait_for(lambda: app.state.engine.queue_depth == 0, what="the queue to drain")


# --------------------------------------------------------------------------------------------- metrics


def test_metrics_count_batches_images_latency_and_errors(pipe):
    from sana.server.app import create_app

    app = create_app(pipe, model_name="shapes", max_batch=4, max_queue=8)
    with running(app) as url:
        assert httpx.post(f"{url}{GEN}", json={**OK, "n": 3}, timeout=60).status_code == 200
        assert httpx.post(f"{url}{GEN}", json={**OK, "n": 0}).status_code == 400
        assert httpx.get(f"{url}/nothing").status_code == 404
        r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert metric(text, "sana_queue_depth") == 0
    assert metric(text, "sana_batch_size_count") == 1 and metric(text, "sana_batch_size_sum") == 3
    assert metric(text, "sana_batch_seconds_sum") > 0
    assert metric(text, "sana_images_total") == 3
    assert metric(text, "sana_errors_total", kind="validation") == 1
    assert metric(text, "sana_errors_total", kind="not_found") == 1
    assert metric(text, "sana_errors_total", kind="internal") == 0
    assert metric(text, "sana_request_seconds_count", route=GEN, method="POST") == 2
    assert metric(text, "sana_requests_total", route=GEN, status="200") == 1


def test_the_page_and_its_files_are_served(served):
    url, _ = served
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for name in re.findall(r'(?:src|href)="/?(static/[^"]+)"', page.text):
        assert httpx.get(f"{url}/{name}").status_code == 200, name


# --------------------------------------------------------------------------------------- the command


def test_sigterm_lets_the_running_job_finish_and_exits_0():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("SANA_API_KEY", None)
    cmd = [sys.executable, "-m", "sana", "serve", "--port", "0", "--max-steps", "400", "--model-name", "shapes"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        line = lines.get(timeout=120)
        match = re.fullmatch(r"sana serve: (http://127\.0\.0\.1:\d+) \(model shapes\)\n", line)
        assert match, line
        url = match[1]
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "num_inference_steps": 300}).json()
        kinds = []
        with httpx.stream("GET", job["events_url"], timeout=120) as response:
            for kind, data in sse(response):
                kinds.append(kind)
                if kind == "progress" and data["step"] == 1:
                    proc.send_signal(signal.SIGTERM)
                    refused = False  # no new connections while the job finishes
                    deadline = time.monotonic() + 5
                    while not refused and time.monotonic() < deadline:
                        try:
                            httpx.get(f"{url}/health", timeout=2)
                            time.sleep(0.05)
                        except httpx.TransportError:
                            refused = True
                    assert refused, "the server still accepts connections 5 s after SIGTERM"
        assert kinds[-1] == "done", kinds
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
