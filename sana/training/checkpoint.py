"""Training checkpoints that survive being killed at any moment, and the final model export.

A checkpoint is a folder `RUN/checkpoints/step-000100/`:
    model.safetensors      the transformer (whole tensors, diffusers key names)
    ema.safetensors        the EMA weights, when EMA is on
    optimizer.pt           optimizer state keyed by parameter name (any world size / strategy can read it)
    trainer.pt             step, world size, gradient-scaler state
    rank-00000.pt ...      per rank: RNG states (torch, CUDA, python, numpy) and the data loader position
    meta.json              written last; what the folder holds
It is written as `.tmp-step-000100/` and renamed into place only when complete (os.replace is atomic on
POSIX), so a `step-*` folder is always whole: a save killed half-way leaves only a `.tmp-*` folder, which the
next start deletes. The learning-rate schedule needs no state (it is a function of the step). Ranks must
share the run folder's filesystem (one node, or a shared mount across nodes).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sana.errors import UserError
from sana.training.distributed import DistContext, barrier, broadcast_object
from sana.training.ema import full_ema_state, load_ema

CHECKPOINTS = "checkpoints"
_NAME = re.compile(r"^step-(\d{6,})$")


class ResumeError(UserError):
    """A checkpoint that cannot continue this run (missing, or written by a different setup)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in the run, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _NAME.match(path.name)
        if match and (path / "meta.json").is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_partial(run_dir: str | Path) -> list[Path]:
    """Delete the leftovers of interrupted saves (`.tmp-*`, `.old-*`); returns what was removed."""
    root = Path(run_dir) / CHECKPOINTS
    removed = []
    for path in root.glob(".*-step-*") if root.is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


# ------------------------------------------------------------------------------------------------- RNG


def rng_state() -> dict[str, Any]:
    """Every global RNG a training process may draw from (data augmentation, dropout, ...)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # numpy's state holds an ndarray; stored as a tensor so checkpoints load with weights_only=True.
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                  "has_gauss": has_gauss, "cached": cached},
    }  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))


# ------------------------------------------------------------------------------------------------ save


def _sync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _state_dict_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    scaler: torch.amp.GradScaler | None,
    loader: Any,
    ctx: DistContext,
    keep_last: int = 3,
    write_delay_s: float = 0.0,
) -> Path:
    """Write checkpoint `step` atomically (a collective: every rank calls it); prune to `keep_last`."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = Path(run_dir) / CHECKPOINTS
    final, tmp = root / checkpoint_name(step), root / f".tmp-{checkpoint_name(step)}"
    # Gathering whole tensors is a collective under FSDP; with cpu_offload only rank 0 keeps them.
    model_state, optim_state = get_state_dict(model, optimizer, options=_state_dict_options(cpu_offload=True))
    ema_state = full_ema_state(ema) if ema is not None else None
    if ctx.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(ctx)
    data_state = loader.state_dict() if hasattr(loader, "state_dict") else None
    torch.save({"rng": rng_state(), "data": data_state}, tmp / f"rank-{ctx.rank:05d}.pt")
    _sync_file(tmp / f"rank-{ctx.rank:05d}.pt")
    barrier(ctx)
    if ctx.is_main:
        _write_main_files(tmp, step, model_state, optim_state, ema_state, scaler, ctx, write_delay_s, save_file)
        _publish(tmp, final)
        prune_checkpoints(run_dir, keep_last)
    barrier(ctx)
    return final


