"""The Euler method on the rectified-flow ODE dx/dsigma = v(x, sigma) (the "flow-euler" sampler).

    x <- x + (sigma_next - sigma) v(x, sigma)

First order, one model call per step. Straight paths (constant v along a trajectory) are integrated
exactly, which is what rectified-flow training aims for. Matches diffusers' FlowMatchEulerDiscreteScheduler
step for step when given `euler_flow_sigmas` (float32 arithmetic, dt = sigma_next - sigma first).

Time contract: as in dpm_solver.py, the update uses `sigmas` and the velocity function is called as
velocity_fn(x, t) with t a (B,) tensor holding `model_times[i]`, by default sigmas[i]. The reference
pipeline shows its model float timesteps sigma * 1000 computed in float32 (not truncated), i.e.
model_times = sigmas.float()[:-1] * 1000.
"""

from __future__ import annotations

import torch

from sana.samplers.common import (
    Callback,
    Sampler,
    Schedule,
    StepInfo,
    check_schedule,
    continue_from,
    step_range,
    time_batch,
    working_dtype,
)
from sana.samplers.schedules import euler_flow_sigmas
from sana.types import VelocityFn


def sample_euler(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    model_times: torch.Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from x at sigmas[0] down the schedule `sigmas` (steps + 1,) and return the final sample.

    model_times: (steps,) values handed to velocity_fn as t (default: sigmas[:-1]).
    Returns a tensor in float32 (float64 if x is float64).
    """
    dtype = working_dtype(x)
    sigmas, model_times = check_schedule(sigmas, model_times, dtype)
    steps = sigmas.numel() - 1
    x = x.to(dtype)
    for i in step_range(steps, progress, "euler"):
        s, s_next = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, time_batch(model_times[i], x)).to(dtype)
        denoised = x - s * v if callback is not None else None  # only previews need it
        x = x + (s_next - s) * v
        if callback is not None:
            x = continue_from(callback(StepInfo(index=i, total=steps, t=float(s), x=x, denoised=denoised)), x)
    return x


def euler_schedule(steps: int, *, shift: float, timestep_scale: float = 1.0, **_: object) -> Schedule:
    """The published Flow-Euler run: `euler_flow_sigmas`, the model seeing float32 1000 sigma x timestep_scale."""
    sigmas = euler_flow_sigmas(steps, shift)
    return Schedule(sigmas, sigmas[:-1].float() * 1000 * timestep_scale)


def run_euler(velocity_fn: VelocityFn, x: torch.Tensor, schedule: Schedule, **kw: object) -> torch.Tensor:
    kw.pop("generator", None)  # deterministic
    return sample_euler(velocity_fn, x, schedule.times, model_times=schedule.model_times, **kw)


SAMPLER = Sampler("Flow-Euler", sample_euler, euler_schedule, run_euler)
