"""Time schedules: which noise levels a sampler visits, as plain tensors.

Flow time is sigma in [0, 1], x_sigma = (1 - sigma) x0 + sigma eps, sigma = 1 is pure noise. A flow schedule
is a decreasing (steps + 1,) tensor that ends at 0: step i integrates from sigmas[i] to sigmas[i + 1].

The flow schedules are returned in float64 because that is the precision in which the reference
implementation (diffusers, computing in numpy) builds them; the samplers round them to float32 for their
arithmetic, which reproduces the reference's float32 sigmas bit for bit. The float64 values matter for one
thing only: `model_timesteps`, the truncated integer times the published checkpoints were sampled with.
Truncating float32 sigmas instead can land one step off whenever sigma * 1000 sits within float32 rounding
of an integer, so `model_timesteps` refuses them.

The Sana-Sprint schedule (`scm_timesteps`) is not in flow time but in the TrigFlow angle t in [0, pi/2],
x_t = cos(t) x0 + sin(t) eps (in units of the data standard deviation); see `scm.py`.
"""

from __future__ import annotations

import torch

from sana.errors import UserError


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps <= 0:
        raise UserError(f"steps must be a positive integer, got {steps!r}")


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise UserError(f"shift must be > 0, got {shift!r}")


def flow_shift(sigma, shift: float):
    """Shift flow times towards noise: shift * sigma / (1 + (shift - 1) * sigma).

    This is the time reparametrisation of SD3 / Sana for high resolutions: it keeps 0 and 1 fixed and, for
    shift > 1, spends more of the schedule at high noise. Works on floats and tensors alike.
    """
    return shift * sigma / (1 + (shift - 1) * sigma)


def _numpy_linspace(start: float, stop: float, num: int) -> torch.Tensor:
    """float64 evenly spaced points, rounded the way numpy.linspace rounds them.

    torch.linspace fills its second half backwards from `stop`, so its float64 values can differ from
    numpy's in the last bit; the schedules below must match numpy exactly (see the module docstring).
    """
    if num == 1:
        return torch.tensor([start], dtype=torch.float64)
    step = (stop - start) / (num - 1)
    points = torch.arange(num, dtype=torch.float64) * step + start
    points[-1] = stop
    return points


def dpm_flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The Sana schedule for DPM-Solver++ on flow sigmas, float64 of shape (steps + 1,), ending in 0.

    Take steps + 1 evenly spaced points on [1/T, 1] (T = num_train_timesteps), turn them into flow times
    1 - a, shift them, order them from noise to data and drop the 0 this produces, then append the terminal 0.
    The first sigma is therefore shift(1 - 1/T) < 1, never pure noise. (This is the schedule of diffusers'
    DPMSolverMultistepScheduler with use_flow_sigmas, final_sigmas_type="zero".)
    """
    _check_steps(steps)
    _check_shift(shift)
    alphas = _numpy_linspace(1.0, 1.0 / num_train_timesteps, steps + 1)  # (steps+1,), from 1 down to 1/T
    sigmas = flow_shift(1.0 - alphas, shift).flip(0)[:-1]  # (steps,), high noise first
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # (steps+1,)


def euler_flow_sigmas(steps: int, shift: float, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The flow-Euler schedule of the reference, float64 of shape (steps + 1,), ending in 0.

    The reference (diffusers' FlowMatchEulerDiscreteScheduler with a fixed shift) first computes, in float32,
    the shifted end points sigma_max = shift(1) = 1 and sigma_min = shift(1/T), spaces `steps` points evenly
    between them and then applies the shift a second time to every point. The lowest nonzero sigma is thus
    shift(shift(1/T)) (0.008929 for shift 3), not shift(1/T). We reproduce that double shift on purpose: it
    is what the "flow-euler" sampler of the published pipelines actually runs.
    """
    _check_steps(steps)
    _check_shift(shift)
    ends = torch.tensor([float(num_train_timesteps), 1.0], dtype=torch.float32) / num_train_timesteps
    sigma_max, sigma_min = flow_shift(ends, shift).tolist()  # the float32 end points, as Python floats
    times = _numpy_linspace(sigma_max * num_train_timesteps, sigma_min * num_train_timesteps, steps)
    sigmas = flow_shift(times / num_train_timesteps, shift)  # (steps,), the second shift
    return torch.cat([sigmas, sigmas.new_zeros(1)])  # (steps+1,)


def scm_timesteps(steps: int, max_t: float = 1.5708, intermediate_t: float | None = 1.3) -> torch.Tensor:
    """TrigFlow angles for the Sana-Sprint consistency sampler, float32 of shape (steps + 1,), ending in 0.

    Two steps use the published hand-picked schedule [max_t, intermediate_t, 0]; any other step count (or
    intermediate_t=None) spaces the angles evenly from max_t to 0. Note 1.5708 is slightly above pi/2, so the
    first step starts a hair beyond pure noise, as in the published sampler.
    """
    _check_steps(steps)
    if steps == 2 and intermediate_t is not None:
        return torch.tensor([max_t, intermediate_t, 0.0], dtype=torch.float32)
    return torch.linspace(max_t, 0.0, steps + 1, dtype=torch.float32)


def model_timesteps(sigmas: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The integer timesteps the published Sana checkpoints see: trunc(sigma * T) for every step, int64 (steps,).

    `sigmas` is the full float64 (steps + 1,) schedule handed to the sampler (the terminal 0 is never shown to
    the model and is dropped). The published models were trained and are sampled with integer timesteps while
    the solver itself uses the exact float sigmas; pass the result as the sampler's `model_times`. This is the
    one place in the package where time is truncated.
    """
    if sigmas.dtype != torch.float64:
        raise ValueError(
            f"model_timesteps needs the float64 schedule (got {sigmas.dtype}): truncating rounded sigmas can "
            "land one timestep off"
        )
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a (steps + 1,) schedule, got shape {tuple(sigmas.shape)}")
    return (sigmas[:-1] * num_train_timesteps).to(torch.int64)  # .to(int64) truncates towards zero