def _write_main_files(tmp, step, model_state, optim_state, ema_state, scaler, ctx, delay, save_file) -> None:
    files = ["model.safetensors"]
    save_file({k: v.contiguous() for k, v in model_state.items()}, str(tmp / files[-1]))
    if delay:  # testing aid: a window in which the folder is half-written
        time.sleep(delay)
    if ema_state is not None:
        files.append("ema.safetensors")
        save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / files[-1]))
    files.append("optimizer.pt")
    torch.save(optim_state, tmp / files[-1])
    files.append("trainer.pt")
    trainer = {"step": step, "world_size": ctx.world_size, "scaler": scaler.state_dict() if scaler else None}
    torch.save(trainer, tmp / files[-1])
    meta = {"step": step, "world_size": ctx.world_size, "files": files, "time": time.time()}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    for name in [*files, "meta.json"]:
        _sync_file(tmp / name)
    _sync_dir(tmp)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished folder into place, replacing an existing one of the same name (a step saved again
    after resuming from an older checkpoint, or a previous export)."""
    if final.exists():
        old = final.with_name(f".old-{final.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _sync_dir(final.parent)


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ load


def resolve_resume(run_dir: str | Path, resume: str | None, ctx: DistContext) -> Path | None:
    """The checkpoint folder to continue from (rank 0 decides, everyone agrees), or None to start fresh.

    Starting fresh in a run folder that already holds checkpoints is refused: it would silently mix two runs.
    """
    choice = None
    if ctx.is_main:
        remove_partial(run_dir)
        latest = latest_checkpoint(run_dir)
        if resume in ("latest", "auto"):
            choice = latest  # None: nothing yet, a fresh start (so --resume is safe on the first launch)
        elif resume:
            choice = Path(resume)
            if not (choice / "meta.json").is_file():
                choice = ResumeError(f"{resume} is not a complete checkpoint folder (no meta.json)")
        elif latest is not None:
            choice = ResumeError(
                f"{run_dir} already has checkpoints (latest {latest.name}): pass --resume to continue it, "
                "or choose another run_dir"
            )
    choice = broadcast_object(choice, ctx)
    if isinstance(choice, Exception):
        raise choice
    return choice


def load_checkpoint(
    folder: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    ema: dict[str, torch.Tensor] | None,
    scaler: torch.amp.GradScaler | None,
    loader: Any,
    ctx: DistContext,
) -> int:
    """Restore everything `save_checkpoint` wrote (every rank reads the whole files); returns the step."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    folder = Path(folder)
    meta = json.loads((folder / "meta.json").read_text())
    if meta["world_size"] != ctx.world_size:
        raise ResumeError(
            f"{folder} was written by {meta['world_size']} process(es), this run has {ctx.world_size}: the data "
            "position and RNG streams are per rank, so resume with the same number of processes"
        )
    trainer = torch.load(folder / "trainer.pt", weights_only=True)
    set_state_dict(
        model,
        optimizer,
        model_state_dict=load_file(str(folder / "model.safetensors")),
        optim_state_dict=torch.load(folder / "optimizer.pt", weights_only=True),
        options=_state_dict_options(),
    )
    if ema is not None:
        ema_file = folder / "ema.safetensors"
        # Turning EMA on when resuming a run trained without it starts the average from the current weights.
        load_ema(ema, load_file(str(ema_file)) if ema_file.is_file() else dict(unwrapped_state(model)))
    if scaler is not None and trainer["scaler"]:
        scaler.load_state_dict(trainer["scaler"])
    per_rank = torch.load(folder / f"rank-{ctx.rank:05d}.pt", weights_only=True)
    if per_rank["data"] is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(per_rank["data"])
    set_rng_state(per_rank["rng"])
    return int(trainer["step"])


def unwrapped_state(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_dict_options()).items()


# ---------------------------------------------------------------------------------------------- export


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (no extra disk for a multi-GB text encoder), copying where links are impossible."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def export_model(
    folder: str | Path,
    transformer: nn.Module,
    *,
    components: str | Path | None,
    flow_shift: float,
) -> Path:
    """Write `folder` as a Sana model folder (diffusers layout) holding `transformer`.

    With `components` (the model folder the run took its autoencoder and text encoder from), those parts are
    linked in and the result is complete: `sana generate --model folder` works. Without it, only
    `transformer/` and the scheduler are written. The scheduler keeps the components' sampler with the
    training time shift (training and sampling use the same shift). Written beside and renamed into place.
    """
    from sana.config import read_json
    from sana.pretrained import INSTRUCTION_FILE, SchedulerSpec, load_components, write_sampling
    from sana.weights import save_model, write_json

    folder = Path(folder)
    tmp = folder.with_name(f".tmp-{folder.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(transformer, tmp / "transformer")
    scheduler = SchedulerSpec(flow_shift=flow_shift)
    if components is not None:
        components = Path(components)
        for part in ("vae", "text_encoder", "tokenizer"):
            shutil.copytree(components / part, tmp / part, copy_function=_link_or_copy)
        if (components / INSTRUCTION_FILE).is_file():  # the captions were encoded with it: keep it with the model
            shutil.copy2(components / INSTRUCTION_FILE, tmp / INSTRUCTION_FILE)
        base = load_components(components, parts=()).scheduler
        scheduler = replace(base, flow_shift=flow_shift)  # a fine-tune samples as its base did (sampling.json)
        index = read_json(components / "model_index.json")
        index["transformer"] = ["diffusers", type(transformer).diffusers_class_name]
        write_json(tmp / "model_index.json", index)
    write_json(tmp / "scheduler" / "scheduler_config.json", scheduler.to_dict())
    write_sampling(tmp, scheduler)
    _publish(tmp, folder)
    return folder
