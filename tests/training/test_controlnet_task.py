"""task: controlnet on the tiny random model: the ControlNet learns what its control latent tells (the loss on a
fixed batch falls far below the frozen base's), the base stays bit for bit what was loaded, resume is exact, the
export is a folder diffusers loads (its SanaControlNetModel, and the whole SanaControlNetPipeline), control images
come from a manifest or from `sana cache --control edges`, and bad configs fail in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sana.cli.main import main
from sana.config import ConfigError
from sana.errors import UserError
from sana.flow import dit_timesteps, flow_loss, interpolate, velocity_target
from sana.models.controlnet import SanaControlNet
from sana.models.dit import SanaDiT
from sana.pretrained import save_components
from sana.tiny import TINY_TEXT_HIDDEN, tiny_components
from sana.training import train
from sana.training.distributed import init_distributed
from sana.training.loop import finish, run_loop, setup
from sana.training.tasks import train_config_from_dict
from sana.types import Conditioning, TextEmbeddings
from sana.weights import load_model
from tests.training.test_distributed import REPO, _free_port
from tests.training.test_loop import one_thread  # noqa: F401 (fixture)

# ------------------------------------------------------------------------------------------------- helpers


class ControlData:
    """n cached samples for the tiny model (4 latent channels, 8x8; captions TINY_TEXT_HIDDEN wide) with control
    latents, following the sana.data loader contract (infinite, rank slots of each global batch, per-epoch
    permutation seeded by (seed, epoch), state_dict for resume). The control latent is the sign pattern of the
    sample's latent: it tells where the clean latent is positive, which the caption does not."""

    def __init__(self, *, seed: int, rank: int, world_size: int, n: int = 8, batch_size: int = 2) -> None:
        g = torch.Generator().manual_seed(1234)
        self.latents = torch.randn(n, 4, 8, 8, generator=g)
        self.control = torch.sign(self.latents)
        self.hidden = torch.randn(n, 5, TINY_TEXT_HIDDEN, generator=g)
        self.mask = (torch.arange(5)[None] < torch.randint(1, 6, (n,), generator=g)[:, None]).long()
        self.null_text = TextEmbeddings(
            torch.randn(1, 3, TINY_TEXT_HIDDEN, generator=g), torch.tensor([[1, 0, 0]])
        )
        self.n, self.b, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.per_epoch = n // (batch_size * world_size)
        self.epoch = self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self):
        while True:
            if self.position >= self.per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
            start = self.position * self.b * self.world + self.rank * self.b
            rows = order[start : start + self.b]
            self.position += 1
            yield {
                "latents": self.latents[rows],
                "control_latents": self.control[rows],
                "text_hidden": self.hidden[rows],
                "text_mask": self.mask[rows],
                "keys": [str(int(r)) for r in rows],
            }


