"""Multistep consistency sampling for Sana-Sprint (sCM, TrigFlow), driving a flow-velocity model.

Sana-Sprint is distilled with continuous-time consistency models (Lu & Song, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models", 2024) in the TrigFlow parametrisation, with data std sigma_d:

    z_t = cos(t) x0 + sin(t) eps sigma_d,   t in [0, pi/2],   F = cos(t) eps sigma_d - sin(t) x0
    x0  = cos(t) z_t - sin(t) F                                     (the consistency function)

The network itself is a rectified-flow model, so each step converts the TrigFlow state to flow time:
with s = sin t / (sin t + cos t) and unit-std units,

    x_s = (z_t / sigma_d) sqrt(s^2 + (1 - s)^2) = (1 - s) x0/sigma_d + s eps      (the flow state)
    F   = sigma_d ((1 - 2s) x_s + (1 - 2s + 2s^2) v) / sqrt(s^2 + (1 - s)^2)      (v = velocity at (x_s, s))

(sqrt(s^2 + (1 - s)^2) = 1 / (sin t + cos t); expanding F with v = eps - x0 gives cos t eps - sin t x0.)
A step predicts x0 and, unless it is the last, re-noises it to the next angle with fresh Gaussian noise:
z <- cos(t_next) x0 + sin(t_next) sigma_d noise. Sampling starts from z = sigma_d * x (x standard normal)
and returns x0 / sigma_d, a latent in the same units as the other samplers' output.

Time contract: the model is a plain VelocityFn. It is called as velocity_fn(x_s, s) with x_s the flow state
above and s a (B,) tensor of flow times (slightly above 1 at the first step, since 1.5708 > pi/2), which is
what the published Sprint checkpoints take as their timestep. Guidance for Sprint is an embedding input of
the model, so the caller binds it into velocity_fn; there is no classifier-free batch here.

Randomness: one standard-normal draw of x's shape per step, in float32, from `generator` in step order,
including after the last step (where its weight sin(0) is zero). This is exactly the reference's draw
sequence (diffusers' SCMScheduler), so a generator seeded the same way yields the same samples and is left
in the same state. A CPU generator with x on an accelerator draws on the CPU and moves the noise; a list
of generators draws each batch row from its own generator.
"""

from __future__ import annotations

import torch

from sana.samplers.common import (
    Callback,
    Sampler,
    Schedule,
    StepInfo,
    continue_from,
    step_range,
    working_dtype,
)
from sana.samplers.schedules import scm_timesteps
from sana.types import VelocityFn

Generator = torch.Generator | list[torch.Generator] | None


def _standard_normal(shape: torch.Size, generator: Generator, device: torch.device) -> torch.Tensor:
    """float32 N(0, 1) noise; CPU generators draw on the CPU (device-independent results)."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        rows = [torch.randn((1, *shape[1:]), generator=g, device=g.device) for g in generator]
        return torch.cat(rows).to(device)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device).to(device)


def sample_scm(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    *,
    generator: Generator = None,
    sigma_data: float = 0.5,
    callback: Callback | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the sCM sampler from standard-normal noise x over the TrigFlow angles `timesteps` (steps + 1,).

    Use scm_timesteps() for the schedule. Returns the final clean-sample estimate (float32, or float64 if x
    is float64). StepInfo.t is the flow time s of the step; StepInfo.x and .denoised are in x's units.
    """
    if timesteps.ndim != 1 or timesteps.numel() < 2:
        raise ValueError(
            f"timesteps must be a 1-D (steps + 1,) schedule with steps >= 1, got {tuple(timesteps.shape)}"
        )
    dtype = working_dtype(x)
    angles = timesteps.detach().to(device=x.device, dtype=dtype)
    steps = angles.numel() - 1
    expand = (-1,) + (1,) * (x.ndim - 1)  # per-sample scalars broadcast over (C, H, W)
    z = x.to(dtype) * sigma_data  # TrigFlow state, in data units
    for i in step_range(steps, progress, "scm"):
        t, t_next = angles[i], angles[i + 1]
        tb = t.expand(x.shape[0])  # (B,)
        s = torch.sin(tb) / (torch.cos(tb) + torch.sin(tb))  # (B,) flow time the model sees
        sb = s.view(expand)
        x_s = (z / sigma_data) * torch.sqrt(sb**2 + (1 - sb) ** 2)  # flow state, unit-std units
        v = velocity_fn(x_s, s)
        f = ((1 - 2 * sb) * x_s + (1 - 2 * sb + 2 * sb**2) * v) / torch.sqrt(sb**2 + (1 - sb) ** 2)
        f = f.to(dtype) * sigma_data  # TrigFlow F, data units
        x0 = torch.cos(t) * z - torch.sin(t) * f
        noise = _standard_normal(z.shape, generator, z.device) * sigma_data
        z = torch.cos(t_next) * x0 + torch.sin(t_next) * noise
        if callback is not None:
            info = StepInfo(index=i, total=steps, t=float(s[0]), x=z / sigma_data, denoised=x0 / sigma_data)
            z = continue_from(callback(info), z / sigma_data) * sigma_data
    # After the last step (angle 0) z = cos(0) x0 + sin(0) noise is x0 exactly, or what a callback put there.
    return z / sigma_data


def scm_schedule(steps: int, *, sigma_data: float = 0.5, **_: object) -> Schedule:
    """The published Sprint run: `scm_timesteps` angles; the sampler derives the model's flow time itself."""
    return Schedule(scm_timesteps(steps), None, space="trigflow", sigma_data=sigma_data)


def run_scm(velocity_fn: VelocityFn, x: torch.Tensor, schedule: Schedule, **kw: object) -> torch.Tensor:
    return sample_scm(velocity_fn, x, schedule.times, sigma_data=schedule.sigma_data, **kw)


SAMPLER = Sampler("sCM (Sana-Sprint)", sample_scm, scm_schedule, run_scm)
