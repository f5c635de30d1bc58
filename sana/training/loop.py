"""`train(cfg)`: the training loop of every task, and the DiT task (flow-matching training and fine-tuning of
a Sana DiT), from one CPU to many GPUs.

    setup:  process group -> task (cfg.task, see task.py) -> data loader (bad data fails first) -> model
            (task.build_model) -> wrap (DDP / FSDP2) -> optimizer, EMA, scaler -> resume (model, EMA,
            optimizer, scaler, RNG, data position) -> logger -> task.start
    loop:   per step: lr -> grad_accum_steps micro-batches (task.micro_batch) -> train_step (task.loss) -> EMA
            -> log -> task.after_step (the DiT's validation images) -> checkpoint
    finish: last checkpoint, task.export (the DiT: the model folder `RUN/final`, a LoRA run's `RUN/lora`
            weights), loss.png

Each piece is a small function; `train_step` (step.py) is the unit-tested core. The DiT's data source is
whatever `sana.data.build_loader(cfg.data, ...)` returns, or (for tests and notebooks) any callable
`data(seed=, rank=, world_size=)` returning an iterable of batches, optionally with state_dict /
load_state_dict for exact resume and a `null_text` attribute (the empty-prompt embedding). The other tasks
live in dcae_task.py and text_task.py.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sana.config import ConfigError
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.training.checkpoint import (
    export_model,
    latest_checkpoint,
    load_checkpoint,
    resolve_resume,
    save_checkpoint,
)
from sana.training.config import RunConfig, TrainConfig, dump_yaml
from sana.training.distributed import (
    DistContext,
    barrier,
    close_distributed,
    full_tensor,
    init_distributed,
    unwrap,
    wrap_model,
)
from sana.training.ema import full_ema_state, init_ema, update_ema
from sana.training.logging import MetricsLogger, plot_loss
from sana.training.optim import build_optimizer, lr_at, set_lr
from sana.training.step import (
    FlowBatch,
    NonFiniteLossError,
    flow_forward,
    make_flow_batch,
    prepare_batch,
    step_generator,
    train_step,
)
from sana.training.task import DataSource, LossOutput, Task, make_task
from sana.types import TextEmbeddings
from sana.weights import load_model, parse_dtype


class TrainingError(RuntimeError):
    """Training cannot go on (diverged); the message says where the last good checkpoint is."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # the last step completed
    losses: list[float]  # one per step run by this call
    checkpoint: Path | None  # the last checkpoint written
    final_model: Path | None  # the exported model folder (rank 0 only)
    lora: Path | None = None  # the exported LoRA weights file, for a LoRA run (rank 0 only)


# ------------------------------------------------------------------------------------------------ model


def build_model(cfg: TrainConfig) -> SanaDiT:
    """The DiT to train, in model.dtype on the CPU: a seeded from-scratch preset or a pretrained transformer."""
    m = cfg.model
    if m.preset is not None:
        if m.preset not in DIT_PRESETS:
            raise ConfigError(f"model.preset {m.preset!r} is not one of {', '.join(DIT_PRESETS)}")
        try:
            config = replace(DIT_PRESETS[m.preset], **m.overrides)
        except TypeError as e:
            raise ConfigError(f"model.overrides: {e}") from None
        # The same seed on every rank: FSDP keeps each rank's slice of what it built, so all must agree.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = SanaDiT(config)
            model.init_weights()
    else:
        folder = Path(m.pretrained)
        folder = folder / "transformer" if (folder / "transformer").is_dir() else folder
        try:
            model = load_model(SanaDiT, folder, overrides=m.overrides)
        except TypeError as e:
            raise ConfigError(f"model.overrides: {e}") from None
    model = model.to(parse_dtype(m.dtype)).train()
    model.gradient_checkpointing = m.gradient_checkpointing
    model.requires_grad_(True)
    if cfg.lora.enabled:
        from sana.training.lora import apply_lora

        model = apply_lora(model, cfg.lora)  # only the LoRA factors keep requires_grad
    return model


def components_folder(cfg: TrainConfig) -> Path | None:
    """The model folder holding the autoencoder and text encoder, if the run names one."""
    if cfg.model.components:
        return Path(cfg.model.components)
    pretrained = Path(cfg.model.pretrained) if cfg.model.pretrained else None
    return pretrained if pretrained is not None and (pretrained / "model_index.json").is_file() else None


