"""One optimizer step of flow-matching training, and the batch preparation in front of it.

    data batch --prepare_batch--> (latents, text) --make_flow_batch--> FlowBatch(x0, text, noise, t)
    [FlowBatch] * grad_accum_steps --train_step--> metrics {loss, grad_norm}

Randomness. Everything random in a step (times, caption dropout, noise) is drawn from a generator seeded by
(seed, step, micro-batch) for the whole *global* micro-batch, of which each rank keeps its own rows. So
  * a resumed run draws exactly what the uninterrupted run drew (no generator state to carry), and
  * K ranks with batch b draw, row for row, what one process with batch K*b draws: multi-GPU training is the
    same computation as single-process training with the same global batch.
The draws are made on the CPU (as the pipeline's noise is), so they do not depend on the device either.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sana.flow import dit_timesteps, flow_loss, interpolate, sample_times, velocity_target
from sana.training.config import FlowConfig
from sana.training.distributed import DistContext, gradient_sync, mean_over_ranks
from sana.types import Conditioning, TextEmbeddings

MIXED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class NonFiniteLossError(FloatingPointError):
    """The loss (or the gradient norm) became NaN or infinite: training has diverged."""


@dataclass(frozen=True)
class FlowBatch:
    """Model-ready inputs of one micro-batch on this rank."""

    x0: torch.Tensor  # (B, C, h, w) clean normalised latents, float32
    text: TextEmbeddings  # (B, L, C_text), after caption dropout
    noise: torch.Tensor  # (B, C, h, w)
    t: torch.Tensor  # (B,) flow times in (0, 1)


# --------------------------------------------------------------------------------------------- preparation


def prepare_batch(
    batch: dict[str, Any], encoders: Any, device: torch.device
) -> tuple[torch.Tensor, TextEmbeddings]:
    """A data batch -> (normalised latents (B, C, h, w) float32, text embeddings), both on `device`.

    Cached batches carry latents and embeddings; raw batches (images in [-1, 1] and captions) are encoded
    here by the frozen autoencoder and text encoder (`encoders()` returns them, loading them on first use).
    """
    if "latents" in batch:
        text = TextEmbeddings(batch["text_hidden"], batch["text_mask"])
        return batch["latents"].to(device, torch.float32), text.to(device)
    if "images" not in batch:
        raise ValueError(f"a data batch needs 'latents' (cached) or 'images' (raw); got keys {sorted(batch)}")
    vae, text_encoder = encoders()
    with torch.no_grad():
        images = batch["images"].to(device, next(vae.parameters()).dtype)
        latents = vae.encode(images).float()  # (B, C, H/f, W/f)
        text = text_encoder.encode(list(batch["captions"]))
    return latents, text.to(device)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, micro-batch index), well mixed by SeedSequence."""
    state = np.random.SeedSequence([seed, step, micro]).generate_state(2, dtype=np.uint32)
    return torch.Generator("cpu").manual_seed(int(state[0]) << 32 | int(state[1]))


def drop_captions(text: TextEmbeddings, null: TextEmbeddings, drop: torch.Tensor) -> TextEmbeddings:
    """Rows where `drop` (B,) is True get the empty-prompt embedding `null` (1, L0, C), cut or padded to L.

    Padding adds masked-out zeros and cutting removes only padding (the empty prompt is one <bos> token), so
    the model sees exactly what the sampler's unconditional branch shows it.
    """
    if not bool(drop.any()):
        return text
    length = text.hidden.shape[1]
    null = TextEmbeddings(null.hidden.to(text.hidden.device, text.hidden.dtype), null.mask.to(text.mask.device))
    null = TextEmbeddings.cat([null, TextEmbeddings(text.hidden[:1, :length], text.mask[:1, :length])])
    hidden, mask = null.hidden[:1, :length], null.mask[:1, :length]  # (1, L, C), (1, L)
    drop = drop.to(text.hidden.device)
    return TextEmbeddings(
        torch.where(drop[:, None, None], hidden.to(text.hidden.dtype), text.hidden),
        torch.where(drop[:, None], mask.to(text.mask.dtype), text.mask),
    )


