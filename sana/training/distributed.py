"""Process groups and model wrapping: one process per device, launched by torchrun.

`torchrun --nproc-per-node K -m sana train run.yaml` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; without them (a plain `sana train`) everything here degrades to single-process no-ops, so the
training loop has one code path.

Strategies (distributed.strategy):
  * ddp  - every rank holds the whole model; gradients are averaged by all-reduce during backward.
  * fsdp - FSDP2 (`torch.distributed.fsdp.fully_shard`): each transformer block, then the root, is sharded
           across ranks; parameters are all-gathered per block for compute and gradients reduce-scattered.
Both average gradients over ranks, so with the same global batch they take the same optimizer step as one
process would (up to float summation order); tests/training/test_distributed.py checks that on CPU/gloo.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from sana.training.config import DistributedConfig


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    strategy: str = "none"  # "none" | "ddp" | "fsdp"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def init_distributed(cfg: DistributedConfig, device: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment, or run single-process without one."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size == 1:
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if dev.type == "cuda" else "gloo")
    if not dist.is_initialized():
        # A long timeout: rank 0 alone draws validation images and writes checkpoints while the others wait.
        dist.init_process_group(backend, timeout=timedelta(minutes=60))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, dev, cfg.strategy)


def close_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, ctx: DistContext) -> nn.Module:
    """The module the loop trains: the model itself, a DDP wrapper, or the model sharded in place by FSDP2."""
    if ctx.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # The depthwise Mix-FFN kernel (C, 1, 3, 3) gets its gradient with a different stride in the size-1
        # dimension only, which DDP reports as a layout mismatch; no memory layout actually differs.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        # gradient_as_bucket_view: gradients live in the all-reduce buckets (no second copy of them).
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One unit per block so only one block's full parameters are materialised at a time, then the root
        # for the stems and the final layer. Every rank must start from identical weights (seeded init or a
        # loaded checkpoint): each keeps its own slice of what it holds.
        for block in model.transformer_blocks:
            fully_shard(block)
        fully_shard(model)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The SanaDiT inside a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if hasattr(model, "module") else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce for the micro-batches before the last one of an accumulation."""
    if enabled:
        yield
    elif hasattr(model, "no_sync"):  # DDP
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


def mean_over_ranks(value: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean of a scalar tensor over all ranks (itself when single-process)."""
    if not ctx.enabled:
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / ctx.world_size


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_object(obj, ctx: DistContext):
    """Rank 0's value of a picklable object, on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly FSDP-sharded DTensor) parameter; a collective for DTensors."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
