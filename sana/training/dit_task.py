"""task: dit (the default). Flow-matching training and fine-tuning of a Sana DiT, on the shared loop (loop.py).

    run_dir: runs/my-run
    max_steps: 10000
    model: {pretrained: path/to/Sana_600M_512px_diffusers}   # or {preset: ...} from scratch
    data: {...}                      # sana.data.DataConfig (its own module documents the keys)
    flow: {shift: 3.0}               # sana/flow.py's objective
    validation: {every: 500, prompts: [a cat, a dog]}
    lora: {enabled: true}            # optional: LoRA fine-tuning of a pretrained model

The data source is whatever `sana.data.build_loader(cfg.data, ...)` returns, or (for tests and notebooks)
any callable `data(seed=, rank=, world_size=)` returning an iterable of batches, optionally with
state_dict / load_state_dict for exact resume and a `null_text` attribute (the empty-prompt embedding). A batch
holds either cached latents and caption embeddings or raw images and captions, which the frozen autoencoder and
text encoder of model.components encode on the fly (`Encoders`).

After each step the task draws the validation images (`validate`); at the end it exports the model folder
`RUN/final` and, for a LoRA run, the LoRA weights `RUN/lora` (`export_dit`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sana.config import ConfigError
from sana.models.dit import DIT_PRESETS, SanaDiT
from sana.training.checkpoint import export_model
from sana.training.config import FlowConfig, LoRAConfig, RunConfig, _check
from sana.training.distributed import DistContext, barrier, full_tensor
from sana.training.ema import full_ema_state
from sana.training.encoders import Encoders, resolve_null_text
from sana.training.step import FlowBatch, flow_forward, make_flow_batch, prepare_batch, step_generator
from sana.training.task import LossOutput, Run, Task
from sana.types import TextEmbeddings
from sana.weights import load_model, parse_dtype

# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ModelConfig:
    """The transformer to train: `preset` (a DIT_PRESETS name) from scratch, or `pretrained` to fine-tune.

    pretrained: a model folder in the diffusers layout (its `transformer/` is loaded) or a transformer folder
    itself. components: a model folder whose autoencoder and text encoder encode raw images and captions, draw
    the validation images and complete the exported model; defaults to `pretrained` when that is a full
    model folder. overrides: DiTConfig fields replaced in the preset (e.g. caption_channels to match the text
    encoder) or in the pretrained model's config (e.g. `interpolation_scale: 1.0` switches sincos positions on
    in a NoPE model: they are computed, not learned, so every weight still fits; a field that would change a
    weight's shape fails at load).
    """

    preset: str | None = None
    pretrained: str | None = None
    components: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["fp32", "bf16"] = "fp32"  # master weights; bf16 halves memory but AdamW loses precision
    encoders_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen autoencoder and text encoder
    gradient_checkpointing: bool = False  # recompute each block in backward: less memory, ~30% more compute

    def __post_init__(self) -> None:
        if (self.preset is None) == (self.pretrained is None):
            raise ConfigError("model: set exactly one of model.preset (from scratch) or model.pretrained")


@dataclass(frozen=True)
class ValidationConfig:
    """Images for fixed prompts and seeds every `every` steps, saved as one grid PNG (0: never)."""

    every: int = 0
    prompts: tuple[str, ...] = ()
    seed: int = 0  # prompt i uses seed + i, the same at every validation so the grids are comparable
    steps: int = 20
    guidance_scale: float = 4.5
    sampler: str | None = None  # default: the components folder's scheduler
    height: int | None = None  # default: the model's native size
    width: int | None = None
    use_ema: bool = True
    model: str | None = None  # folder with the autoencoder + text encoder; default: model.components

    def __post_init__(self) -> None:
        _check(self.every >= 0, "validation.every must be >= 0")
        _check(self.every == 0 or bool(self.prompts), "validation.prompts must be set when validation.every > 0")
        _check(self.steps >= 1, "validation.steps must be >= 1")
        if self.sampler is not None:
            from sana.samplers import SAMPLERS

            _check(self.sampler in SAMPLERS, f"validation.sampler must be one of {', '.join(SAMPLERS)}")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RunConfig):
    """task: dit (the default): flow-matching training or fine-tuning of the Sana DiT."""

    task: Literal["dit"] = "dit"
    model: ModelConfig
    data: Any = field(default=None, metadata={"parse": "data"})  # sana.data.DataConfig
    flow: FlowConfig = field(default_factory=FlowConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            not self.lora.enabled or self.model.pretrained is not None,
            "lora.enabled needs model.pretrained: LoRA adapts a trained model",
        )


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


# ------------------------------------------------------------------------------------------------ export


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


# ------------------------------------------------------------------------------------------------- task


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


CONFIG = TrainConfig  # the registry's names for this module's pieces (sana/training/tasks.py)
TASK = DiTTask
