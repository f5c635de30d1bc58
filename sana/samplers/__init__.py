"""Samplers: pure functions over one velocity callable, schedules as plain tensors, guidance as a wrapper.

Contract. A sampler is

    sample_<name>(velocity_fn, x, schedule, *, ..., callback=None, progress=False) -> final sample

with velocity_fn(x, t) -> v (sana.types.VelocityFn): x has shape (B, ...), t is a (B,) tensor and v has x's
shape. Samplers keep no state between calls, never see text (bind it into velocity_fn, or use the
wrappers in `guidance`), compute in float32 (float64 inputs stay float64) and return the working dtype.

Two times per step. The solver's arithmetic always uses the schedule (flow sigmas, or TrigFlow angles for
"scm"). What the model is shown as t is a separate, explicit input:
  * "dpm" and "euler" take `model_times` (steps,), defaulting to the flow times sigmas[:-1] in [0, 1]. The
    published Sana checkpoints were sampled seeing other numbers: integer timesteps trunc(1000 sigma) for
    DPM-Solver (model_timesteps(sigmas), the one place where time is truncated) and float32 sigma * 1000 for
    Euler, times the DiT's timestep_scale. The registry's schedule builders (`dpm_schedule`,
    `euler_schedule`) put exactly those numbers in a `Schedule`; the velocity function receives them as t.
  * "scm" shows the model the flow time s = sin t / (sin t + cos t) it computes itself (the Sprint
    checkpoints' input), with the flow state x_s; see scm.py.

Callbacks receive one StepInfo(index, total, t, x, denoised) per step, in order, and may return a tensor the
sampler continues from instead of x (inpainting holds its kept region that way); `progress=True` shows a
tqdm bar.

Registry: SAMPLERS maps exact names to `Sampler` entries (common.py): the function, the schedule it was made
for, and how to run it on a `Schedule`. The pipeline, the CLI's choices and the docs all read this one table,
so a new sampler is one module (its function, schedule builder and entry) and one line below.
`get_sampler` returns a sampler's function and rejects unknown names.
"""

from __future__ import annotations

from sana.errors import UserError
from sana.samplers import dpm_solver, euler, scm
from sana.samplers.common import Callback, SampleFn, Sampler, Schedule, StepInfo
from sana.samplers.dpm_solver import sample_dpm_solver
from sana.samplers.euler import sample_euler
from sana.samplers.guidance import (
    batched_guidance,
    classifier_free_guidance,
    guided_velocity,
    uses_guidance,
)
from sana.samplers.schedules import (
    dpm_flow_sigmas,
    euler_flow_sigmas,
    flow_shift,
    model_timesteps,
    scm_timesteps,
)
from sana.samplers.scm import sample_scm

SAMPLERS: dict[str, Sampler] = {
    "dpm": dpm_solver.SAMPLER,
    "euler": euler.SAMPLER,
    "scm": scm.SAMPLER,
}


def check_sampler(name: str) -> Sampler:
    """The registry entry called `name`, or a one-line error listing the choices."""
    try:
        return SAMPLERS[name]
    except (KeyError, TypeError):
        raise UserError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


def get_sampler(name: str) -> SampleFn:
    """The sampler function called `name` (sample_<name>(velocity_fn, x, times, ...))."""
    return check_sampler(name).function


__all__ = [
    "SAMPLERS",
    "Callback",
    "Sampler",
    "Schedule",
    "StepInfo",
    "batched_guidance",
    "check_sampler",
    "classifier_free_guidance",
    "dpm_flow_sigmas",
    "euler_flow_sigmas",
    "flow_shift",
    "get_sampler",
    "guided_velocity",
    "model_timesteps",
    "sample_dpm_solver",
    "sample_euler",
    "sample_scm",
    "scm_timesteps",
    "uses_guidance",
]
