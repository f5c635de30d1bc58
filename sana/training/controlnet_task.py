"""task: controlnet. A ControlNet for a frozen Sana DiT, trained with the DiT's flow-matching loss (loop.py).

    task: controlnet
    run_dir: runs/my-controlnet
    max_steps: 5000
    model:
      base: path/to/model          # a model folder or Hub id (its transformer/ is the frozen base)
      num_layers: 7                 # the ControlNet copies the base's first num_layers blocks
    data: {path: data/edges-cache, ...}   # samples with control images (below)
    flow: {shift: 3.0, caption_dropout: 0.1}

The ControlNet starts as `SanaControlNet.from_transformer(base, num_layers)`: the base's patch, time and caption
embeddings and first blocks, with zero control input and output projections, so at step 0 the steered base is
exactly the base (or from `model.controlnet`, an existing ControlNet folder, to train on). The base never
changes: it is loaded frozen (no gradients, not in the optimizer, not in checkpoints) and the loss flows through
it into the residuals. A step is the DiT task's: the same times, noise and caption dropout
(`make_flow_batch`) and the same loss (`flow_forward`), with the base steered by the ControlNet in place of the
DiT. Checkpoints, resume, EMA, accumulation, mixed precision, DDP / FSDP2 come from the loop; only the
ControlNet is trained, wrapped and sharded.

Data: every sample needs a control image. Either the source gives one per image (a manifest's "control" path,
`NAME.control.png` beside `NAME.png` in a folder, see sana/data/sources.py), or `sana cache --control edges`
makes one from each image while caching (sana/data/control.py). Raw control images are encoded by the frozen
autoencoder of the base folder (or model.components) on the fly, as raw images are.

Export: `RUN/final/controlnet/` (config.json + diffusion_pytorch_model.safetensors, diffusers'
SanaControlNetModel layout; EMA weights when EMA is on), and when the base is a full model folder its parts
beside it, linked, with a model_index.json naming the controlnet: a SanaControlNetPipeline folder.
`sana generate --model RUN/final --control-image EDGES.png` draws with it, `--controlnet RUN/final` puts it
on another copy of the base.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from sana.config import read_config, read_json
from sana.errors import UserError
from sana.models.controlnet import ControlNetConfig, SanaControlNet
from sana.models.dit import DiTConfig, SanaDiT
from sana.samplers.guidance import ConditionedModel
from sana.training.config import FlowConfig, RunConfig, _check
from sana.training.distributed import DistContext
from sana.training.encoders import Encoders, resolve_null_text
from sana.training.step import FlowBatch, flow_forward, make_flow_batch, prepare_batch, step_generator
from sana.training.task import LossOutput, Run, Task, publish_folder, temporary_folder, trained_weights
from sana.types import Conditioning, TextEmbeddings
from sana.weights import CONFIG_NAME, CheckpointError, load_model, parse_dtype, save_model, write_json

# ------------------------------------------------------------------------------------------------- config


@dataclass(frozen=True)
class ControlModelConfig:
    """The frozen base and the ControlNet to train.

    base: a model folder in the diffusers layout or its Hub id (its `transformer/` is the base), or a transformer
    folder.
    num_layers: the ControlNet's blocks, copied from the base's first ones (1 to the base's blocks - 1).
    controlnet: an existing ControlNet folder (or a pipeline folder holding `controlnet/`) to train on instead
    of a fresh copy; its num_layers is its own. components: a model folder whose autoencoder and text encoder
    encode raw images and captions and complete the export; defaults to `base` when that is a full folder.
    """

    base: str
    num_layers: int | None = None
    controlnet: str | None = None
    components: str | None = None
    dtype: Literal["fp32", "bf16"] = "fp32"  # the ControlNet's master weights
    base_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen base (it only computes)
    encoders_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # the frozen autoencoder and text encoder
    export_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"  # of RUN/final/controlnet
    gradient_checkpointing: bool = False  # recompute each block (ControlNet and base) in backward

    def __post_init__(self) -> None:
        _check(
            (self.num_layers is None) != (self.controlnet is None),
            "model: set exactly one of model.num_layers (a new ControlNet from the base's first blocks) or "
            "model.controlnet (an existing ControlNet folder)",
        )


@dataclass(frozen=True, kw_only=True)
class ControlNetTrainConfig(RunConfig):
    """task: controlnet: a ControlNet for a frozen base DiT, flow matching on (image, caption, control image)."""

    task: Literal["controlnet"] = "controlnet"
    model: ControlModelConfig
    data: Any = field(default=None, metadata={"parse": "data"})  # sana.data.DataConfig
    flow: FlowConfig = field(default_factory=FlowConfig)


# ------------------------------------------------------------------------------------------------- model


def base_folder(base: str) -> Path:
    """model.base as a local folder: the folder itself, or a Hub id's snapshot (sana.pretrained.resolve_model_dir);
    a one-line CheckpointError naming model.base when it is neither."""
    from sana.pretrained import resolve_model_dir

    try:
        return resolve_model_dir(base)
    except CheckpointError as e:
        raise CheckpointError(f"model.base: {e}") from None


def transformer_folder(root: Path) -> Path:
    """The base's transformer folder: `root/transformer` for a model folder, else `root` itself."""
    return root / "transformer" if (root / "transformer").is_dir() else root


def load_base(cfg: ControlNetTrainConfig, root: Path) -> SanaDiT:
    """The frozen base DiT in float32 on the CPU (the ControlNet is copied from it before it is cast)."""
    base = load_model(SanaDiT, transformer_folder(root))
    base.requires_grad_(False)
    base.gradient_checkpointing = cfg.model.gradient_checkpointing
    return base.eval()


def build_controlnet(cfg: ControlNetTrainConfig, base: SanaDiT) -> SanaControlNet:
    """The ControlNet to train, in model.dtype on the CPU: a copy of the base's first blocks, or a loaded one."""
    m = cfg.model
    if m.controlnet is not None:
        from sana.pretrained import controlnet_dir

        net = load_model(SanaControlNet, controlnet_dir(m.controlnet))
        net.config.check_fits(base.config)
    else:
        net = SanaControlNet.from_transformer(base, m.num_layers)
    net = net.to(parse_dtype(m.dtype)).train()
    net.gradient_checkpointing = m.gradient_checkpointing
    return net.requires_grad_(True)


def components_folder(cfg: ControlNetTrainConfig, root: Path) -> Path | None:
    """The model folder holding the autoencoder and text encoder, if the run names one (`root`: the base's)."""
    if cfg.model.components:
        return Path(cfg.model.components)
    return root if (root / "model_index.json").is_file() else None


# -------------------------------------------------------------------------------------------------- data


def check_control_data(loader: Any, path: Any) -> None:
    """A one-line UserError, before any model loads, when a sana.data loader's samples lack control images."""
    from sana.data.cached import CachedSamples
    from sana.data.loader import RawImages

    source = getattr(loader, "source", None)
    hint = (
        'give each image a control image (a manifest\'s "control" path, or NAME.control.png beside NAME.png), '
        "or cache the images with one made from each: sana cache ... --control edges"
    )
    if isinstance(source, CachedSamples) and source.control is None:
        raise UserError(f"task controlnet needs control images, and the cache {path} has none: {hint}")
    if isinstance(source, RawImages):
        missing = [s.key for s in source.samples if s.control is None]
        if missing:
            raise UserError(
                f"task controlnet needs control images: {len(missing)} of {len(source.samples)} samples in "
                f"{path} have none (e.g. {missing[0]}); {hint}"
            )


def control_latents(batch: dict[str, Any], encoders: Encoders, device: torch.device) -> torch.Tensor:
    """The batch's control latents (B, C, h, w) float32 on `device`: cached, or raw control images encoded."""
    if "control_latents" in batch:
        return batch["control_latents"].to(device, torch.float32)
    if "control_images" not in batch:
        raise UserError(
            "a controlnet batch needs control images ('control_latents' cached or 'control_images' raw); got "
            f"keys {sorted(batch)}"
        )
    vae, _ = encoders()
    with torch.no_grad():
        images = batch["control_images"].to(device, next(vae.parameters()).dtype)
        return vae.encode(images).float()


@dataclass(frozen=True)
class ControlBatch:
    """Model-ready inputs of one micro-batch on this rank: the DiT task's, plus the control latents."""

    flow: FlowBatch
    control: torch.Tensor  # (B, C, h, w) float32, the control images' normalised latents


def steered_base(base: SanaDiT, controlnet: nn.Module, control: torch.Tensor) -> ConditionedModel:
    """The base DiT steered by the ControlNet being trained: `(x, t, cond) -> v`, what `flow_forward` calls.

    `controlnet` is the trained module as the loop wrapped it (DDP, FSDP2), called as a whole so gradients
    synchronise; the base computes in its own dtype."""
    dtype = next(base.parameters()).dtype

    def steered(x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        residuals = controlnet(x, t, cond, control.to(x.dtype))
        cond = replace(cond.to(dtype=dtype), residuals=tuple(r.to(dtype) for r in residuals))
        return base(x.to(dtype), t, cond)

    return steered


# ------------------------------------------------------------------------------------------------ export


def export_controlnet(run: Run, root: Path) -> Path | None:
    """Write RUN/final (module docstring); every rank calls it (gathering sharded weights is a collective)."""
    cfg: ControlNetTrainConfig = run.cfg
    weights = trained_weights(run.core, run.ema, cfg.checkpoint.export_ema)
    if not run.ctx.is_main:
        return None
    with torch.device("meta"):
        net = SanaControlNet(run.core.config)
    net.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    final = Path(cfg.run_dir) / "final"
    tmp = temporary_folder(final)
    save_model(net, tmp / "controlnet", dtype=parse_dtype(cfg.model.export_dtype))
    whole = (root / "model_index.json").is_file()
    if whole:
        link_base(root, tmp)
    publish_folder(tmp, final)
    run.logger.info(f"ControlNet -> {final / 'controlnet'}" + ("" if whole else " (the base is no model folder)"))
    return final


def link_base(base: Path, folder: Path) -> None:
    """The base model folder's parts in `folder` (hard links where possible) and a model_index.json that adds the
    ControlNet: what diffusers' SanaControlNetPipeline.save_pretrained writes."""
    from sana.training.checkpoint import _link_or_copy

    for part in sorted(p for p in base.iterdir() if p.name not in ("model_index.json", "controlnet")):
        if part.is_dir():
            shutil.copytree(part, folder / part.name, copy_function=_link_or_copy)
        else:
            _link_or_copy(str(part), str(folder / part.name))
    index = read_json(base / "model_index.json")
    index["_class_name"] = "SanaControlNetPipeline"
    index["controlnet"] = ["diffusers", SanaControlNet.diffusers_class_name]
    write_json(folder / "model_index.json", index)


# -------------------------------------------------------------------------------------------------- task


class ControlNetTask(Task):
    """task: controlnet. The frozen base lives here, beside the frozen encoders; the trained module (what the
    loop wraps, checkpoints and averages) is the ControlNet alone."""

    cfg: ControlNetTrainConfig

    def __init__(self, cfg: ControlNetTrainConfig, ctx: DistContext, resume: Path | None = None) -> None:
        super().__init__(cfg, ctx, resume)
        self.root = base_folder(cfg.model.base)  # a missing base fails first, before the data is read
        missing = (
            "raw images and control images need an autoencoder and text encoder: set model.base to a model folder "
            "(or model.components to one), or train on a `sana cache` folder"
        )
        self.encoders = Encoders(components_folder(cfg, self.root), ctx.device, cfg.model.encoders_dtype, missing)
        self.base: SanaDiT | None = None
        self.null_text: TextEmbeddings | None = None

    def build_data(self, data: Any) -> Any:
        loader = super().build_data(data)
        if data is None:
            check_control_data(loader, self.cfg.data.path)
        return loader

    def build_model(self) -> SanaControlNet:
        if self.cfg.model.num_layers is not None:  # a depth the base cannot take fails before any weight loads
            folder = transformer_folder(self.root)
            ControlNetConfig.from_dit(read_config(DiTConfig, folder / CONFIG_NAME), self.cfg.model.num_layers)
        base = load_base(self.cfg, self.root)
        net = build_controlnet(self.cfg, base)  # copied from the float32 base before it is cast
        self.base = base.to(self.ctx.device, parse_dtype(self.cfg.model.base_dtype))
        return net

    def describe(self) -> str:
        m = self.cfg.model
        start = f"from {m.controlnet}" if m.controlnet else f"from the first {m.num_layers} blocks of {m.base}"
        return f"resumed from {self.resume}" if self.resume else f"ControlNet {start}, base frozen"

    def start(self, run: Run) -> None:
        self.null_text = resolve_null_text(self.cfg, run.loader, self.encoders)

    def micro_batch(self, batch: dict[str, Any], step: int, micro: int) -> ControlBatch:
        """Encode (if raw), then draw the micro-batch's noise, times and caption dropout as the DiT task does."""
        device = self.ctx.device
        latents, text = prepare_batch(batch, self.encoders, device)
        control = control_latents(batch, self.encoders, device)
        generator = step_generator(self.cfg.seed, step, micro)
        ctx = self.ctx
        flow = make_flow_batch(latents, text, self.null_text, self.cfg.flow, generator, ctx.rank, ctx.world_size)
        return ControlBatch(flow, control)

    def batch_size(self, micro_batch: ControlBatch) -> int:
        return micro_batch.flow.x0.shape[0]

    def loss(self, model: nn.Module, micro_batch: ControlBatch, dtype: torch.dtype) -> LossOutput:
        steered = steered_base(self.base, model, micro_batch.control)
        return flow_forward(steered, micro_batch.flow, self.base.config.timestep_scale, dtype), {}

    def export(self, run: Run) -> dict[str, Path | None]:
        return {"final_model": export_controlnet(run, self.root)}


CONFIG = ControlNetTrainConfig  # the registry's names for this module's pieces (sana/training/tasks.py)
TASK = ControlNetTask
