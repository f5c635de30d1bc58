"""Checkpoints: exact resume, survival of a SIGKILL in the middle of a save, and NaN stopping cleanly."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sana.training import TrainingError, train
from sana.training.checkpoint import ResumeError, list_checkpoints
from sana.training.logging import read_metrics
from tests.training.test_loop import MemoryData, one_thread, tiny_config  # noqa: F401 (fixture)

REPO = Path(__file__).parents[2]
DATA = functools.partial(MemoryData, n=8)  # 4 batches per epoch: runs cross epoch boundaries


def _weights(run_dir: Path, step: int, name: str = "model") -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors"))


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_is_exact(tmp_path):
    """6 steps straight == 3 steps, then resume, then 3 more: same losses bit for bit, same weights and EMA.
    Shuffling, caption dropout, global-RNG augmentation and gradient accumulation are all in play."""
    extra = {"optim": {"grad_accum_steps": 2}}
    straight = train(tiny_config(tmp_path / "a", **extra), data=DATA)
    first = train(tiny_config(tmp_path / "b", max_steps=3, **extra), data=DATA)
    second = train(tiny_config(tmp_path / "b", checkpoint={"resume": "latest"}, **extra), data=DATA)
    assert len(straight.losses) == 6
    assert first.losses + second.losses == straight.losses
    for name in ("model", "ema"):
        _assert_same_weights(_weights(tmp_path / "a", 6, name), _weights(tmp_path / "b", 6, name))
    rows = read_metrics(tmp_path / "b" / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_fresh_start_refuses_a_run_dir_with_checkpoints(tmp_path):
    train(tiny_config(tmp_path, max_steps=3), data=DATA)
    with pytest.raises(ResumeError, match="already has checkpoints.*--resume"):
        train(tiny_config(tmp_path, max_steps=4), data=DATA)


_KILLED_RUN = """
import functools, sys, torch
torch.set_num_threads(1)
from sana.training import train
from tests.training.test_loop import MemoryData, tiny_config
cfg = tiny_config(sys.argv[1], max_steps=6, checkpoint={"every": 2, "write_delay_s": 2.0, "resume": "latest"})
train(cfg, data=functools.partial(MemoryData, n=8))
"""


def _wait_for(predicate, timeout: float, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(
                f"training exited early ({proc.returncode}): {proc.stderr.read().decode()[-2000:]}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the checkpoint write")
        time.sleep(0.02)


def test_sigkill_during_checkpoint_write_then_resume(tmp_path):
    """Kill -9 while step 4's checkpoint is half-written (the first file written, the rest pending): step 2
    stays the latest complete checkpoint, the partial folder is ignored and removed, and the resumed run
    reproduces the uninterrupted one."""
    run_dir = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, str(run_dir)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    checkpoints = run_dir / "checkpoints"
    # The 2 s pause hits every save (step 2 is published 2 s late); kill inside step 4's pause.
    partial = checkpoints / ".tmp-step-000004" / "model.safetensors"
    try:
        _wait_for(lambda: partial.is_file(), 120, proc)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert [s for s, _ in list_checkpoints(run_dir)] == [2]
    killed_rows = read_metrics(run_dir / "metrics.csv")
    assert [r["step"] for r in killed_rows] == [1, 2, 3, 4]

    cfg = tiny_config(run_dir, checkpoint={"every": 2, "resume": "latest"})
    resumed = train(cfg, data=functools.partial(MemoryData, n=8))
    reference = train(tiny_config(tmp_path / "reference", checkpoint={"every": 2}), data=DATA)
    assert resumed.losses == reference.losses[2:]
    assert [r["loss"] for r in killed_rows[2:]] == pytest.approx(reference.losses[2:4], rel=1e-6)  # CSV: 8 digits
    assert not (checkpoints / ".tmp-step-000004").exists()
    assert [s for s, _ in list_checkpoints(run_dir)] == [2, 4, 6]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.csv")] == [1, 2, 3, 4, 5, 6]
    _assert_same_weights(_weights(run_dir, 6), _weights(tmp_path / "reference", 6))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, max_steps=8, checkpoint={"every": 2, "keep_last": 1})
    poisoned = functools.partial(MemoryData, n=8, nan_at=4)  # the 5th batch: step 5
    with pytest.raises(TrainingError, match=r"step 5: non-finite loss.*step-000004"):
        train(cfg, data=poisoned)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert all(torch.isfinite(t).all() for t in _weights(tmp_path, 4).values())
    assert not (tmp_path / "final").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.csv")] == [1, 2, 3, 4]
    # The last good checkpoint resumes (here with clean data) to the end.
    cfg = tiny_config(tmp_path, max_steps=6, checkpoint={"every": 2, "keep_last": 1, "resume": "latest"})
    assert train(cfg, data=DATA).step == 6
