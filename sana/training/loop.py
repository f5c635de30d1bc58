"""`train(cfg)`: the training loop of every task, from one CPU to many GPUs.

    setup:  process group -> task (cfg.task, from the registry tasks.py) -> data loader (bad data fails first)
            -> model (task.build_model) -> wrap (DDP / FSDP2) -> optimizer, EMA, scaler -> resume (model,
            EMA, optimizer, scaler, RNG, data position) -> logger -> task.start
    loop:   per step: lr -> grad_accum_steps micro-batches (task.micro_batch) -> train_step (task.loss) -> EMA
            -> log -> task.after_step (e.g. the DiT's validation images) -> checkpoint
    finish: last checkpoint, task.export (e.g. the DiT's model folder `RUN/final`), loss.png

Each piece is a small function; `train_step` (step.py) is the unit-tested core. The loop knows no task: what
a task adds is task.py's `Task`, and the tasks themselves live in their own modules (dit_task.py, dcae_task.py,
text_task.py), named by the registry (tasks.py).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sana.errors import RuntimeFailure
from sana.training.checkpoint import latest_checkpoint, load_checkpoint, resolve_resume, save_checkpoint
from sana.training.config import RunConfig, dump_yaml
from sana.training.distributed import (
    DistContext,
    barrier,
    close_distributed,
    init_distributed,
    unwrap,
    wrap_model,
)
from sana.training.ema import init_ema, update_ema
from sana.training.logging import MetricsLogger, plot_loss
from sana.training.optim import build_optimizer, lr_at, set_lr
from sana.training.step import NonFiniteLossError, train_step
from sana.training.task import BatchStream, DataSource, Run
from sana.training.tasks import make_task


class TrainingError(RuntimeFailure):
    """Training cannot go on (diverged); the message says where the last good checkpoint is."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the last step completed
    losses: list[float]  # one per step run by this call
    checkpoint: Path | None  # the last checkpoint written
    final_model: Path | None  # the exported model folder (rank 0 only)
    lora: Path | None = None  # the exported LoRA weights file, for a LoRA run (rank 0 only)


# ------------------------------------------------------------------------------------------------- data


def next_micro_batches(run: Run, step: int) -> list[Any]:
    """This rank's `grad_accum_steps` micro-batches of `step`, made model-ready by the task."""
    return [run.task.micro_batch(next(run.batches), step, i) for i in range(run.cfg.optim.grad_accum_steps)]


# ------------------------------------------------------------------------------------------------ setup


