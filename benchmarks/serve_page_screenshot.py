"""docs/serve_page.png: the page of `sana serve` after a few generations, in Debian's headless Chromium.

The real app (sana/server/app.py) under uvicorn on a free port with the shipped model at its defaults; three
prompts typed into the page and generated (Enter), two images for the last; then a larger job started and the
screenshot (1000 px wide) taken while its progress bar moves; that job is then cancelled from the page.

Run: `python benchmarks/serve_page_screenshot.py [--out docs/serve_page.png]` (needs /usr/bin/chromium).
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from sana.pipeline import SanaPipeline
from sana.pretrained import shipped_model
from sana.server.app import create_app

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PROMPTS = (
    ("a red circle above a blue square", 1, 7),
    ("two green triangles", 1, 11),
    ("a small yellow star left of a purple circle", 2, 3),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/serve_page.png"))
    args = parser.parse_args()

    pipe = SanaPipeline.from_pretrained(shipped_model())
    app = create_app(pipe, model_name="shapes", max_batch=4, max_queue=16, max_side=1024)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body[data-ready='true']")
            expected = 0
            for prompt, n, seed in PROMPTS:
                page.fill("#n", str(n))
                page.fill("#seed", str(seed))
                page.fill("#prompt", prompt)
                page.press("#prompt", "Enter")
                expected += n
                page.wait_for_function(
                    """(n) => [...document.querySelectorAll('#gallery img')]
                        .filter((i) => i.complete && i.naturalWidth > 0).length >= n""",
                    arg=expected,
                    timeout=120_000,
                )
            page.fill("#n", "1")
            page.select_option("#preset", "512x512")
            page.fill("#steps", "60")
            page.fill("#prompt", "three orange squares")
            page.press("#prompt", "Enter")
            page.wait_for_function(
                """() => /step ([5-9]|\\d\\d)\\//.test(document.querySelector('.job-status')?.textContent)""",
                timeout=120_000,
            )
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out), full_page=True)
            page.click("#jobs .cancel")
            page.wait_for_selector("#jobs .job.cancelled", timeout=60_000)
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
