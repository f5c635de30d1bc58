"""The page of `sana serve` in a real headless Chromium (Debian's `chromium`, driven by Playwright).

The real app under uvicorn on a free port, the shipped model at its native 256x256: the form's defaults come
from the model, a prompt typed and Enter pressed ends in a gallery image that is the API's image (and the
pipeline's) for the same seed, and bad settings show the server's message in the page.
"""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urljoin

import httpx
import numpy as np
import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PROMPT = "a red circle above a blue square"
SEED = 42
STEPS = 3
TIMEOUT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def pipe():
    from sana.pipeline import SanaPipeline
    from sana.pretrained import shipped_model

    return SanaPipeline.from_pretrained(shipped_model())


@contextlib.contextmanager
def _serve(pipe, **options):
    """The real app under uvicorn in a background thread on a free port; yields its base URL."""
    import uvicorn

    from sana.server.app import create_app

    app = create_app(pipe, model_name="shapes", max_batch=4, max_queue=16, **options)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped while starting"
        assert time.monotonic() < deadline, "uvicorn did not start within 30 s"
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def base_url(pipe):
    with _serve(pipe) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium package "
            "(apt-get install -y --no-install-recommends chromium); .ci/run does this on CI",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def _open(browser, url):
    """A fresh browser context on the page at `url`, once it has read /v1/config; no JavaScript errors."""
    context = browser.new_context(viewport={"width": 1000, "height": 800})
    page = context.new_page()
    js_errors: list[str] = []
    page.on("pageerror", lambda e: js_errors.append(str(e)))
    page.goto(url + "/")
    page.wait_for_selector("body[data-ready='true']", timeout=TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()
    assert not js_errors, f"JavaScript errors on the page: {js_errors}"


@pytest.fixture
def page(browser, base_url):
    with _open(browser, base_url) as page:
        yield page


def _wait_for_image(page):
    page.wait_for_function(
        """() => {
            const img = document.querySelector('#gallery figure img');
            return img && img.complete && img.naturalWidth > 0;
        }""",
        timeout=TIMEOUT_MS,
    )


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _assert_same(a: np.ndarray, b: np.ndarray, what: str) -> None:
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}"
    close = (np.abs(a - b) <= 2).all(axis=-1).mean()
    assert close >= 0.999, f"{what}: only {close:.4%} of pixels within 2 levels"


def test_page_serves_its_own_assets(base_url):
    html = httpx.get(base_url + "/").text
    assert "<form" in html
    for asset in ("/static/app.js", "/static/style.css"):
        assert asset in html
        assert httpx.get(base_url + asset).status_code == 200
    # Offline: nothing is loaded from another origin.
    for text in (
        html,
        httpx.get(base_url + "/static/app.js").text,
        httpx.get(base_url + "/static/style.css").text,
    ):
        assert "http://" not in text and "https://" not in text


def test_generate_from_the_page_matches_the_api(page, pipe, base_url):
    # Defaults are the served model's own.
    assert page.input_value("#size") == "256x256"
    assert int(page.input_value("#steps")) == pipe.scheduler.steps
    assert float(page.input_value("#guidance")) == pytest.approx(pipe.scheduler.guidance_scale)
    assert page.input_value("#sampler") == pipe.scheduler.sampler
    assert page.input_value("#n") == "1"
    seed_before = page.input_value("#seed")
    page.click("#randomise")
    assert page.input_value("#seed").isdigit()
    assert seed_before.isdigit()

    page.fill("#steps", str(STEPS))
    page.fill("#seed", str(SEED))
    page.fill("#prompt", PROMPT)
    # Record every job card's progress bar and status line as they come (the job may finish within a frame).
    page.evaluate(
        """() => {
            window.seen = {bars: 0, statuses: []};
            new MutationObserver((records) => {
                for (const r of records) for (const n of r.addedNodes) {
                    if (n.nodeType !== 1 && n.parentElement && n.parentElement.matches('.job-status'))
                        window.seen.statuses.push(n.data);
                    if (n.nodeType === 1) window.seen.bars += n.querySelectorAll('progress.progress').length;
                }
            }).observe(document.getElementById('jobs'), {childList: true, subtree: true});
        }"""
    )
    page.press("#prompt", "Enter")

    _wait_for_image(page)
    seen = page.evaluate("window.seen")
    assert seen["bars"] >= 1, "no progress bar was shown for the job"
    assert any(s.startswith("step ") for s in seen["statuses"]), f"no step progress shown: {seen['statuses']}"
    assert page.locator("#jobs .job").count() == 0, "the finished job's progress bar is still there"
    figure = page.locator("#gallery figure").first
    assert figure.locator("[data-param='seed']").inner_text() == str(SEED)
    assert figure.locator("[data-param='steps']").inner_text() == str(STEPS)
    assert figure.locator("[data-param='size']").inner_text() == "256×256"
    assert PROMPT in figure.inner_text()
    assert page.locator("#error").is_hidden()

    link = figure.locator("a[download]")
    href = link.get_attribute("href")
    assert href, "the download link has no URL"
    from_page = _pixels(httpx.get(urljoin(base_url + "/", href), timeout=30).raise_for_status().content)

    response = httpx.post(
        base_url + "/v1/images/generations",
        json={
            "prompt": PROMPT,
            "n": 1,
            "size": "256x256",
            "num_inference_steps": STEPS,
            "guidance_scale": pipe.scheduler.guidance_scale,
            "seed": SEED,
            "response_format": "b64_json",
        },
        timeout=60,
    )
    response.raise_for_status()
    from_api = _pixels(base64.b64decode(response.json()["data"][0]["b64_json"]))
    direct = np.asarray(pipe(PROMPT, seed=[SEED], steps=STEPS)[0].convert("RGB"), dtype=np.int16)

    assert from_page.shape == (256, 256, 3)
    _assert_same(from_page, from_api, "page vs API")
    _assert_same(from_page, direct, "page vs pipeline")


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [("#steps", "0", "steps"), ("#size", "250x250", "32")],
    ids=["steps-0", "size-not-multiple-of-32"],
)
def test_bad_setting_shows_a_message(page, field, value, expected):
    page.fill("#prompt", PROMPT)
    page.fill(field, value)
    page.click("#generate")
    error = page.locator("#error")
    error.wait_for(state="visible", timeout=TIMEOUT_MS)
    text = error.inner_text()
    assert expected in text, f"unexpected message for {field}={value}: {text!r}"
    assert page.get_attribute(field, "aria-invalid") == "true"
    assert page.locator("#gallery figure").count() == 0
    assert page.locator("#jobs .job").count() == 0


def test_api_key(browser, pipe):
    """With a key, the page asks for it: without it the server's 401 shows; with it the image comes."""
    with _serve(pipe, api_key="page-secret") as url, _open(browser, url) as page:
        assert page.is_visible("#apikey")
        page.fill("#steps", "2")
        page.fill("#prompt", PROMPT)
        page.press("#prompt", "Enter")
        page.locator("#error").wait_for(state="visible", timeout=TIMEOUT_MS)
        assert "API key" in page.inner_text("#error")

        page.fill("#apikey", "page-secret")
        page.press("#prompt", "Enter")
        _wait_for_image(page)
        assert page.locator("#error").is_hidden()
