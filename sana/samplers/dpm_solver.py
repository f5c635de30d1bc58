"""DPM-Solver++(2M) on a rectified-flow model: the default sampler of the published Sana pipelines.

Implements the multistep second-order data-prediction solver of Lu et al., "DPM-Solver++: Fast Solver for
Guided Sampling of Diffusion Probabilistic Models" (2022), Algorithm 2, with the midpoint form of the
correction, written for the flow parametrisation:

    x_sigma = alpha x0 + sigma eps,   alpha = 1 - sigma,   lambda = log(alpha) - log(sigma)
    data prediction from the velocity v = eps - x0:   D = x - sigma v

For a step from sigma_s to sigma_t with h = lambda_t - lambda_s the exact solution of the probability-flow
ODE, with D frozen at its value at s, is

    x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D_s                       (first order)

and the multistep method adds a finite-difference estimate of dD/dlambda from the previous step:

    r = (lambda_s - lambda_prev) / h,   D1 = (D_s - D_prev) / r
    x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) (D_s + D1 / 2)             (second order)

Step order: the first step is first order (no history yet). The last step is first order too when it ends
at sigma = 0, where the formula collapses to x_t = D_s, or when there are fewer than 15 steps (the
reference's "lower order final" rule for short runs). Scalars are computed in float32 with exp(-h) - 1
(not expm1) in the reference's operation order, so the trajectory matches diffusers'
DPMSolverMultistepScheduler bit for bit on CPU.

Time contract: the solver's arithmetic uses `sigmas`; the velocity function is called as
velocity_fn(x, t) with t a (B,) tensor holding `model_times[i]`, which defaults to sigmas[i]. To drive a
published checkpoint exactly as the reference does, pass model_times=model_timesteps(sigmas) (the
truncated integer timesteps) and a velocity function that takes those.
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
from sana.samplers.schedules import dpm_flow_sigmas, model_timesteps
from sana.types import VelocityFn

# Below this many steps the final step drops to first order even if it does not end at sigma = 0.
LOWER_ORDER_FINAL_BELOW = 15


def _log_snr(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma; +inf at sigma = 0, -inf at sigma = 1."""
    return torch.log(1 - sigma) - torch.log(sigma)


def sample_dpm_solver(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    model_times: torch.Tensor | None = None,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate from x at sigmas[0] down the schedule `sigmas` (steps + 1,) and return the final sample.

    model_times: (steps,) values handed to velocity_fn as t (default: sigmas[:-1]); see the module docstring.
    Returns a tensor in float32 (float64 if x is float64).
    """
    dtype = working_dtype(x)
    sigmas, model_times = check_schedule(sigmas, model_times, dtype)
    steps = sigmas.numel() - 1
    x = x.to(dtype)
    x0_prev = None  # the previous step's data prediction, the solver's only history
    for i in step_range(steps, progress, "dpm-solver++"):
        s, t = sigmas[i], sigmas[i + 1]
        v = velocity_fn(x, time_batch(model_times[i], x)).to(dtype)
        x0 = x - s * v  # data prediction D_s
        last = i == steps - 1
        if last and t == 0:
            x_next = x0  # the first-order step to sigma = 0 is exactly D_s
        else:
            h = _log_snr(t) - _log_snr(s)
            phi = (1 - t) * (torch.exp(-h) - 1.0)  # alpha_t (e^-h - 1), a 0-d tensor
            if x0_prev is None or (last and steps < LOWER_ORDER_FINAL_BELOW):
                x_next = (t / s) * x - phi * x0
            else:
                r = (_log_snr(s) - _log_snr(sigmas[i - 1])) / h
                d1 = (1.0 / r) * (x0 - x0_prev)  # dD/dlambda * h, from the last two predictions
                x_next = (t / s) * x - phi * x0 - 0.5 * phi * d1
        x, x0_prev = x_next, x0
        if callback is not None:
            x = continue_from(callback(StepInfo(index=i, total=steps, t=float(s), x=x, denoised=x0)), x)
    return x


def dpm_schedule(steps: int, *, shift: float, timestep_scale: float = 1.0, **_: object) -> Schedule:
    """The published Flow-DPM-Solver run: `dpm_flow_sigmas`; the model sees trunc(1000 sigma) x timestep_scale."""
    sigmas = dpm_flow_sigmas(steps, shift)
    return Schedule(sigmas, model_timesteps(sigmas) * timestep_scale)


def run_dpm_solver(velocity_fn: VelocityFn, x: torch.Tensor, schedule: Schedule, **kw: object) -> torch.Tensor:
    kw.pop("generator", None)  # deterministic
    return sample_dpm_solver(velocity_fn, x, schedule.times, model_times=schedule.model_times, **kw)


SAMPLER = Sampler("Flow-DPM-Solver", sample_dpm_solver, dpm_schedule, run_dpm_solver)
