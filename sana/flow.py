"""The rectified-flow training objective (Liu et al. 2022; Esser et al. 2024, "SD3"), as Sana trains it.

Time convention (the one the samplers use, sana/samplers/schedules.py): flow time t in [0, 1], t = 0 is data
and t = 1 is pure noise. For a clean latent x0 and Gaussian noise eps ~ N(0, I),

    x_t = (1 - t) * x0 + t * eps                      (straight line from data to noise)
    v   = d x_t / d t = eps - x0                      (the velocity the model learns; constant along the line)
    loss = E_{x0, eps, t} || v_theta(x_t, t, text) - (eps - x0) ||^2      (mean squared error)

Sampling integrates dx/dt = v_theta from t = 1 down to t = 0, so a model trained here runs unchanged in
every flow sampler of the package.

Which t the model trains on matters as much as the loss. We draw
    u ~ logit-normal(mean, std), i.e. u = sigmoid(mean + std * n) with n ~ N(0, 1)     (SD3, section 3.1)
which concentrates training on the middle of the path, where predicting v is hardest, and then apply the
same time shift as sampling,
    t = shift * u / (1 + (shift - 1) * u)                                                (flow_shift)
so that with shift > 1 (high resolutions, where noise destroys less of the image at a given t) training and
sampling spend their effort at the same noise levels.

What the network is shown as its timestep is 1000 * t (times the model's `timestep_scale`), a float. That
is the published convention: the checkpoints were trained on integer timesteps in [0, 1000) and are sampled
seeing trunc(1000 * sigma) (DPM-Solver) or float 1000 * sigma (Euler); the sinusoidal embedding is smooth in
t, so training on the continuous value covers both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sana.samplers.schedules import flow_shift

NUM_TRAIN_TIMESTEPS = 1000  # the published models see t * 1000


def sample_times(
    n: int,
    *,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """(n,) float32 flow times in (0, 1): logit-normal(logit_mean, logit_std), then the sampling time shift."""
    if logit_std < 0:
        raise ValueError(f"logit_std must be >= 0, got {logit_std}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    u = torch.sigmoid(logit_mean + logit_std * torch.randn(n, generator=generator))  # (n,)
    return flow_shift(u, shift)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t eps, with t (B,) broadcast over the other dimensions."""
    t = t.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)  # (B, 1, 1, 1)
    return (1 - t) * x0 + t * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """v = eps - x0: the constant velocity of the straight path from x0 (t = 0) to eps (t = 1)."""
    return noise - x0


def dit_timesteps(t: torch.Tensor, timestep_scale: float = 1.0) -> torch.Tensor:
    """What the DiT sees as its timestep: 1000 * t * timestep_scale (float, not truncated)."""
    return t.float() * (NUM_TRAIN_TIMESTEPS * timestep_scale)


def flow_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error in float32 (bf16/fp16 model outputs are upcast first, so the mean is exact)."""
    return F.mse_loss(prediction.float(), target.float())