class Encoders:
    """The frozen autoencoder and text encoder, loaded from a model folder on first use."""

    def __init__(self, folder: Path | None, device: torch.device, dtype: str) -> None:
        self.folder, self.device, self.dtype = folder, device, dtype
        self._parts: tuple[nn.Module, Any] | None = None

    @property
    def available(self) -> bool:
        return self.folder is not None

    def __call__(self) -> tuple[nn.Module, Any]:
        if self._parts is None:
            if self.folder is None:
                raise ConfigError(
                    "raw images and captions need an autoencoder and text encoder: set model.components to a "
                    "model folder (or model.pretrained to a full one), or train on a `sana cache` folder"
                )
            from sana.pretrained import load_components

            parts = load_components(
                self.folder, dtype=self.dtype, device=self.device, parts=("vae", "text_encoder")
            )
            parts.vae.requires_grad_(False).eval()
            parts.text_encoder.model.requires_grad_(False).eval()
            self._parts = (parts.vae, parts.text_encoder)
        return self._parts


# ------------------------------------------------------------------------------------------------- data


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


def resolve_null_text(cfg: TrainConfig, loader: Any, encoders: Encoders) -> TextEmbeddings | None:
    """The empty-prompt embedding for caption dropout: the data source's own, a cache's null_text file, or
    computed by the text encoder. None when no caption dropout is configured."""
    if cfg.flow.caption_dropout == 0:
        return None
    own = getattr(loader, "null_text", None)
    if own is not None:
        return own
    if cfg.data is not None:
        from sana.data import detect_kind, load_null_text

        kind = detect_kind(cfg.data.path) if cfg.data.kind == "auto" else cfg.data.kind
        if kind == "cache":
            return load_null_text(cfg.data.path)
    _, text_encoder = encoders()
    return text_encoder.encode_unconditional([""])


def next_micro_batches(run: Run, step: int) -> list[Any]:
    """This rank's `grad_accum_steps` micro-batches of `step`, made model-ready by the task."""
    return [run.task.micro_batch(next(run.batches), step, i) for i in range(run.cfg.optim.grad_accum_steps)]


# ------------------------------------------------------------------------------------------------ setup


@dataclass
class Run:
    """Everything the loop touches, built once by `setup`."""

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


# ------------------------------------------------------------------------------------------- validation


def full_weights(run: Run, use_ema: bool) -> dict[str, torch.Tensor]:
    """Whole CPU tensors of the EMA or live weights (a collective under FSDP: every rank calls it).

    For a LoRA run: every parameter of the wrapped model (peft's names), the LoRA factors from the EMA when
    asked; `lora.merged_weights` turns that into plain DiT weights.
    """
    ema = full_ema_state(run.ema) if use_ema and run.ema is not None else None
    if ema is not None and not run.cfg.lora.enabled:
        return ema
    live = {name: full_tensor(p.detach()).cpu() for name, p in run.core.named_parameters()}
    return {**live, **ema} if ema is not None else live


