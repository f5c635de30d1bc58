"""What the samplers share: the per-step record given to callbacks, input checks, the step loop's progress bar."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepInfo:
    """Handed to a sampler's `callback` once per step, after the step.

    `t` is the flow time (sigma, 1 = noise) at which the step evaluated the model, `x` the sampler's state
    after the step and `denoised` the step's estimate of the clean sample (what a preview would decode).
    """

    index: int  # 0-based step number
    total: int  # number of steps in this run
    t: float
    x: torch.Tensor
    denoised: torch.Tensor


Callback = Callable[[StepInfo], None]


def working_dtype(x: torch.Tensor) -> torch.dtype:
    """Samplers compute in float32 (half-precision inputs are upcast, as the reference does); float64 stays."""
    return torch.promote_types(x.dtype, torch.float32)


def check_schedule(
    sigmas: torch.Tensor, model_times: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (steps + 1,) schedule and the optional (steps,) model times; return both in `dtype`.

    Without `model_times` the model sees the flow times sigmas[:-1] themselves.
    """
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D (steps + 1,) schedule with steps >= 1, got {tuple(sigmas.shape)}")
    sigmas = sigmas.detach().to(device="cpu", dtype=dtype)
    if model_times is None:
        return sigmas, sigmas[:-1]
    if model_times.shape != (sigmas.numel() - 1,):
        raise ValueError(
            f"model_times must have one entry per step, shape ({sigmas.numel() - 1},); "
            f"got {tuple(model_times.shape)}"
        )
    return sigmas, model_times.detach().to(dtype=dtype)


def time_batch(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A scalar time as the (B,) tensor a velocity function receives, on x's device."""
    return t.to(device=x.device).expand(x.shape[0]).clone()  # (B,)


def step_range(steps: int, progress: bool, desc: str) -> Iterable[int]:
    if not progress:
        return range(steps)
    from tqdm.auto import tqdm  # only loaded when a bar is wanted

    return tqdm(range(steps), desc=desc)
