"""The flow-matching objective: the path, its velocity, the time distribution, and its agreement with the
package's samplers (a model that predicts the objective's target exactly is integrated back to the data)."""

from __future__ import annotations

import pytest
import torch

from sana.flow import dit_timesteps, flow_loss, interpolate, sample_times, velocity_target
from sana.samplers.euler import sample_euler
from sana.samplers.schedules import euler_flow_sigmas, flow_shift


def test_path_endpoints_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    torch.testing.assert_close(interpolate(x0, eps, torch.zeros(3)), x0)
    torch.testing.assert_close(interpolate(x0, eps, torch.ones(3)), eps)
    t, h = torch.tensor([0.2, 0.5, 0.7]), 1e-3  # the velocity is the time derivative of the path
    finite_difference = (interpolate(x0, eps, t + h) - interpolate(x0, eps, t)) / h
    torch.testing.assert_close(finite_difference, velocity_target(x0, eps), rtol=1e-3, atol=1e-3)


def test_times_are_logit_normal_then_shifted():
    g = torch.Generator().manual_seed(0)
    t = sample_times(50_000, logit_mean=0.5, logit_std=0.8, generator=g)
    assert t.min() > 0 and t.max() < 1
    logit = torch.log(t / (1 - t))
    assert logit.mean().item() == pytest.approx(0.5, abs=0.02)
    assert logit.std().item() == pytest.approx(0.8, abs=0.02)
    shifted = sample_times(
        1000, logit_mean=0.5, logit_std=0.8, shift=3.0, generator=torch.Generator().manual_seed(1)
    )
    plain = sample_times(1000, logit_mean=0.5, logit_std=0.8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(shifted, flow_shift(plain, 3.0))
    assert (shifted >= plain).all()  # shift > 1 moves training towards noise, as it moves sampling
    with pytest.raises(ValueError, match="shift"):
        sample_times(2, shift=0.0)


def test_model_sees_1000_t_and_the_loss_is_mse():
    t = torch.tensor([0.0, 0.25, 1.0])
    torch.testing.assert_close(dit_timesteps(t), torch.tensor([0.0, 250.0, 1000.0]))
    torch.testing.assert_close(dit_timesteps(t, timestep_scale=0.5), torch.tensor([0.0, 125.0, 500.0]))
    a, b = torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(2, 3)
    assert flow_loss(a, b).dtype == torch.float32
    torch.testing.assert_close(flow_loss(a, b), ((a.float() - b) ** 2).mean())


def test_the_target_is_what_the_samplers_integrate():
    """For one data point x0 the exact velocity field of the objective is v(x_t, t) = (x_t - x0) / t (solve
    x_t = (1 - t) x0 + t eps for eps and take eps - x0). The package's Euler sampler, following it from pure
    noise, must land on x0: the objective and the samplers share one time convention."""
    x0 = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    sigmas = euler_flow_sigmas(10, shift=3.0)
    out = sample_euler(lambda x, t: (x - x0) / t.reshape(-1, 1, 1, 1), noise, sigmas)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
