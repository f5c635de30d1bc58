"""`sana serve` under load: dynamic batching against one image per batch and against the pipeline called directly.

Three measurements in one run, on the shipped model at 256x256 with its default settings (20 Flow-DPM-Solver
steps, guidance 2.5), float32 on this machine's CPU:
  * direct     the pipeline called in-process with batches of 8 images (per-image seeds): the ceiling;
  * batch 8    `sana serve --max-batch 8` in its own process, 16 concurrent clients each sending one-image
               OpenAI requests (`POST /v1/images/generations`) until the request count is reached;
  * batch 1    the same with `--max-batch 1`.
Reported: images/s, p50 and p95 request latency (client side, from send to the full response), and the ratios
the issue sets as goals (batch 8 >= 90 % of direct, >= 1.8 x batch 1).

Memory steadiness: a further server process (`--max-batch 8`) answers 1,000 requests at 2 steps (to keep the
run short; memory per request does not depend on the step count); its RSS after request 100 and after
request 1,000 are compared (goal: within 10 %).

Run: `python benchmarks/bench_serve.py [--requests N] [--memory-requests N] [--no-write]`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import io
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import psutil
import torch
from docs_section import write_section
from PIL import Image

from sana.pipeline import SanaPipeline
from sana.pretrained import shipped_model

CLIENTS = 16
SIZE = 256
PROMPTS = (
    "a red circle above a blue square",
    "two green triangles",
    "a small yellow star left of a purple circle",
    "three orange squares",
)


@dataclass
class Load:
    name: str
    images: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.images / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(*flags: str) -> Iterator[tuple[str, psutil.Process]]:
    """`sana serve` in its own process on a free port, ready when /health answers."""
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "sana", "serve", "--port", str(port), *flags]
    # Its log goes to a file: a pipe nobody reads fills up and blocks the server's access log.
    log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in the finally below)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"sana serve exited: {log.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("sana serve did not become healthy in 120 s")
            time.sleep(0.2)
        yield url, psutil.Process(proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def load(url: str, name: str, requests: int, steps: int | None = None, on_done=None) -> Load:
    """CLIENTS threads sending one-image requests until `requests` have been answered."""
    lock = threading.Lock()
    counter = iter(range(requests))
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"prompt": PROMPTS[i % len(PROMPTS)], "size": f"{SIZE}x{SIZE}", "seed": i}
                if steps is not None:
                    body["num_inference_steps"] = steps
                start = time.perf_counter()
                try:
                    r = http.post(f"{url}/v1/images/generations", json=body)
                    failure = None if r.status_code == 200 else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    failure = f"{type(e).__name__}: {e}"
                elapsed = time.perf_counter() - start
                with lock:
                    if failure is not None:
                        errors.append(failure)
                    latencies.append(elapsed)
                    if on_done is not None:
                        on_done(len(latencies))

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{name}: {len(errors)} failed requests, e.g. {errors[0]}")
    return Load(name, requests, seconds, latencies)


def direct(requests: int) -> Load:
    """The pipeline in this process, batches of 8 one-prompt images with per-image seeds."""
    pipe = SanaPipeline.from_pretrained(shipped_model())
    pipe(PROMPTS[0], seed=[0])  # warm-up
    latencies = []
    start = time.perf_counter()
    for first in range(0, requests, 8):
        idx = list(range(first, min(first + 8, requests)))
        t = time.perf_counter()
        pipe([PROMPTS[i % len(PROMPTS)] for i in idx], seed=idx, height=SIZE, width=SIZE)
        latencies += [time.perf_counter() - t] * len(idx)
    return Load("direct, batches of 8", requests, time.perf_counter() - start, latencies)


def check_equal_to_direct(url: str) -> int:
    """Largest pixel difference between a served image and the same image from the pipeline (a sanity check)."""
    pipe = SanaPipeline.from_pretrained(shipped_model())
    r = httpx.post(
        f"{url}/v1/images/generations", json={"prompt": PROMPTS[1], "seed": 7, "size": "256x256"}, timeout=600
    )
    served = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))).convert("RGB")
    ours = pipe(PROMPTS[1], seed=[7])[0].convert("RGB")
    diff = np.abs(np.asarray(served, dtype=np.int16) - np.asarray(ours, dtype=np.int16))
    return int(diff.max())


def memory(requests: int) -> tuple[float, float]:
    """RSS of a server process after 100 and after `requests` requests (MiB)."""
    marks: dict[int, float] = {}
    with server("--max-batch", "8") as (url, proc):

        def on_done(count: int) -> None:
            if count in (100, requests):
                marks[count] = proc.memory_info().rss / 2**20

        load(url, "memory", requests, steps=2, on_done=on_done)
        time.sleep(0.5)
        marks[requests] = proc.memory_info().rss / 2**20
    return marks[100], marks[requests]


def report(loads: list[Load], rss: tuple[float, float], memory_requests: int, max_diff: int) -> str:
    by = {load.name: load for load in loads}
    d, b8, b1 = by["direct, batches of 8"], by["server, --max-batch 8"], by["server, --max-batch 1"]
    rows = "\n".join(
        f"| {x.name} | {x.images} | {x.rate:.2f} | {x.percentile(0.5):.2f} | {x.percentile(0.95):.2f} |"
        for x in (d, b8, b1)
    )
    machine = f"{platform.processor() or platform.machine()}, {psutil.cpu_count()} cores"
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    return f"""## Serving (`benchmarks/bench_serve.py`)

{datetime.date.today()}; {machine}, {versions}.
The shipped model, {SIZE}x{SIZE}, its defaults (20 Flow-DPM-Solver steps, guidance 2.5), float32 on the CPU;
{CLIENTS} concurrent clients each sending one-image OpenAI requests to `sana serve` in its own process.
Latency is the client's, from sending a request to its full response (the direct row: the batch's time).

| run | images | images/s | p50 latency (s) | p95 latency (s) |
|---|---:|---:|---:|---:|
{rows}

Batching: the server with `--max-batch 8` reaches **{b8.rate / d.rate:.0%}** of the direct call's images/s
(goal >= 90 %) and **{b8.rate / b1.rate:.2f} x** the `--max-batch 1` server's (goal >= 1.8 x). A served image
against the same image from the pipeline: largest difference {max_diff} levels.

Memory: the server's RSS was {rss[0]:.0f} MiB after 100 requests and {rss[1]:.0f} MiB after {memory_requests}
(2-step requests), **{(rss[1] / rss[0] - 1):+.1%}** (goal: within 10 %).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=200, help="requests per throughput run")
    p.add_argument("--memory-requests", type=int, default=1000, help="requests of the memory run")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = p.parse_args()
    loads = [direct(args.requests)]
    print(f"direct: {loads[-1].rate:.2f} images/s", flush=True)
    for batch in (8, 1):
        with server("--max-batch", str(batch)) as (url, _):
            load(url, "warm-up", CLIENTS)
            loads.append(load(url, f"server, --max-batch {batch}", args.requests))
            print(f"batch {batch}: {loads[-1].rate:.2f} images/s", flush=True)
            if batch == 8:
                max_diff = check_equal_to_direct(url)
    rss = memory(args.memory_requests)
    print(f"RSS {rss[0]:.0f} -> {rss[1]:.0f} MiB", flush=True)
    text = report(loads, rss, args.memory_requests, max_diff)
    print(text)
    if not args.no_write:
        print(f"wrote {write_section('bench_serve', text)}")


if __name__ == "__main__":
    main()
