"""The pack in a real ComfyUI: a headless server on 127.0.0.1 with the pack linked into a temporary
--base-directory (nothing of the user's installation is touched), the example workflows queued through
POST /prompt, the pictures read back through /history and /view and compared with `sana generate`'s.

Runs when COMFYUI_DIR names a ComfyUI folder (and COMFYUI_PYTHON the Python to start it with, default: this
one); that Python must import `sana` (see docs/comfyui.md). Otherwise every test here is skipped, saying so.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.comfyui.support import (
    PROMPT,
    example_image,
    load_workflow,
    random_lora,
    shipped,
    sprint_folder,
    tiny_4k_folder,
)

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
PACK = Path(__file__).resolve().parents[2] / "comfyui"

pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR or not (Path(COMFYUI_DIR) / "main.py").is_file(),
    reason="not run: set COMFYUI_DIR to a ComfyUI folder (and COMFYUI_PYTHON to its Python) to test the pack in "
    "a real ComfyUI",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ComfyUI process and the few HTTP calls the tests make."""

    def __init__(self, base: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(base / "comfyui.log", "w")  # noqa: SIM115 (closed in stop)
        command = [COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port)]
        command += ["--disable-auto-launch", "--base-directory", str(base)]
        self.process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)
        self.log_path = base / "comfyui.log"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited at start:\n{self.log_path.read_text()[-3000:]}")
            try:
                self.get("/object_info/SanaSampler")
                return
            except (urllib.error.URLError, ConnectionError, KeyError):
                time.sleep(1)
        raise RuntimeError(f"ComfyUI did not offer SanaSampler in 180 s:\n{self.log_path.read_text()[-3000:]}")

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = json.loads(r.read())
        if path.startswith("/object_info/") and path.rsplit("/", 1)[1] not in data:
            raise KeyError(path)
        return data

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        request = urllib.request.Request(
            self.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                text = r.read()
                return r.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def queue(self, api: dict) -> str:
        status, answer = self.post("/prompt", {"prompt": api, "client_id": "sana-tests"})
        assert status == 200, answer
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 900) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]  # finished, with success or not
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} not done in {timeout} s")

    def run(self, api: dict) -> dict:
        entry = self.wait(self.queue(api))
        if entry["status"]["status_str"] != "success":
            errors = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
            detail = [
                (e.get("node_type"), e.get("exception_message"), e.get("traceback", [])[-3:]) for e in errors
            ]
            raise AssertionError(f"ComfyUI failed: {detail}\n{self.log_path.read_text()[-2000:]}")
        return entry

    def picture(self, entry: dict, node: str) -> np.ndarray:
        image = entry["outputs"][node]["images"][0]
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=30) as r:
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"))

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The server's base directory: custom_nodes/ with the pack linked in, models, an input picture, a LoRA."""
    from sana.pipeline import SanaPipeline

    base = tmp_path_factory.mktemp("comfyui-base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "comfyui-sana").symlink_to(PACK, target_is_directory=True)
    (base / "input").mkdir()
    example_image(base / "input" / "sana_example.png")
    models = base / "models"
    tiny_4k_folder(models / "sana" / "tiny-4k")
    sprint_folder(models / "sana" / "tiny-sprint")
    transformer = SanaPipeline.from_pretrained(shipped()).transformer
    lora = random_lora(transformer, models / "loras" / "tmp", seed=1, std=1.0)
    shutil.move(lora, models / "loras" / "sana_example_lora.safetensors")
    return base


@pytest.fixture(scope="module")
def server(base):
    server = Server(base)
    yield server
    server.stop()


def generate(tmp_path: Path, *args: str) -> np.ndarray:
    out = tmp_path / f"generate-{len(list(tmp_path.glob('generate-*')))}.png"
    command = [sys.executable, "-m", "sana", "generate", PROMPT, "--seed", "0", "--quiet", "-o", str(out), *args]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return np.asarray(Image.open(out).convert("RGB"))


def same_picture(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    diff = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    print(f"{ours.shape[1]}x{ours.shape[0]}: max diff {diff.max()}, within 2 levels {(diff <= 2).mean():.4%}")
    assert (diff <= 2).mean() >= 0.999, f"max diff {diff.max()}, share > 2: {(diff > 2).mean():.4%}"


def cached_nodes(entry: dict) -> set[str]:
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def with_model(api: dict, folder: Path) -> dict:
    api["1"]["inputs"].update(model_path=str(folder), dtype="fp32")
    return api


def test_comfyui_version(server, record_property):
    stats = server.get("/system_stats")
    record_property("comfyui_version", stats["system"]["comfyui_version"])
    info = server.get("/object_info")
    assert {"SanaModelLoader", "SanaSampler", "SanaLoraLoader", "SanaVAEDecode", "SanaVAEEncode"} <= set(info)
    print(f"ComfyUI {stats['system']['comfyui_version']}, Python {stats['system']['python_version'].split()[0]}")


def test_text_to_image_equals_sana_generate_and_the_model_stays_loaded(server, tmp_path):
    first = server.run(load_workflow("text_to_image"))
    same_picture(server.picture(first, "7"), generate(tmp_path, "--sampler", "dpm"))
    api = load_workflow("text_to_image")
    api["5"]["inputs"]["seed"] = 1  # a new picture from the same loaded model: the loader is not run again
    second = server.run(api)
    assert "1" in cached_nodes(second) and "5" not in cached_nodes(second)
    same_picture(server.picture(second, "7"), generate(tmp_path, "--sampler", "dpm", "--seed", "1"))
    # "Free model and node cache": the loader's output (the model) is dropped, the next run loads it again.
    assert server.post("/free", {"unload_models": True, "free_memory": True})[0] == 200
    time.sleep(2)  # the worker applies the flags between prompts
    third = server.run(api)
    assert "1" not in cached_nodes(third)


def test_4k_workflow(server, base, tmp_path):
    folder = base / "models" / "sana" / "tiny-4k"
    entry = server.run(with_model(load_workflow("4k"), folder))
    ref = generate(tmp_path, "--model", str(folder), "--steps", "20", "--guidance", "4.5", "--sampler", "dpm",
                   "--height", "4096", "--width", "4096")  # fmt: skip
    same_picture(server.picture(entry, "7"), ref)


def test_sprint_workflow(server, base, tmp_path):
    folder = base / "models" / "sana" / "tiny-sprint"
    entry = server.run(with_model(load_workflow("sprint_2_steps"), folder))
    ref = generate(tmp_path, "--model", str(folder), "--steps", "2", "--guidance", "4.5", "--sampler", "scm",
                   "--height", "1024", "--width", "1024")  # fmt: skip
    same_picture(server.picture(entry, "7"), ref)


def test_img2img_workflow(server, base, tmp_path):
    entry = server.run(load_workflow("img2img"))
    ref = generate(tmp_path, "--image", str(base / "input" / "sana_example.png"), "--strength", "0.6",
                   "--sampler", "dpm")  # fmt: skip
    same_picture(server.picture(entry, "7"), ref)


def test_lora_workflow(server, base, tmp_path):
    entry = server.run(load_workflow("lora"))
    lora = base / "models" / "loras" / "sana_example_lora.safetensors"
    same_picture(server.picture(entry, "7"), generate(tmp_path, "--lora", str(lora), "--sampler", "dpm"))
    same_picture(server.picture(entry, "11"), generate(tmp_path, "--sampler", "dpm"))


@pytest.mark.parametrize(
    ("node", "field", "value", "message"),
    [
        ("5", "steps", 0, "Value 0 smaller than min of 1"),
        ("4", "width", 1000, "width must be a positive multiple of 32, got 1000"),
        ("1", "model_path", "/no/such/folder", "no such model folder: /no/such/folder"),
    ],
)
def test_bad_values_fail_validation_on_their_node(server, node, field, value, message):
    api = load_workflow("text_to_image")
    api[node]["inputs"][field] = value
    status, answer = server.post("/prompt", {"prompt": api})
    assert status == 400
    errors = answer["node_errors"][node]["errors"]
    assert any(message in e["details"] or message in e["message"] for e in errors), errors


def test_interrupt_stops_sampling(server):
    api = load_workflow("text_to_image")
    api["5"]["inputs"].update(steps=1000, seed=7)
    prompt_id = server.queue(api)
    time.sleep(3)  # inside the sampler's steps (the model is loaded; 1000 steps take minutes)
    assert server.post("/interrupt", {})[0] == 200
    entry = server.wait(prompt_id, timeout=120)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds, kinds


MEMORY_SCRIPT = """
import importlib.util, os, sys
import torch
import comfy.options

comfy.options.enable_args_parsing()  # read --cpu as ComfyUI's main.py does
sys.argv = [sys.argv[0], "--cpu"]
import comfy.model_management as mm  # noqa: E402

pack_dir, model_dir = os.environ["SANA_PACK"], os.environ["SANA_MODEL"]

spec = importlib.util.spec_from_file_location("sana_pack", pack_dir + "/__init__.py",
                                              submodule_search_locations=[pack_dir])
pack = importlib.util.module_from_spec(spec)
sys.modules["sana_pack"] = pack
spec.loader.exec_module(pack)
nodes = pack.NODE_CLASS_MAPPINGS
with torch.inference_mode():
    model = nodes["SanaModelLoader"]().load(model_dir)[0]
    patchers = model.patchers
    assert set(patchers) == {"transformer", "vae", "text_encoder"}, patchers
    cond = nodes["SanaTextEncode"]().encode(model, "a cat")[0]
    assert patchers["text_encoder"] in mm.loaded_models()
    latent = nodes["SanaEmptyLatent"]().generate(64, 64, 1, model=model)[0]
    out = nodes["SanaSampler"]().sample(model, cond, cond, latent, 0, 2, 4.5, "flow_euler", 1.0)[0]
    assert patchers["transformer"] in mm.loaded_models()
    mm.unload_all_models()  # what "Unload Models" and another model's need do
    assert not any(p in mm.loaded_models() for p in patchers.values())
    nodes["SanaVAEDecode"]().decode(model, out)  # the next use loads it again
    assert patchers["vae"] in mm.loaded_models()
print("registered, unloaded, reloaded")
"""


def test_models_are_registered_with_comfyui_memory_manager(tmp_path):
    """With ComfyUI's own model_management and ModelPatcher (imported from COMFYUI_DIR in its Python)."""
    from tests.comfyui.support import tiny_folder

    folder = tiny_folder(tmp_path / "tiny")
    result = subprocess.run(
        [COMFYUI_PYTHON, "-c", MEMORY_SCRIPT],
        cwd=COMFYUI_DIR,
        env={**os.environ, "SANA_PACK": str(PACK), "SANA_MODEL": str(folder)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered, unloaded, reloaded" in result.stdout