def make_flow_batch(
    latents: torch.Tensor,
    text: TextEmbeddings,
    null_text: TextEmbeddings | None,
    cfg: FlowConfig,
    generator: torch.Generator,
    rank: int = 0,
    world_size: int = 1,
) -> FlowBatch:
    """Draw t, caption dropout and noise for the global micro-batch and keep this rank's rows."""
    b = latents.shape[0]
    n = b * world_size
    rows = slice(rank * b, (rank + 1) * b)
    t = sample_times(n, logit_mean=cfg.logit_mean, logit_std=cfg.logit_std, shift=cfg.shift, generator=generator)
    drop = torch.rand(n, generator=generator) < cfg.caption_dropout  # (n,)
    noise = torch.randn((n, *latents.shape[1:]), generator=generator)  # (n, C, h, w)
    drop = drop[rows]
    if cfg.caption_dropout > 0:
        if null_text is None:
            raise ValueError("caption dropout needs the empty-prompt embedding, and none is available")
        text = drop_captions(text, null_text, drop)
    return FlowBatch(latents, text, noise[rows].to(latents.device), t[rows].to(latents.device))


# ---------------------------------------------------------------------------------------------------- step


def flow_forward(model: nn.Module, batch: FlowBatch, timestep_scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The flow-matching loss of one micro-batch (sana/flow.py)."""
    x_t = interpolate(batch.x0, batch.noise, batch.t)  # (B, C, h, w)
    target = velocity_target(batch.x0, batch.noise)  # (B, C, h, w)
    cond = Conditioning(batch.text.to(dtype=dtype))
    prediction = model(x_t.to(dtype), dit_timesteps(batch.t, timestep_scale), cond)
    return flow_loss(prediction, target)


LossFn = Callable[[nn.Module, Any, torch.dtype], tuple[torch.Tensor, dict[str, torch.Tensor]]]


def train_step(
    model: nn.Module,
    micro_batches: list[Any],
    optimizer: torch.optim.Optimizer,
    *,
    loss_fn: LossFn | None = None,
    timestep_scale: float = 1.0,
    mixed: str = "no",
    grad_clip: float = 0.0,
    scaler: torch.amp.GradScaler | None = None,
    ctx: DistContext | None = None,
) -> dict[str, float]:
    """Forward/backward over the micro-batches (accumulating), clip, step. Returns {loss, grad_norm, ...}.

    loss_fn(model, micro_batch, weight_dtype) -> (objective, metrics) computes one micro-batch's loss (the
    task's `loss`, see task.py); None: the flow-matching loss of `FlowBatch`es with `timestep_scale`. The
    reported `loss` is metrics["loss"] (else the objective) and every metric is the mean over micro-batches
    and ranks. Raises NonFiniteLossError *before* the optimizer step when the objective, the reported loss
    or (without fp16 loss scaling) the gradient norm is not finite, so the weights stay those of the last
    good step; every rank sees the same values and stops together.
    """
    ctx = ctx or DistContext()
    if loss_fn is None:
        loss_fn = lambda m, batch, dtype: (flow_forward(m, batch, timestep_scale, dtype), {})
    param = next(model.parameters())
    device, weight_dtype = param.device, param.dtype
    autocast = (
        torch.autocast(device.type, dtype=MIXED_DTYPES[mixed]) if mixed != "no" else contextlib.nullcontext()
    )
    n = len(micro_batches)
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == n - 1
        with gradient_sync(model, enabled=last), autocast:
            raw, metrics = loss_fn(model, batch, weight_dtype)
            objective = raw / n
        (scaler.scale(objective) if scaler is not None else objective).backward()
        metrics = {"objective": raw, "loss": raw, **metrics}
        for key, value in metrics.items():
            sums[key] = sums.get(key, torch.zeros((), device=device)) + value.detach().float().to(device) / n
    # One all-reduce for every metric (they are scalars): the values every rank reports and checks agree.
    names = sorted(sums)
    means = mean_over_ranks(torch.stack([sums[k] for k in names]), ctx).tolist()
    values = dict(zip(names, means, strict=True))
    objective_value, loss_value = values.pop("objective"), values["loss"]

    if scaler is not None:
        scaler.unscale_(optimizer)  # clip and report the true gradient norm, not the scaled one
    norm = nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    norm_value = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    # With fp16 loss scaling an infinite gradient is routine (the scaler skips the step and lowers its
    # scale); only a non-finite loss means divergence there.
    bad_norm = scaler is None and not np.isfinite(norm_value)
    if not (np.isfinite(loss_value) and np.isfinite(objective_value)) or bad_norm:
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(f"loss {loss_value}, gradient norm {norm_value}")
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {**values, "grad_norm": norm_value}
