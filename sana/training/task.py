"""What a training task adds to the shared loop: the model, the loss of a micro-batch, and the export.

`sana train` trains several kinds of model with one loop (loop.py: checkpoints, exact resume, EMA, the LR
schedule, accumulation, mixed precision, DDP, logging, the non-finite-loss stop), selected by the run
config's top-level `task:` key; the registry (tasks.py) names every task and the module that implements it.

A task is an object with the methods of `Task` below, built by `sana.training.tasks.make_task(cfg, ctx)`.
The loop calls them in this order: build_data -> build_model -> (wrap, optimizer, EMA, resume) -> start -> per step
{micro_batch x grad_accum_steps -> loss (inside train_step) -> after_step} -> export. Everything the loop
checkpoints is the module `build_model` returns (so a task whose training needs a second network, like the
autoencoder's discriminator, returns one module holding both); state that is not trained and not random
(the frozen encoders, a perceptual network, a tokenizer) lives in the task. `start`, `after_step` and
`export` receive the `Run` below: everything the loop has built.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sana.training.config import RunConfig
from sana.training.distributed import DistContext, full_tensor
from sana.training.ema import full_ema_state
from sana.training.logging import MetricsLogger

DataSource = Callable[..., Iterable[dict[str, Any]]]
LossOutput = tuple[torch.Tensor, dict[str, torch.Tensor]]


class Task:
    """The per-task part of a run. `cfg` is the task's run config, `ctx` the process's place in the group,
    `resume` the checkpoint the run continues from (None: a fresh start)."""

    def __init__(self, cfg: Any, ctx: DistContext, resume: Path | None = None) -> None:
        self.cfg, self.ctx, self.resume = cfg, ctx, resume

    def build_data(self, data: DataSource | None) -> Iterable[dict[str, Any]]:
        """This rank's infinite batch iterator: `data(seed=, rank=, world_size=)` when given, else cfg.data
        through sana.data.build_loader."""
        return open_data(self.cfg, data, rank=self.ctx.rank, world_size=self.ctx.world_size)

    def build_model(self) -> nn.Module:
        """The module to train, seeded identically on every rank, on the CPU, in training mode."""
        raise NotImplementedError

    def describe(self) -> str:
        """How the run starts, for the first log line ("from scratch", "resumed from ...")."""
        return f"resumed from {self.resume}" if self.resume else "from scratch"

    def start(self, run: Run) -> None:
        """Called once the model, optimizer and resumed state are in place (load frozen helpers here)."""

    def micro_batch(self, batch: dict[str, Any], step: int, micro: int) -> Any:
        """A data batch -> the model-ready micro-batch `micro` of optimizer step `step`, on the device."""
        raise NotImplementedError

    def batch_size(self, micro_batch: Any) -> int:
        """Rows of a micro-batch on this rank (for the samples/s column)."""
        raise NotImplementedError

    def loss(self, model: nn.Module, micro_batch: Any, dtype: torch.dtype) -> LossOutput:
        """(objective to backpropagate, metrics) of one micro-batch. `model` is the trained module as wrapped
        for DDP (call it, do not reach inside, so gradients are synchronised); `dtype` its weights' dtype.
        metrics["loss"] is the number the run reports per step (the objective when absent); every metric is a
        detached scalar tensor and is averaged over micro-batches and ranks."""
        raise NotImplementedError

    def after_step(self, run: Run, step: int) -> None:
        """After each optimizer step and EMA update, before the checkpoint (validation images go here)."""

    def export(self, run: Run) -> dict[str, Path | None]:
        """Write the final model under `RUN/` (rank 0) and return {TrainResult field: path}. Called on every
        rank: gathering sharded weights is a collective."""
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------- run


class BatchStream:
    """next() over the loader, starting a new pass when one ends; an empty pass is an error."""

    def __init__(self, loader: Iterable[dict[str, Any]]) -> None:
        self.loader = loader
        self._it: Iterator[dict[str, Any]] | None = None

    def __next__(self) -> dict[str, Any]:
        for _ in range(2):
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
        raise ValueError("the data source yielded no batches")


@dataclass
class Run:
    """Everything the loop touches, built once by `loop.setup`; what a task's start, after_step and export get."""

    cfg: RunConfig
    ctx: DistContext
    task: Task
    model: nn.Module  # what is trained (e.g. the DiT), its DDP wrapper, or the FSDP2-sharded model
    core: nn.Module  # the trained module itself (names, config)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    ema: dict[str, torch.Tensor] | None
    loader: Any
    batches: BatchStream
    logger: MetricsLogger
    start_step: int = 0
    checkpoint: Path | None = None
    losses: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ helpers


def open_data(cfg: Any, data: DataSource | None, *, rank: int, world_size: int) -> Iterable[dict[str, Any]]:
    """A batch iterator from `data` (a callable, for tests and notebooks) or from cfg.data (sana.data)."""
    from sana.config import ConfigError

    if data is not None:
        return data(seed=cfg.seed, rank=rank, world_size=world_size)
    if cfg.data is None:
        raise ConfigError("the run config has no data section")
    from sana.data import build_loader

    return build_loader(cfg.data, seed=cfg.seed, rank=rank, world_size=world_size)


def trained_weights(
    core: nn.Module, ema: dict[str, torch.Tensor] | None, use_ema: bool
) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of every parameter of `core`, the trained ones from the EMA when asked (a collective
    under FSDP: every rank calls it). Frozen parameters have no EMA and come from the model."""
    weights = {name: full_tensor(p.detach()).cpu() for name, p in core.named_parameters()}
    if use_ema and ema is not None:
        weights.update(full_ema_state(ema))
    return weights


def sub_state(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under `prefix.` with the prefix removed: one submodule's state dict."""
    cut = len(prefix) + 1
    return {k[cut:]: v for k, v in weights.items() if k.startswith(prefix + ".")}


def publish_folder(tmp: Path, final: Path) -> Path:
    """Rename the finished folder `tmp` onto `final` (atomically replacing an older export); returns `final`."""
    from sana.training.checkpoint import _publish  # the checkpoints' own atomic rename-into-place

    _publish(tmp, final)
    return final


def temporary_folder(final: Path) -> Path:
    """An empty `.tmp-NAME` folder beside `final`, to write an export into before `publish_folder`."""
    tmp = final.with_name(f".tmp-{final.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
