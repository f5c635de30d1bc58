"""Two CPU processes (gloo), launched the way torchrun launches them, train exactly what one process trains with
the same global batch: DDP straight through, and FSDP2 (fully_shard per block) through a checkpoint + resume."""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sana.training import train
from tests.training.test_loop import MemoryData, one_thread, tiny_config  # noqa: F401 (fixture)

REPO = Path(__file__).parents[2]
PER_RANK_BATCH = 2

# Each rank: DDP for 4 steps, then FSDP2 for 2 steps and a resume to 4 (each train() call joins and leaves its
# own process group, as separate torchrun launches would).
_RANK = """
import functools, json, os, sys, torch
torch.set_num_threads(1)
from sana.training import train
from tests.training.test_loop import MemoryData, tiny_config
root, ports = sys.argv[1], sys.argv[2:]
data = functools.partial(MemoryData, n=16, batch_size=2, augment=False)
losses = {}
def run(strategy, port, max_steps=4, resume=None):
    os.environ["MASTER_PORT"] = port
    cfg = tiny_config(f"{root}/{strategy}", max_steps=max_steps, distributed={"strategy": strategy},
                      optim={"grad_accum_steps": 2}, checkpoint={"every": 2, "resume": resume})
    losses.setdefault(strategy, []).extend(train(cfg, data=data).losses)
run("ddp", ports[0])
run("fsdp", ports[1], max_steps=2)
run("fsdp", ports[2], resume="latest")
if os.environ["RANK"] == "0":
    json.dump(losses, open(f"{root}/losses.json", "w"))
"""


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_two_processes_match_one(tmp_path):
    ports = [_free_port() for _ in range(3)]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}  # fmt: skip
        procs.append(subprocess.Popen([sys.executable, "-c", _RANK, str(tmp_path), *ports], cwd=REPO, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))  # fmt: skip
    # The single-process reference (global batch 2 x 2 x accumulation 2) runs meanwhile.
    data = functools.partial(MemoryData, n=16, batch_size=2 * PER_RANK_BATCH, augment=False)
    cfg = tiny_config(tmp_path / "single", max_steps=4, optim={"grad_accum_steps": 2}, checkpoint={"every": 2})
    single = train(cfg, data=data).losses
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail("distributed training timed out")
        assert proc.returncode == 0, err.decode()[-3000:]

    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses["ddp"] == pytest.approx(single, rel=1e-5, abs=1e-6)
    assert losses["fsdp"] == pytest.approx(single, rel=1e-5, abs=1e-6)
    reference = load_file(
        str(tmp_path / "single" / "final" / "transformer" / "diffusion_pytorch_model.safetensors")
    )
    for strategy in ("ddp", "fsdp"):
        exported = tmp_path / strategy / "final" / "transformer" / "diffusion_pytorch_model.safetensors"
        weights = load_file(str(exported))
        for k, v in reference.items():
            torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5)
