"""`torchrun --nproc-per-node 2 -m sana generate` (two CPU processes) writes the files one process writes, and a
re-run makes only the images that are missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sana.cli.main import main
from sana.cli.sharding import Launch, batches, launch_from_env, rank_device, shard
from sana.errors import UserError
from sana.images import read_parameters

REPO = Path(__file__).parents[1]
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a cat"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.mark.parametrize("n, world", [(0, 2), (1, 2), (5, 2), (9, 3), (4, 4), (3, 5), (10, 1)])
def test_shards_cover_every_image_once_and_balance(n, world):
    shares = [shard(n, r, world) for r in range(world)]
    assert sorted(i for s in shares for i in s) == list(range(n))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert all(i % world == r for r, s in enumerate(shares) for i in s)


def test_launch_device_and_batches():
    assert launch_from_env({}) == Launch(0, 1, 0)
    assert launch_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Launch(3, 4, 1)
    with pytest.raises(UserError):
        launch_from_env({"RANK": "2", "WORLD_SIZE": "2"})
    on_two = Launch(1, 2, 1)
    assert rank_device("cuda", on_two) == "cuda:1" and rank_device("cuda", Launch()) == "cuda"
    assert rank_device("cpu", on_two) == "cpu" and rank_device("cuda:0", on_two) == "cuda:0"
    assert batches([1, 3, 5, 7, 9], 2) == [[1, 3], [5, 7], [9]]


def test_several_processes_need_a_fixed_seed(monkeypatch, tmp_path, capsys):
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    assert main(["generate", "a cat", "b dog", "--output", str(tmp_path)]) == 2
    assert "--seed" in capsys.readouterr().err


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _generate(out: Path, prompts: Path, *, processes: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
    cmd = [sys.executable, *(launcher if processes > 1 else []), "-m", "sana", "generate"]
    cmd += ["--prompts-file", str(prompts), "--seed", "3", "--steps", "2", "--images-per-prompt", "1"]
    cmd += ["--batch-size", "2", "--output", str(out), "--quiet"]
    done = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _mtimes(folder: Path) -> dict[str, int]:
    return {f.name: f.stat().st_mtime_ns for f in folder.iterdir()}


def _same_pixels(a: Path, b: Path) -> bool:
    x = np.asarray(Image.open(a)).astype(int)
    y = np.asarray(Image.open(b)).astype(int)
    return x.shape == y.shape and (np.abs(x - y) <= 2).mean() >= 0.999


def test_two_processes_write_what_one_writes_and_skip_on_rerun(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    one, two = tmp_path / "one", tmp_path / "two"
    _generate(one, prompts, processes=1)
    first = _generate(two, prompts, processes=2)

    names = sorted(f.name for f in one.iterdir())
    assert len(names) == len(PROMPTS)
    assert sorted(f.name for f in two.iterdir()) == names  # no stray temporary files either
    assert sorted(Path(line).name for line in first.stdout.splitlines()) == names  # each image made by one rank
    for name in names:
        assert _same_pixels(one / name, two / name), name
        assert read_parameters(one / name) == read_parameters(two / name)

    # A re-run generates nothing: every file stays as it was and each rank says what it skipped.
    before = _mtimes(two)
    again = _generate(two, prompts, processes=2)
    assert _mtimes(two) == before
    assert again.stderr.count("skipped") == 2 and not again.stdout.strip()

    # One file gone: only that one is written again, identical to the first time.
    missing = names[2]
    (two / missing).unlink()
    third = _generate(two, prompts, processes=2)
    assert [Path(line).name for line in third.stdout.splitlines()] == [missing]
    after = _mtimes(two)
    assert {k: v for k, v in after.items() if k != missing} == {k: v for k, v in before.items() if k != missing}
    assert _same_pixels(one / missing, two / missing)
