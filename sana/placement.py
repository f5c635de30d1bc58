"""Where a pipeline's models live and run: the compute device and dtype, one policy per component, and how much
memory the pipeline may use there.

A pipeline is told its placement when it is built (`SanaPipeline.from_pretrained(device=, dtype=, offload=,
max_memory=)`) and never reads it back from its weights: quantized or offloaded weights say nothing reliable
about where the arithmetic happens. Inputs are moved to `device` and cast to `dtype` (the compute dtype) before
each model.

A policy says where a component rests and what running it costs:
  * `Resident`: it lives on the compute device for the pipeline's life. Using it moves nothing, so any number
    of calls may use it at the same time.
  * `Offloaded`: it rests on the CPU and visits the compute device while it runs, moved with `module.to` (the
    `--low-memory` mode for the text encoder; on a CPU-only machine it moves nothing).
  * `ModelOffload` (`offload="model"`): the same for every component, without copying weights back: the CPU
    copy stays where it is and the device copy is dropped after use, so a model costs one host-to-device copy
    per use. On CUDA the resting copy is pinned, which makes that copy fast.
  * `SequentialOffload` (`offload="sequential"`): block by block. While a model runs, only its small shared
    parts (embeddings, norms, the DiT's stems) sit on the device for the whole use; each block of its block
    lists (the DiT's `transformer_blocks`, Gemma's `layers`) is copied in by a forward pre-hook and dropped by a
    forward hook. The least memory and the most copying: the whole model crosses the bus once per forward.
Moving a module is a change every user sees, so an offloading policy lets one user at a time in (a lock):
concurrent calls wait for each other around that component instead of finding it moved under their feet. The
lock is re-entrant so one call may use two modules under one policy (a DiT and its ControlNet).

Memory: `Placement.headroom()` says how many more bytes a step may take on the compute device (the free memory
there, under `max_memory` if set); memory-aware decoding (`sana.generation.vae_tile_for`) reads it.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from sana.errors import UserError

COMPONENTS = ("text_encoder", "transformer", "vae")
OFFLOAD_MODES = ("model", "sequential")

# On the CPU the decode may take at most this share of the machine's physical memory unless --max-memory says
# otherwise: RAM is shared with everything else running, and a decode that pushes a machine into swap is far
# slower than a tiled one (tiling costs ~10 % of the decode time). A GPU's memory is the process's own, so
# there the whole free amount counts.
CPU_SHARE = 0.25


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


# ------------------------------------------------------------------------------------------ tensor swapping


def torch_module(obj: Any) -> nn.Module:
    """The nn.Module behind a component: itself, or a wrapper's `.model` (the `TextEncoder`)."""
    if isinstance(obj, nn.Module):
        return obj
    model = getattr(obj, "model", None)
    if isinstance(model, nn.Module):
        return model
    raise TypeError(f"cannot place a {type(obj).__name__}: not an nn.Module and no .model")


# (module, "_parameters" or "_buffers", name, the tensor to put back)
Saved = list[tuple[nn.Module, str, str, torch.Tensor]]


def _modules(root: nn.Module, skip: set[int]) -> Iterator[nn.Module]:
    """root and its submodules, without the subtrees of the modules whose ids are in `skip`."""
    if id(root) in skip:
        return
    yield root
    for child in root.children():
        yield from _modules(child, skip)