def seed_everything(seed: int) -> None:
    """Global RNGs (for anything in data loading that uses them); per-rank, so ranks do not repeat each other."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(cfg: RunConfig, ctx: DistContext, data: DataSource | None) -> Run:
    run_dir = Path(cfg.run_dir)
    seed_everything(cfg.seed + ctx.rank)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.precision.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.precision.allow_tf32
    resume = resolve_resume(run_dir, cfg.checkpoint.resume, ctx)
    task = make_task(cfg, ctx, resume)
    loader = task.build_data(data)  # first: an empty or too-small dataset fails before any model loads

    core = task.build_model().to(ctx.device)
    model = wrap_model(core, ctx)
    optimizer = build_optimizer(unwrap(model), cfg.optim)
    scaler = torch.amp.GradScaler(ctx.device.type) if cfg.precision.mixed == "fp16" else None
    ema = init_ema(unwrap(model)) if cfg.ema.enabled else None

    start = 0
    if resume is not None:
        start = load_checkpoint(
            resume, model=model, optimizer=optimizer, ema=ema, scaler=scaler, loader=loader, ctx=ctx
        )
    logger = MetricsLogger(run_dir, cfg.logging, start_step=start, max_steps=cfg.max_steps, enabled=ctx.is_main)
    if ctx.is_main:
        (run_dir / "config.yaml").write_text(dump_yaml(cfg))
        params = sum(p.numel() for p in core.parameters() if p.requires_grad)
        logger.info(
            f"training {params / 1e6:.2f}M parameters ({cfg.task}) on {ctx.world_size} x {ctx.device.type} "
            f"({ctx.strategy}), {task.describe()}, step {start} -> {cfg.max_steps}"
        )
    run = Run(cfg, ctx, task, model, unwrap(model), optimizer, scaler, ema, loader, BatchStream(loader), logger,
              start_step=start, checkpoint=resume)  # fmt: skip
    task.start(run)
    return run


# ------------------------------------------------------------------------------------------------- loop


def checkpoint(run: Run, step: int) -> None:
    c = run.cfg.checkpoint
    run.checkpoint = save_checkpoint(
        run.cfg.run_dir, step, model=run.model, optimizer=run.optimizer, ema=run.ema, scaler=run.scaler,
        loader=run.loader, ctx=run.ctx, keep_last=c.keep_last, write_delay_s=c.write_delay_s,
    )  # fmt: skip
    run.logger.info(f"step {step}: checkpoint -> {run.checkpoint}")


def step_or_stop(run: Run, micro: list[Any], step: int) -> dict[str, float]:
    """train_step, turning divergence into a TrainingError that names the last good checkpoint."""
    cfg = run.cfg
    try:
        return train_step(
            run.model, micro, run.optimizer, loss_fn=run.task.loss, mixed=cfg.precision.mixed,
            grad_clip=cfg.optim.grad_clip, scaler=run.scaler, ctx=run.ctx,
        )  # fmt: skip
    except NonFiniteLossError as e:
        last = latest_checkpoint(cfg.run_dir)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        message = f"step {step}: non-finite loss ({e}); stopping, {where}"
        run.logger.info(message)
        raise TrainingError(
            f"{message} (resume it with --resume, perhaps with a lower optim.lr or precision.mixed: bf16)"
        ) from None


def run_loop(run: Run) -> None:
    cfg = run.cfg
    for step in range(run.start_step + 1, cfg.max_steps + 1):
        lr = lr_at(step, cfg.optim, cfg.schedule, cfg.max_steps)
        set_lr(run.optimizer, lr)
        micro = next_micro_batches(run, step)
        metrics = step_or_stop(run, micro, step)
        if run.ema is not None:
            update_ema(run.ema, run.core, cfg.ema.decay)
        samples = run.task.batch_size(micro[0]) * run.ctx.world_size * len(micro)
        run.logger.log(step, {**metrics, "lr": lr}, samples=samples)
        run.losses.append(metrics["loss"])
        # Validation before the checkpoint: the saved RNG state is then the one the next step starts from.
        run.task.after_step(run, step)
        if step % cfg.checkpoint.every == 0 or step == cfg.max_steps:
            checkpoint(run, step)


def finish(run: Run) -> TrainResult:
    """Export the final model (the task's export) and draw the loss curve."""
    cfg = run.cfg
    exports = dict(run.task.export(run))
    if run.ctx.is_main:
        run_dir = Path(cfg.run_dir)
        png = plot_loss(run_dir / "metrics.csv", run_dir / "loss.png") if cfg.logging.plot else None
        if png is not None:
            run.logger.info(f"loss curve -> {png}")
    barrier(run.ctx)
    final = exports.pop("final_model", None)
    return TrainResult(Path(cfg.run_dir), cfg.max_steps, run.losses, run.checkpoint, final, **exports)


def train(cfg: RunConfig, *, data: DataSource | None = None) -> TrainResult:
    """Train `cfg.model` on `cfg.data` for `cfg.max_steps` optimizer steps; see the module docstring.

    data: a callable (seed=, rank=, world_size=) -> iterable of batches, replacing cfg.data (tests, notebooks).
    Raises TrainingError when the loss becomes non-finite; ValueError/ConfigError for bad setups.
    """
    ctx = init_distributed(cfg.distributed, cfg.device)
    try:
        run = setup(cfg, ctx, data)
        try:
            run_loop(run)
            return finish(run)
        finally:
            run.logger.close()
    finally:
        close_distributed(ctx)
