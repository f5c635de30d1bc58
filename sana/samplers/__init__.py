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
    DPM-Solver (pass model_times=model_timesteps(sigmas), the one place where time is truncated) and
    float32 sigma * 1000 for Euler. The velocity function then receives those values as t.
  * "scm" shows the model the flow time s = sin t / (sin t + cos t) it computes itself (the Sprint
    checkpoints' input), with the flow state x_s; see scm.py.

Callbacks receive one StepInfo(index, total, t, x, denoised) per step, in order; `progress=True` shows a
tqdm bar.

Registry: SAMPLERS maps exact names to functions and DEFAULT_SCHEDULES names the schedule each was made
for; `get_sampler` rejects unknown names.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sana.samplers.common import Callback, StepInfo
from sana.samplers.dpm_solver import sample_dpm_solver
from sana.samplers.euler import sample_euler
from sana.samplers.guidance import batched_guidance, classifier_free_guidance, uses_guidance
from sana.samplers.schedules import (
    dpm_flow_sigmas,
    euler_flow_sigmas,
    flow_shift,
    model_timesteps,
    scm_timesteps,
)
from sana.samplers.scm import sample_scm

SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "dpm": sample_dpm_solver,
    "euler": sample_euler,
    "scm": sample_scm,
}

DEFAULT_SCHEDULES: dict[str, Callable[..., torch.Tensor]] = {
    "dpm": dpm_flow_sigmas,
    "euler": euler_flow_sigmas,
    "scm": scm_timesteps,
}


def get_sampler(name: str) -> Callable[..., torch.Tensor]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}") from None


__all__ = [
    "DEFAULT_SCHEDULES",
    "SAMPLERS",
    "Callback",
    "StepInfo",
    "batched_guidance",
    "classifier_free_guidance",
    "dpm_flow_sigmas",
    "euler_flow_sigmas",
    "flow_shift",
    "get_sampler",
    "model_timesteps",
    "sample_dpm_solver",
    "sample_euler",
    "sample_scm",
    "scm_timesteps",
    "uses_guidance",
]