def _swap(root: nn.Module, fn, skip: set[int] = frozenset()) -> Saved:
    """Replace every parameter and buffer under `root` (outside `skip`) by fn(tensor), keeping what it replaced.

    The entries of `_parameters` / `_buffers` are swapped rather than `.data` assigned: that works for tensor
    subclasses too (torchao's quantized weights), and the original tensors stay untouched, so putting them back
    (`_restore`) costs nothing and loses nothing (a LoRA merged into the resting copy stays merged).
    """
    saved: Saved = []
    done: dict[int, torch.Tensor] = {}  # a tensor shared by two modules is converted once
    for module in _modules(root, set(skip)):
        for kind in ("_parameters", "_buffers"):
            table = getattr(module, kind)
            for name, tensor in list(table.items()):
                if tensor is None:
                    continue
                new = done.get(id(tensor))
                if new is None:
                    new = fn(tensor)
                    if isinstance(tensor, nn.Parameter):
                        new = nn.Parameter(new, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = new
                saved.append((module, kind, name, tensor))
                table[name] = new
    return saved


def _restore(saved: Saved) -> None:
    for module, kind, name, tensor in saved:
        getattr(module, kind)[name] = tensor


def _copy_to(device: torch.device):
    return lambda t: t.detach().to(device, non_blocking=True)


def _pin(t: torch.Tensor) -> torch.Tensor:
    """A page-locked copy of a CPU tensor (fast, asynchronous host-to-device copies), or the tensor itself where
    pinning is not possible (no CUDA driver, a tensor type without pin_memory)."""
    try:
        return t.detach().pin_memory()
    except Exception:  # best effort: an unpinned copy is only slower to send
        return t


def block_units(module: nn.Module) -> list[nn.Module]:
    """The blocks a sequential offload moves one at a time: the elements of the module's top-level ModuleLists
    (the DiT's and ControlNet's `transformer_blocks` and `controlnet_blocks`, Gemma's `layers`). Each is called
    through its own forward, which is what the hooks need; everything else is the trunk."""
    return [unit for child in module.children() if isinstance(child, nn.ModuleList) for unit in child]


@dataclass(frozen=True)
class ModelOffload:
    """At rest on `rest` (the CPU); while in use, a copy on the compute device, dropped afterwards."""

    device: torch.device
    rest: torch.device = torch.device("cpu")
    lock: threading.RLock = field(default_factory=threading.RLock, compare=False, repr=False)

    def place(self, module: Any) -> None:
        root = torch_module(module)
        root.to(self.rest)
        if self.device.type == "cuda" and self.rest.type == "cpu":
            _swap(root, _pin)  # the returned originals are simply dropped: the pinned copies replace them

    @contextmanager
    def use(self, module: Any) -> Iterator[Any]:
        with self.lock:
            saved = _swap(torch_module(module), _copy_to(self.device))
            try:
                yield module
            finally:
                _restore(saved)


@dataclass(frozen=True)
class SequentialOffload(ModelOffload):
    """At rest on `rest`; while in use, the trunk on the device and each block only during its own forward."""

    @contextmanager
    def use(self, module: Any) -> Iterator[Any]:
        root = torch_module(module)
        units = block_units(root)
        with self.lock:
            trunk = _swap(root, _copy_to(self.device), skip={id(u) for u in units})
            inside: dict[int, Saved] = {}

            def arrive(unit: nn.Module, args: Any) -> None:
                inside[id(unit)] = _swap(unit, _copy_to(self.device))

            def leave(unit: nn.Module, args: Any, output: Any) -> None:
                _restore(inside.pop(id(unit), []))

            hooks = [
                h for u in units for h in (u.register_forward_pre_hook(arrive), u.register_forward_hook(leave))
            ]
            try:
                yield module
            finally:
                for handle in hooks:
                    handle.remove()
                for saved in inside.values():  # a block whose forward raised
                    _restore(saved)
                _restore(trunk)


# ------------------------------------------------------------------------------------------------- memory

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12}
_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_memory(size: int | float | str | None) -> int | None:
    """Bytes from 8000000000, "8GB" (10^9), "7.5GiB" (2^30), "512MiB", "512M"; None stays None."""
    if size is None:
        return None
    if isinstance(size, bool):
        raise UserError(f"a memory size must be a number of bytes or a string like 8GB, got {size!r}")
    if isinstance(size, int | float):
        value = float(size)
    else:
        found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(size))
        unit = found.group(2).lower() if found else None
        if unit not in _UNITS:
            raise UserError(f"cannot read memory size {size!r}: write it like 8GB, 7.5GiB or 512MB")
        value = float(found.group(1)) * _UNITS[unit]
    if value <= 0:
        raise UserError(f"a memory size must be positive, got {size!r}")
    return int(value)


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(bytes free for new tensors, bytes this process already holds) on `device`; None where torch cannot say.

    CPU: the kernel's available memory (psutil) and this process's resident set. CUDA: the driver's free memory
    plus what torch's caching allocator holds unused, and what torch has allocated."""
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available, psutil.Process().memory_info().rss
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        allocated, reserved = torch.cuda.memory_allocated(index), torch.cuda.memory_reserved(index)
        return free + reserved - allocated, allocated
    return None