def data(n: int = 8, batch_size: int = 2):
    return lambda **kw: ControlData(n=n, batch_size=batch_size, **kw)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A whole tiny model folder (2-block DiT); its transformer is the frozen base."""
    return save_components(tiny_components(seed=3), tmp_path_factory.mktemp("tiny") / "model")


def config(base: Path, run_dir: Path, **extra) -> dict:
    cfg = {
        "task": "controlnet",
        "run_dir": str(run_dir),
        "max_steps": 4,
        "device": "cpu",
        "model": {"base": str(base), "num_layers": 1},
        "optim": {"lr": 3e-3},
        "ema": {"decay": 0.9},
        "flow": {"caption_dropout": 0.3},
        "checkpoint": {"every": 2},
        "logging": {"progress": False, "tensorboard": False, "plot": False},
    }
    for key, value in extra.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg.get(key), dict) else value
    return cfg


def fixed_loss(dit: SanaDiT, net: SanaControlNet | None, samples: ControlData, t: float) -> float:
    """The flow loss of every sample at time t with fixed noise, the base steered by `net` (or alone)."""
    x0, noise = samples.latents, torch.randn(samples.latents.shape, generator=torch.Generator().manual_seed(5))
    times = torch.full((len(x0),), t)
    x_t = interpolate(x0, noise, times)
    cond = Conditioning(TextEmbeddings(samples.hidden, samples.mask))
    timesteps = dit_timesteps(times, dit.config.timestep_scale)
    with torch.no_grad():
        if net is not None:
            cond = Conditioning(cond.text, residuals=net(x_t, timesteps, cond, samples.control))
        return float(flow_loss(dit(x_t, timesteps, cond), velocity_target(x0, noise)))


# --------------------------------------------------------------------------------------------------- tests


def test_the_controlnet_learns_its_control_and_the_base_never_moves(base, tmp_path):
    cfg = train_config_from_dict(
        config(
            base,
            tmp_path,
            max_steps=100,
            ema={"enabled": False},
            flow={"caption_dropout": 0.0},
            optim={"lr": 1e-2},
            checkpoint={"every": 1000},
        )  # fmt: skip
    )
    run = setup(cfg, init_distributed(cfg.distributed, cfg.device), data(n=2, batch_size=2))
    assert not any(p.requires_grad for p in run.task.base.parameters())
    run_loop(run)
    result = finish(run)
    loaded = load_file(str(base / "transformer" / "diffusion_pytorch_model.safetensors"))
    after = run.task.base.state_dict()
    assert loaded.keys() == after.keys() and all(torch.equal(loaded[k], after[k]) for k in loaded)

    dit = load_model(SanaDiT, base / "transformer")
    net = load_model(SanaControlNet, result.final_model / "controlnet")
    samples = ControlData(seed=0, rank=0, world_size=1, n=2)
    for t in (0.5, 0.9):
        alone, steered = fixed_loss(dit, None, samples, t), fixed_loss(dit, net, samples, t)
        assert steered < 0.7 * alone, (t, alone, steered)
    # At step 0 the ControlNet adds exactly nothing: the first step's loss is the base's own.
    fresh = SanaControlNet.from_transformer(dit, 1)
    assert fixed_loss(dit, fresh, samples, 0.9) == fixed_loss(dit, None, samples, 0.9)


def test_resume_is_exact(base, tmp_path):
    """4 steps straight == 2 steps, resume, 2 more: the same losses bit for bit, the same ControlNet and EMA, with
    caption dropout and accumulation in play."""
    extra = {"optim": {"grad_accum_steps": 2}}
    straight = train(train_config_from_dict(config(base, tmp_path / "a", **extra)), data=data())
    first = train(train_config_from_dict(config(base, tmp_path / "b", max_steps=2, **extra)), data=data())
    resumed = config(base, tmp_path / "b", checkpoint={"resume": "latest"}, **extra)
    second = train(train_config_from_dict(resumed), data=data())
    assert len(straight.losses) == 4 and first.losses + second.losses == straight.losses
    for name in ("model", "ema"):
        a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / f"{name}.safetensors"))
        b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / f"{name}.safetensors"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert all(k.startswith(("patch_embed", "time_embed", "caption", "transformer_blocks", "input_block",
                                 "controlnet_blocks")) for k in a)  # fmt: skip  # the ControlNet's only


def test_the_export_is_a_controlnet_pipeline_folder_diffusers_loads(base, tmp_path):
    from diffusers import SanaControlNetModel, SanaControlNetPipeline

    cfg = config(base, tmp_path, max_steps=2, model={"export_dtype": "fp16"})
    final = train(train_config_from_dict(cfg), data=data()).final_model
    ours = load_file(str(final / "controlnet" / "diffusion_pytorch_model.safetensors"))
    ema = load_file(str(tmp_path / "checkpoints" / "step-000002" / "ema.safetensors"))
    assert ours.keys() == ema.keys() and all(v.dtype == torch.float16 for v in ours.values())
    assert all(torch.equal(ours[k], ema[k].half()) for k in ours)  # the EMA weights, in the asked dtype

    theirs = SanaControlNetModel.from_pretrained(final / "controlnet", torch_dtype=torch.float16)
    state = theirs.state_dict()
    assert state.keys() == ours.keys() and all(torch.equal(state[k], ours[k]) for k in ours)
    assert theirs.config.num_layers == 1
    pipe = SanaControlNetPipeline.from_pretrained(final)  # the base's parts linked beside it
    assert type(pipe.controlnet).__name__ == "SanaControlNetModel"
    index = json.loads((final / "model_index.json").read_text())
    assert index["_class_name"] == "SanaControlNetPipeline" and index["controlnet"][1] == "SanaControlNetModel"
    for part in ("transformer", "vae"):  # the frozen base, byte for byte
        name = "diffusion_pytorch_model.safetensors"
        assert (final / part / name).read_bytes() == (base / part / name).read_bytes()

    # model.controlnet goes on training an existing ControlNet (here this export, through its pipeline folder).
    again = config(base, tmp_path / "again", max_steps=1, optim={"lr": 1e-12}, model={"num_layers": None,
                   "controlnet": str(final)})  # fmt: skip
    after = load_file(str(train(train_config_from_dict(again), data=data()).final_model / "controlnet" / name))
    assert after.keys() == ours.keys()
    assert all(torch.allclose(after[k].float(), ours[k].float(), atol=1e-3) for k in ours)


def test_control_images_from_a_manifest_and_from_sana_cache_control_edges(base, tmp_path):
    """Raw (image, caption, control image) rows train with the encoders on the fly; `sana cache --control edges`
    stores each image's edge latent, which trains the same way; the cache's control latent is the autoencoder's
    latent of the edge map of the resized image."""
    from sana.data.control import edges
    from sana.pretrained import load_components

    rng = np.random.default_rng(0)
    rows = []
    for i in range(4):
        pixels = np.full((32, 32, 3), 255, np.uint8)
        x, y = rng.integers(2, 18, 2)
        pixels[y : y + 12, x : x + 12] = (255, 0, 0)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
        Image.fromarray(edges(pixels)).save(tmp_path / f"{i}-edges.png")
        rows.append({"image": f"{i}.png", "control": f"{i}-edges.png", "text": "a red square"})
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = {"path": str(tmp_path / "m.jsonl"), "batch_size": 2, "resolution": 32, "buckets": False}
    assert train(train_config_from_dict(config(base, tmp_path / "raw", max_steps=1, data=raw))).final_model

    plain = [{"image": r["image"], "text": r["text"]} for r in rows]
    (tmp_path / "plain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain))
    cache = tmp_path / "cache"
    args = ["cache", str(tmp_path / "plain.jsonl"), "--model", str(base), "--out", str(cache)]
    assert main([*args, "--resolution", "32", "--no-buckets", "--control", "edges"]) == 0
    cached = {"path": str(cache), "batch_size": 2, "resolution": 32, "buckets": False}
    assert train(train_config_from_dict(config(base, tmp_path / "cached", max_steps=1, data=cached))).final_model

    index = json.loads((cache / "index.json").read_text())
    assert index["control"] == "edges" and index["settings"]["control"] == "edges"
    shard = load_file(str(cache / "shard-00000.safetensors"))
    vae = load_components(base, parts=("vae",)).vae
    for slot, entry in enumerate(index["shards"][0]["samples"]):
        pixels = np.asarray(Image.open(tmp_path / f"{entry['key']}.png").convert("RGB"))
        control = torch.from_numpy(edges(pixels)).permute(2, 0, 1).float().div(127.5).sub(1)
        with torch.no_grad():
            want = vae.encode(control[None])[0]
        torch.testing.assert_close(shard[f"{slot}.control"], want, rtol=1e-4, atol=1e-5)

    # The cache of the manifest with control images holds their latents ("source"), not edges of the images.
    main(["cache", str(tmp_path / "m.jsonl"), "--model", str(base), "--out", str(tmp_path / "c2"),
          "--resolution", "32", "--no-buckets"])  # fmt: skip
    assert json.loads((tmp_path / "c2" / "index.json").read_text())["control"] == "source"


def _one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_bad_configs_fail_in_one_line_before_training(base, tmp_path):
    with pytest.raises(ConfigError) as e:
        train_config_from_dict(config(base, tmp_path, model={"base": str(base), "num_layers": None}))
    assert "exactly one of model.num_layers" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        train(train_config_from_dict(config(base, tmp_path, model={"num_layers": 2})), data=data())
    assert "num_layers" in _one_line(e) and "1 to 1 blocks, got 2" in str(e.value)
    with pytest.raises(UserError) as e:
        train(train_config_from_dict(config(base, tmp_path, model={"base": str(tmp_path / "nope")})), data=data())
    assert "model.base: no such model folder" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        train_config_from_dict({**config(base, tmp_path), "lora": {"enabled": True}})
    assert "belongs to task dit" in _one_line(e)
    with pytest.raises(ConfigError) as e:
        train_config_from_dict(config(base, tmp_path, model={"num_layer": 1}))
    assert "did you mean model.num_layers" in _one_line(e)

    # Data without control images: named, with the two ways to give them, before any model loads.
    (tmp_path / "imgs").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), "white").save(tmp_path / "imgs" / f"{i}.png")
        (tmp_path / "imgs" / f"{i}.txt").write_text("white")
    Image.new("RGB", (32, 32), "black").save(tmp_path / "imgs" / "0.control.png")
    folder = {"path": str(tmp_path / "imgs"), "batch_size": 1, "resolution": 32, "buckets": False}
    with pytest.raises(UserError) as e:
        train(train_config_from_dict(config(base, tmp_path / "r", data=folder)))
    assert "1 of 2 samples" in _one_line(e) and "(e.g. 1)" in str(e.value) and "--control edges" in str(e.value)


_RANK = """
import json, os, sys, torch
torch.set_num_threads(1)
from sana.training import train
from sana.training.tasks import train_config_from_dict
from tests.training.test_controlnet_task import config, data
base, root, ports = sys.argv[1], sys.argv[2], sys.argv[3:]
losses = {}
for strategy, port in zip(("ddp", "fsdp"), ports):
    os.environ["MASTER_PORT"] = port
    cfg = config(base, f"{root}/{strategy}", max_steps=2, distributed={"strategy": strategy})
    losses[strategy] = train(train_config_from_dict(cfg), data=data(batch_size=1)).losses
