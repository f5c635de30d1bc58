"""What the samplers share: the schedule value, the registry entry type, the per-step record given to callbacks,
input checks, the step loop's progress bar."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from sana.errors import UserError


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


# A callback sees each step's StepInfo. It may return a tensor shaped like StepInfo.x for the sampler to continue
# from instead (the sampler's history is kept): how inpainting puts the kept region back on its noised path
# after every step. Returning None changes nothing.
Callback = Callable[[StepInfo], torch.Tensor | None]


def continue_from(replacement: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """The state a sampler continues from after its callback: the callback's tensor, else x."""
    if replacement is None:
        return x
    if replacement.shape != x.shape:
        raise ValueError(f"a callback returned shape {tuple(replacement.shape)} for a state of {tuple(x.shape)}")
    return replacement.to(device=x.device, dtype=x.dtype)


TIME_SPACES = ("flow", "trigflow")


@dataclass(frozen=True)
class Schedule:
    """Where a sampler goes, from noise to data, and what the model is shown on the way.

    times        (steps + 1,) the sampler's own time variable, decreasing, ending at 0: flow sigma for "flow"
                 samplers, the TrigFlow angle for "trigflow" ones (scm.py)
    model_times  (steps,) the number the model receives as its timestep at each step, already in the model's
                 units (for the published checkpoints: trunc(1000 sigma) or 1000 sigma, times the DiT's
                 timestep_scale); None when the sampler derives it from `times` itself (scm)
    space        how `times` mixes data and noise: "flow" x = (1 - t) x0 + t eps; "trigflow" x = cos(t) x0 +
                 sin(t) eps (the sampler's state; its TrigFlow data are x0 times `sigma_data`)

    The schedules are built once per call by the sampler's registry entry, so the model's times are made in one
    place. Slicing keeps the tail of a run: `last(n)` is the last n steps with their model times, which is how
    img2img starts part-way (`for_strength`).
    """

    times: torch.Tensor
    model_times: torch.Tensor | None = None
    space: str = "flow"
    sigma_data: float = 1.0

    def __post_init__(self) -> None:
        if self.space not in TIME_SPACES:
            raise ValueError(f"schedule space must be one of {TIME_SPACES}, got {self.space!r}")
        if self.times.ndim != 1 or self.times.numel() < 2:
            raise ValueError(f"a schedule needs (steps + 1,) times with steps >= 1, got {tuple(self.times.shape)}")
        if self.model_times is not None and self.model_times.shape != (self.steps,):
            raise ValueError(f"model_times must be ({self.steps},), got {tuple(self.model_times.shape)}")

    @property
    def steps(self) -> int:
        return self.times.numel() - 1

    def last(self, n: int) -> Schedule:
        """The last `n` steps (1 <= n <= steps): the same times and model times, started later."""
        if not 1 <= n <= self.steps:
            raise UserError(f"can keep 1 to {self.steps} steps of this schedule, not {n}")
        model_times = None if self.model_times is None else self.model_times[self.steps - n :]
        return Schedule(self.times[self.steps - n :], model_times, self.space, self.sigma_data)

    def for_strength(self, strength: float) -> Schedule:
        """The steps an img2img run of this strength takes: the last ceil(strength * steps), at least one.

        strength 1 is the whole schedule (from noise); a small strength starts close to the data.
        """
        if not 0 < strength <= 1:
            raise UserError(f"strength must be in (0, 1], got {strength!r}")
        # The tolerance keeps float products such as 0.3 * 10 = 3.0000000000000004 from taking a step more.
        return self.last(max(1, math.ceil(strength * self.steps - 1e-9)))

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, index: int = 0) -> torch.Tensor:
        """The clean latent x0 noised to times[index] (default: the start), in the units of the sampler's state
        (StepInfo.x after step index - 1 is at times[index]); float32."""
        t = self.times[index].to(torch.float32)
        x0, noise = x0.float(), noise.float()
        if self.space == "flow":
            return (1 - t) * x0 + t * noise
        # TrigFlow's data is sigma_data x the latent and its state is kept divided by sigma_data (scm.py):
        # z / sigma_data = cos(t) latent + sin(t) eps.
        return torch.cos(t) * x0 + torch.sin(t) * noise


SampleFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    """One entry of the samplers' registry (sana/samplers/__init__.py).

    label     the sampler's name in docs and help ("Flow-DPM-Solver")
    function  the pure sampler, sample_<name>(velocity_fn, x, times, ...); calling the entry calls it
    schedule  (steps, *, shift, sigma_data, timestep_scale) -> Schedule: the times this sampler was made for,
              shift being the model's flow shift and timestep_scale its DiT's
    run       (velocity_fn, x, schedule, *, generator, callback, progress) -> final latent: the function
              driven by a Schedule (the pipeline's one way to sample)
    """

    label: str
    function: SampleFn
    schedule: Callable[..., Schedule]
    run: Callable[..., torch.Tensor]

    def __call__(self, *args, **kwargs) -> torch.Tensor:
        return self.function(*args, **kwargs)


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