def dit_weights(run: Run, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`full_weights` as the plain DiT's state dict (a LoRA run's update merged in)."""
    if not run.cfg.lora.enabled:
        return weights
    from sana.training.lora import merged_weights

    return merged_weights(run.core, weights)


def transformer_with(config: Any, weights: dict[str, torch.Tensor], device: torch.device) -> SanaDiT:
    """A fresh eval-mode DiT holding `weights` (float32)."""
    with torch.device("meta"):
        model = SanaDiT(config)
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    return model.to(device).eval()


def image_grid(images: list[Any]) -> Any:
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % cols) * w, (i // cols) * h))
    return grid


def validate(run: Run, step: int) -> Path | None:
    """Draw the fixed validation prompts with fixed seeds; save `RUN/validation/step-XXXXXX.png` (rank 0)."""
    v = run.cfg.validation
    weights = full_weights(run, v.use_ema)
    path = None
    if run.ctx.is_main:
        from sana.pipeline import SanaPipeline
        from sana.pretrained import SchedulerSpec
        from sana.weights import atomic_write

        vae, text_encoder = run.task.validation_encoders()
        dit = transformer_with(run.core.config, dit_weights(run, weights), run.ctx.device)
        pipe = SanaPipeline(dit, vae, text_encoder, SchedulerSpec(flow_shift=run.cfg.flow.shift))
        images = pipe(
            list(v.prompts), seed=[v.seed + i for i in range(len(v.prompts))], steps=v.steps,
            guidance_scale=v.guidance_scale, sampler=v.sampler, height=v.height, width=v.width,
        )  # fmt: skip
        path = Path(run.cfg.run_dir) / "validation" / f"step-{step:06d}.png"
        grid = image_grid(images)
        atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))
        run.logger.info(f"step {step}: validation images -> {path}")
    barrier(run.ctx)
    return path


def validation_possible(run: Run) -> bool:
    v = run.cfg.validation
    if not v.every:
        return False
    if not run.task.validation_encoders.available:
        run.logger.info(
            "validation skipped: no autoencoder/text encoder to draw with; set validation.model (or "
            "model.components) to a model folder"
        )
        return False
    return True


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


def export_dit(run: Run) -> dict[str, Path | None]:
    """The DiT's final model folder (EMA or live weights) and, for a LoRA run, its LoRA weights file."""
    cfg = run.cfg
    weights = full_weights(run, cfg.checkpoint.export_ema)
    final = lora = None
    if run.ctx.is_main:
        folder = components_folder(cfg)
        if cfg.lora.enabled:
            from sana.training.lora import export_lora

            lora = export_lora(Path(cfg.run_dir) / "lora", run.core, weights)
            run.logger.info(f"LoRA weights -> {lora}")
        if not cfg.lora.enabled or cfg.lora.export_merged:
            dit = transformer_with(run.core.config, dit_weights(run, weights), torch.device("cpu"))
            final = export_model(Path(cfg.run_dir) / "final", dit, components=folder, flow_shift=cfg.flow.shift)
            note = "" if folder else " (transformer only: no model.components to complete it)"
            run.logger.info(f"final model -> {final}{note}")
    return {"final_model": final, "lora": lora}


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


# ------------------------------------------------------------------------------------------------ task


class DiTTask(Task):
    """task: dit. Flow matching on (latents, caption embeddings): cached batches carry both, raw ones are encoded
    on the fly by the frozen autoencoder and text encoder of model.components (loaded on first use)."""

    cfg: TrainConfig

    def __init__(self, cfg: TrainConfig, ctx: DistContext, resume: Path | None = None) -> None:
        super().__init__(cfg, ctx, resume)
        self.encoders = Encoders(components_folder(cfg), ctx.device, cfg.model.encoders_dtype)
        v = cfg.validation.model
        # For validation images: validation.model, else the same as `encoders`.
        self.validation_encoders = Encoders(Path(v), ctx.device, cfg.model.encoders_dtype) if v else self.encoders
        self.null_text: TextEmbeddings | None = None
        self.validating = False
        self.timestep_scale = 1.0

    def build_model(self) -> SanaDiT:
        model = build_model(self.cfg)
        self.timestep_scale = model.config.timestep_scale
        return model

    def describe(self) -> str:
        cfg = self.cfg
        where = "from scratch" if cfg.model.preset else "fine-tuning"
        where = f"resumed from {self.resume}" if self.resume else where
        return where + (f" (LoRA rank {cfg.lora.rank})" if cfg.lora.enabled else "")

    def start(self, run: Run) -> None:
        self.null_text = resolve_null_text(self.cfg, run.loader, self.encoders)
        self.validating = validation_possible(run)

    def micro_batch(self, batch: dict[str, Any], step: int, micro: int) -> FlowBatch:
        """Encode (if raw), then draw the micro-batch's noise, times and caption dropout."""
        latents, text = prepare_batch(batch, self.encoders, self.ctx.device)
        generator = step_generator(self.cfg.seed, step, micro)
        ctx = self.ctx
        return make_flow_batch(latents, text, self.null_text, self.cfg.flow, generator, ctx.rank, ctx.world_size)

    def batch_size(self, micro_batch: FlowBatch) -> int:
        return micro_batch.x0.shape[0]

    def loss(self, model: nn.Module, micro_batch: FlowBatch, dtype: torch.dtype) -> LossOutput:
        return flow_forward(model, micro_batch, self.timestep_scale, dtype), {}

    def after_step(self, run: Run, step: int) -> None:
        if self.validating and step % self.cfg.validation.every == 0:
            validate(run, step)

    def export(self, run: Run) -> dict[str, Path | None]:
        return export_dit(run)


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