# ------------------------------------------------------------------------------------------------ placement


@dataclass(frozen=True)
class Placement:
    """The compute device and dtype of a pipeline, each component's policy, and its memory budget.

    dtype is what the DiT computes in (text embeddings and latents are cast to it); the autoencoder decodes in
    `vae_dtype` when that is set (a training run's validation pairs a float32 DiT with bfloat16 encoders).
    max_memory: bytes the whole process may hold on the compute device (RAM on the CPU); None: what is free.
    """

    device: torch.device
    dtype: torch.dtype
    policies: dict[str, Policy]
    vae_dtype: torch.dtype | None = None
    max_memory: int | None = None

    @property
    def decode_dtype(self) -> torch.dtype:
        return self.vae_dtype or self.dtype

    @classmethod
    def build(
        cls,
        device: torch.device | str,
        dtype: torch.dtype,
        offload: str | Sequence[str] | None = (),
        vae_dtype: torch.dtype | None = None,
        max_memory: int | float | str | None = None,
    ) -> Placement:
        """Every component resident on `device`, except as `offload` says:
          * "model": every component rests on the CPU and visits the device while it runs (`ModelOffload`);
          * "sequential": the text encoder and the DiT visit block by block, the autoencoder whole
            (`SequentialOffload`; its tiled decode reads weights outside the blocks' forwards);
          * a sequence of component names: those rest on the CPU and move whole with `.to` (`Offloaded`, the
            `--low-memory` text encoder).
        "model" and "sequential" need a compute device other than the CPU: there is nowhere to offload to."""
        device = torch.device(device)
        budget = parse_memory(max_memory)
        if offload is None:
            offload = ()
        if isinstance(offload, str):
            if offload not in OFFLOAD_MODES:
                raise UserError(f"unknown offload mode {offload!r}; choose one of {', '.join(OFFLOAD_MODES)}")
            if device.type == "cpu":
                raise UserError(
                    f"offload {offload!r} moves models between the CPU and an accelerator, but the compute device "
                    "is the CPU: there is nothing to offload (drop the offload, or compute on e.g. cuda)"
                )
            if offload == "model":
                policies = {c: ModelOffload(device) for c in COMPONENTS}
            else:
                policies = {c: SequentialOffload(device) for c in ("text_encoder", "transformer")}
                policies["vae"] = ModelOffload(device)
            return cls(device, dtype, policies, vae_dtype, budget)
        bad = sorted(set(offload) - set(COMPONENTS))
        if bad:
            raise UserError(f"cannot offload {', '.join(bad)}; the components are {', '.join(COMPONENTS)}")
        policies = {c: Offloaded(device) if c in offload else Resident(device) for c in COMPONENTS}
        return cls(device, dtype, policies, vae_dtype, budget)

    @property
    def offloaded(self) -> tuple[str, ...]:
        return tuple(c for c, p in self.policies.items() if not isinstance(p, Resident))

    def place(self, component: str, module: nn.Module) -> None:
        self.policies[component].place(module)

    def use(self, component: str, module: nn.Module) -> contextmanager:
        """`with placement.use("vae", vae): ...` runs `vae` where its policy says."""
        return self.policies[component].use(module)

    def headroom(self) -> int | None:
        """Bytes a step may still take on the compute device: what is free there, capped by `max_memory` minus
        what this process already holds; on the CPU, without `max_memory`, by CPU_SHARE of the physical memory
        (see its comment). None where the device does not say (then callers fall back to fixed rules)."""
        memory = device_memory(self.device)
        if memory is None:
            return self.max_memory
        free, held = memory
        if self.max_memory is not None:
            return max(0, min(free, self.max_memory - held))
        if self.device.type == "cpu":
            import psutil

            return int(min(free, CPU_SHARE * psutil.virtual_memory().total))
        return free