if os.environ["RANK"] == "0":
    json.dump(losses, open(f"{root}/losses.json", "w"))
"""


def test_two_processes_train_what_one_does_with_ddp_and_fsdp(base, tmp_path):
    """Two CPU ranks (gloo) with batch 1 each, as torchrun launches them, take the steps one process takes with
    batch 2: the ControlNet is what the loop wraps (DDP) or shards block by block (FSDP2), the base stays whole."""
    ports = [_free_port() for _ in range(2)]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(base), str(tmp_path), *ports], cwd=REPO,
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
    single = train(train_config_from_dict(config(base, tmp_path / "single", max_steps=2)), data=data(batch_size=2))
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("distributed training timed out")
        assert proc.returncode == 0, err.decode()[-3000:]
    losses = json.loads((tmp_path / "losses.json").read_text())
    reference = load_file(str(single.final_model / "controlnet" / "diffusion_pytorch_model.safetensors"))
    for strategy in ("ddp", "fsdp"):
        assert losses[strategy] == pytest.approx(single.losses, rel=1e-5, abs=1e-6)
        exported = load_file(
            str(tmp_path / strategy / "final" / "controlnet" / "diffusion_pytorch_model.safetensors")
        )
        for k, v in reference.items():
            torch.testing.assert_close(exported[k], v, rtol=1e-4, atol=1e-5)
