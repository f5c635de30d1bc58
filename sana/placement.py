"""Where a pipeline's models live and run: the compute device and dtype, and one policy per component.

A pipeline is told its placement when it is built (`SanaPipeline.from_pretrained(device=, dtype=, offload=)`)
and never reads it back from its weights: quantized or offloaded weights say nothing reliable about where the
arithmetic happens. Inputs are moved to `device` and cast to `dtype` (the compute dtype) before each model.

A policy says where a component rests and what running it costs:
  * `Resident`: it lives on the compute device for the pipeline's life. Using it moves nothing, so any number
    of calls may use it at the same time.
  * `Offloaded`: it rests on the CPU and visits the compute device only while it runs (the low-memory mode for
    the text encoder). Moving a module is a change every user sees, so a policy instance lets one user at a
    time in (a lock): concurrent calls wait for each other around that component instead of finding it moved
    under their feet.
New policies (offloading every model, block by block, ...) are new classes with the same two methods.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from sana.errors import UserError

COMPONENTS = ("text_encoder", "transformer", "vae")


class Policy(Protocol):
    def place(self, module: nn.Module) -> None:
        """Move `module` to where it rests (once, when the pipeline is built)."""

    def use(self, module: nn.Module) -> contextmanager:
        """A context in which `module` is on the compute device and may run."""


@dataclass(frozen=True)
class Resident:
    """On the compute device for good; safe to use from any number of calls at once."""

    device: torch.device

    def place(self, module: nn.Module) -> None:
        module.to(self.device)

    @contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        yield module


@dataclass(frozen=True)
class Offloaded:
    """On the CPU at rest, on the compute device while in use; one user at a time."""

    device: torch.device
    lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def place(self, module: nn.Module) -> None:
        module.to("cpu")

    @contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        with self.lock:
            module.to(self.device)
            try:
                yield module
            finally:
                module.to("cpu")


@dataclass(frozen=True)
class Placement:
    """The compute device and dtype of a pipeline, and each component's policy.

    dtype is what the DiT computes in (text embeddings and latents are cast to it); the autoencoder decodes in
    `vae_dtype` when that is set (a training run's validation pairs a float32 DiT with bfloat16 encoders).
    """

    device: torch.device
    dtype: torch.dtype
    policies: dict[str, Policy]
    vae_dtype: torch.dtype | None = None

    @property
    def decode_dtype(self) -> torch.dtype:
        return self.vae_dtype or self.dtype

    @classmethod
    def build(
        cls,
        device: torch.device | str,
        dtype: torch.dtype,
        offload: tuple[str, ...] | list[str] = (),
        vae_dtype: torch.dtype | None = None,
    ) -> Placement:
        """Every component resident on `device`, except those named in `offload` (rest on the CPU)."""
        device = torch.device(device)
        bad = sorted(set(offload) - set(COMPONENTS))
        if bad:
            raise UserError(f"cannot offload {', '.join(bad)}; the components are {', '.join(COMPONENTS)}")
        policies = {c: Offloaded(device) if c in offload else Resident(device) for c in COMPONENTS}
        return cls(device, dtype, policies, vae_dtype)

    @property
    def offloaded(self) -> tuple[str, ...]:
        return tuple(c for c, p in self.policies.items() if isinstance(p, Offloaded))

    def place(self, component: str, module: nn.Module) -> None:
        self.policies[component].place(module)

    def use(self, component: str, module: nn.Module) -> contextmanager:
        """`with placement.use("vae", vae): ...` runs `vae` where its policy says."""
        return self.policies[component].use(module)
