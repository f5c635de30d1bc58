"""Samplers and schedules against diffusers (the test oracle), closed-form fields and convergence order.

The oracle runs use the published Sana scheduler configs and, where the per-step math lives in a diffusers
pipeline (Sprint's TrigFlow conversion, CFG), the real SanaPipeline / SanaSprintPipeline with a stand-in
transformer that evaluates the same test velocity field as our side.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    SanaPipeline,
    SanaSprintPipeline,
    SCMScheduler,
)

from sana.samplers import (
    SAMPLERS,
    StepInfo,
    batched_guidance,
    classifier_free_guidance,
    dpm_flow_sigmas,
    euler_flow_sigmas,
    flow_shift,
    get_sampler,
    model_timesteps,
    sample_dpm_solver,
    sample_euler,
    sample_scm,
    scm_timesteps,
    uses_guidance,
)

# scheduler/scheduler_config.json of the Sana_*_diffusers checkpoints (published-configs.json).
PUBLISHED_DPM_CONFIG = {
    "algorithm_type": "dpmsolver++",
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "flow_shift": 3.0,
    "lambda_min_clipped": -float("inf"),
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0,
    "solver_order": 2,
    "solver_type": "midpoint",
    "steps_offset": 0,
    "thresholding": False,
    "timestep_spacing": "linspace",
    "trained_betas": None,
    "use_beta_sigmas": False,
    "use_exponential_sigmas": False,
    "use_flow_sigmas": True,
    "use_karras_sigmas": False,
    "use_lu_lambdas": False,
    "variance_type": None,
}
SPRINT_SCM_CONFIG = {"num_train_timesteps": 1000, "prediction_type": "trigflow", "sigma_data": 0.5}
SHAPE = (2, 4, 3, 3)  # (B, C, H, W)
# Our trajectories reproduce the oracle's bit for bit on CPU (same float32 operations in the same order); the
# brief's bar is 1e-5, to which this can be relaxed should some platform round differently.
ORACLE_ATOL = 0.0


def dpm_scheduler(shift: float = 3.0) -> DPMSolverMultistepScheduler:
    return DPMSolverMultistepScheduler.from_config({**PUBLISHED_DPM_CONFIG, "flow_shift": shift})


def make_field(rate: float, seed: int = 0):
    """A fixed nonlinear velocity field v(x, t, cond) depending on every input; `rate` scales t's effect."""
    g = torch.Generator().manual_seed(seed)
    c = SHAPE[1]
    w = torch.randn(c, c, generator=g) / math.sqrt(c)
    b = torch.randn(c, generator=g)

    def field(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        tt = t.to(x.dtype).view(-1, 1, 1, 1)
        h = torch.einsum("oc,bchw->bohw", w.to(x.dtype), x) + b.to(x.dtype).view(1, -1, 1, 1) * torch.cos(
            rate * tt
        )
        if cond is not None:
            h = h + cond.to(x.dtype).mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return torch.tanh(h) - 0.5 * x * torch.sin(rate * tt + 1.0)

    return field


class Recorder:
    """Wraps a velocity function and remembers every t it was shown."""

    def __init__(self, fn):
        self.fn, self.times = fn, []

    def __call__(self, x, t, *rest):
        self.times.append(t.detach().clone().to(torch.float64))
        return self.fn(x, t, *rest)


def noise(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).to(dtype)


# ---------------------------------------------------------------------------------------------- schedules


def test_dpm_schedule_matches_published_sana_20_steps():
    sched = dpm_scheduler()
    sched.set_timesteps(20)
    sigmas = dpm_flow_sigmas(20, 3.0)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (21,) and sigmas[-1] == 0
    assert torch.equal(sigmas.float(), sched.sigmas)
    expected = [999, 982, 963, 944, 922, 899, 874, 847, 817, 785, 749, 710, 666, 617, 562, 499, 428, 345, 249, 136]
    assert model_timesteps(sigmas).tolist() == expected
    assert torch.equal(model_timesteps(sigmas), sched.timesteps)


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_dpm_schedule_matches_diffusers_for_all_step_counts(shift):
    sched = dpm_scheduler(shift)
    for steps in range(1, 51):
        sched.set_timesteps(steps)
        sigmas = dpm_flow_sigmas(steps, shift)
        assert torch.equal(sigmas.float(), sched.sigmas), steps
        assert torch.equal(model_timesteps(sigmas), sched.timesteps), steps


def test_model_timesteps_truncates_the_float64_schedule():
    # shift 1, 3 steps: sigma * 1000 is just below 333 in float64 but rounds up to 333 in float32, so
    # truncating float32 sigmas would show the model 333 where the reference shows 332.
    sigmas = dpm_flow_sigmas(3, 1.0)
    assert model_timesteps(sigmas).tolist() == [999, 666, 332]
    assert (sigmas.float()[:-1] * 1000).long().tolist() == [999, 666, 333]
    with pytest.raises(ValueError, match="float64"):
        model_timesteps(sigmas.float())


@pytest.mark.parametrize("shift", [1.0, 3.0, 6.0])
def test_euler_schedule_matches_flow_match_euler(shift):
    for steps in [1, 2, 3, 5, 10, 20, 28, 50]:
        sched = FlowMatchEulerDiscreteScheduler(shift=shift)
        sched.set_timesteps(steps)
        sigmas = euler_flow_sigmas(steps, shift)
        assert sigmas.shape == (steps + 1,) and sigmas[0] == 1 and sigmas[-1] == 0
        assert torch.equal(sigmas.float(), sched.sigmas), steps
        assert torch.equal(sigmas.float()[:-1] * 1000, sched.timesteps), steps


def test_euler_schedule_double_shifts_its_end_point():
    sigmas = euler_flow_sigmas(20, 3.0)
    assert sigmas[-2].item() == pytest.approx(0.008929, abs=1e-6)
    assert sigmas[-2].item() == pytest.approx(flow_shift(flow_shift(1e-3, 3.0), 3.0), rel=1e-6)


def test_scm_schedule_matches_scm_scheduler():
    for steps in [1, 2, 3, 4, 8]:
        sched = SCMScheduler(**SPRINT_SCM_CONFIG)
        sched.set_timesteps(steps, max_timesteps=1.5708, intermediate_timesteps=1.3 if steps == 2 else None)
        assert torch.equal(scm_timesteps(steps), sched.timesteps), steps
    assert scm_timesteps(2).tolist() == pytest.approx([1.5708, 1.3, 0.0])
    assert torch.equal(scm_timesteps(2, intermediate_t=None), torch.linspace(1.5708, 0, 3))


def test_flow_shift_fixes_end_points():
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    out = flow_shift(s, 3.0)
    assert out[0] == 0 and out[-1] == 1 and torch.all(out >= s)
    assert torch.equal(flow_shift(s, 1.0), s)


@pytest.mark.parametrize(
    "schedule", [lambda n: dpm_flow_sigmas(n, 3.0), lambda n: euler_flow_sigmas(n, 3.0), scm_timesteps]
)
@pytest.mark.parametrize("steps", [0, -1, 2.5, True])
def test_schedules_reject_bad_step_counts(schedule, steps):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        schedule(steps)


def test_schedules_reject_bad_shift():
    with pytest.raises(ValueError, match="shift must be > 0"):
        dpm_flow_sigmas(10, 0.0)


# ---------------------------------------------------------------------------- trajectories vs diffusers


def diffusers_dpm_loop(field, x, steps):
    sched = dpm_scheduler()
    sched.set_timesteps(steps)
    assert len(set(sched.timesteps.tolist())) == steps  # distinct, so diffusers' index lookup is plain
    for t in sched.timesteps:
        v = field(x, t.expand(x.shape[0]) * 1.0).float()
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 14, 20, 28])
def test_dpm_solver_matches_diffusers(steps):
    field = make_field(rate=0.01)
    theirs, ours = Recorder(field), Recorder(field)
    expected = diffusers_dpm_loop(theirs, noise(), steps)
    sigmas = dpm_flow_sigmas(steps, 3.0)
    got = sample_dpm_solver(ours, noise(), sigmas, model_times=model_timesteps(sigmas))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=ORACLE_ATOL)
    assert len(ours.times) == steps
    assert all(torch.equal(a, b) for a, b in zip(ours.times, theirs.times, strict=True))
    assert torch.equal(ours.times[0], torch.full((SHAPE[0],), 999.0, dtype=torch.float64))


@pytest.mark.parametrize("steps", [5, 20])
def test_dpm_solver_matches_diffusers_when_the_schedule_does_not_end_at_zero(steps):
    # With final_sigmas_type="sigma_min" the last step is a real solver step: first order below 15 steps
    # ("lower_order_final"), second order from 15 on.
    field = make_field(rate=0.01)
    sched = DPMSolverMultistepScheduler.from_config({**PUBLISHED_DPM_CONFIG, "final_sigmas_type": "sigma_min"})
    sched.set_timesteps(steps)
    sigmas, times = sched.sigmas.clone(), sched.timesteps.clone()
    assert sigmas[-1] > 0
    x = noise()
    for t in sched.timesteps:
        x = sched.step(field(x, t.expand(x.shape[0]) * 1.0), t, x, return_dict=False)[0]
    got = sample_dpm_solver(field, noise(), sigmas, model_times=times)
    torch.testing.assert_close(got, x, rtol=0, atol=ORACLE_ATOL)


def diffusers_euler_loop(field, x, steps, shift=3.0):
    sched = FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    for t in sched.timesteps:
        v = field(x, t.expand(x.shape[0]) * 1.0).float()
        x = sched.step(v, t, x, return_dict=False)[0]
    return x


@pytest.mark.parametrize("steps", [1, 2, 5, 20, 28])
def test_euler_matches_diffusers(steps):
    field = make_field(rate=0.01)
    theirs, ours = Recorder(field), Recorder(field)
    expected = diffusers_euler_loop(theirs, noise(), steps)
    sigmas = euler_flow_sigmas(steps, 3.0)
    got = sample_euler(ours, noise(), sigmas, model_times=sigmas.float()[:-1] * 1000)
    torch.testing.assert_close(got, expected, rtol=0, atol=ORACLE_ATOL)
    assert all(torch.equal(a, b) for a, b in zip(ours.times, theirs.times, strict=True))


class StandInTransformer(torch.nn.Module):
    """Just enough of SanaTransformer2DModel for the diffusers pipelines: evaluates a test field."""

    def __init__(self, field):
        super().__init__()
        self.field = field
        self.config = types.SimpleNamespace(
            in_channels=SHAPE[1],
            out_channels=SHAPE[1],
            sample_size=32,
            timestep_scale=1.0,
            guidance_embeds_scale=0.1,
        )

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, return_dict=False, **_):
        return (self.field(hidden_states, timestep, encoder_hidden_states),)


def pipeline(cls, field, scheduler):
    pipe = cls(
        tokenizer=None, text_encoder=None, vae=None, transformer=StandInTransformer(field), scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def text(seed: int, batch: int = SHAPE[0]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(batch, 5, 8, generator=torch.Generator().manual_seed(seed)), torch.ones(batch, 5)


@pytest.mark.parametrize("scale", [4.5, 1.0])
def test_dpm_with_guidance_matches_sana_pipeline(scale):
    field = make_field(rate=0.01)
    (pos, pos_mask), (neg, neg_mask) = text(10), text(11)
    theirs = Recorder(field)
    expected = pipeline(SanaPipeline, theirs, dpm_scheduler())(
        prompt_embeds=pos,
        prompt_attention_mask=pos_mask,
        negative_prompt=None,
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=neg_mask,
        latents=noise(),
        guidance_scale=scale,
        num_inference_steps=20,
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="latent",
    ).images

    ours = Recorder(field)
    if uses_guidance(scale):
        velocity = classifier_free_guidance(lambda x, t: ours(x, t, torch.cat([neg, pos])), scale)
    else:
        velocity = lambda x, t: ours(x, t, pos)  # the reference skips the uncond batch
    sigmas = dpm_flow_sigmas(20, 3.0)
    got = sample_dpm_solver(velocity, noise(), sigmas, model_times=model_timesteps(sigmas))
    torch.testing.assert_close(got, expected, rtol=0, atol=ORACLE_ATOL)
    assert all(torch.equal(a, b) for a, b in zip(ours.times, theirs.times, strict=True))
    assert ours.times[0].shape == ((2 * SHAPE[0],) if scale > 1 else (SHAPE[0],))


def test_euler_matches_sana_pipeline():
    field = make_field(rate=0.01)
    pos, mask = text(10)
    theirs, ours = Recorder(field), Recorder(field)
    expected = pipeline(SanaPipeline, theirs, FlowMatchEulerDiscreteScheduler(shift=3.0))(
        prompt_embeds=pos,
        prompt_attention_mask=mask,
        latents=noise(),
        guidance_scale=1.0,
        num_inference_steps=20,
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="latent",
    ).images
    sigmas = euler_flow_sigmas(20, 3.0)
    got = sample_euler(lambda x, t: ours(x, t, pos), noise(), sigmas, model_times=sigmas.float()[:-1] * 1000)
    torch.testing.assert_close(got, expected, rtol=0, atol=ORACLE_ATOL)
    assert all(torch.equal(a, b) for a, b in zip(ours.times, theirs.times, strict=True))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_matches_sana_sprint_pipeline(steps):
    field = make_field(rate=2.0)
    pos, mask = text(10)
    theirs, ours = Recorder(field), Recorder(field)
    g_theirs, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    sched = SCMScheduler(**SPRINT_SCM_CONFIG)
    expected = pipeline(SanaSprintPipeline, theirs, sched)(
        prompt_embeds=pos,
        prompt_attention_mask=mask,
        latents=noise(),
        generator=g_theirs,
        num_inference_steps=steps,
        intermediate_timesteps=1.3 if steps == 2 else None,
        height=64,
        width=64,
        use_resolution_binning=False,
        output_type="latent",
    ).images

    got = sample_scm(lambda x, t: ours(x, t, pos), noise(), scm_timesteps(steps), generator=g_ours)
    torch.testing.assert_close(got, expected, rtol=0, atol=ORACLE_ATOL)
    assert all(torch.equal(a, b) for a, b in zip(ours.times, theirs.times, strict=True))
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())  # same number of draws


def test_scm_noise_comes_from_the_generator():
    field = make_field(rate=2.0)
    run = lambda seed: sample_scm(
        lambda x, t: field(x, t), noise(), scm_timesteps(2), generator=torch.Generator().manual_seed(seed)
    )
    assert torch.equal(run(3), run(3))
    assert not torch.allclose(run(3), run(4))
    per_row = sample_scm(
        lambda x, t: field(x, t), noise(), scm_timesteps(2), generator=[torch.Generator().manual_seed(3)] * 1
    )
    assert torch.equal(per_row, run(3))  # a one-element list behaves like the generator itself


# ---------------------------------------------------------------------------- closed forms and order


def constant_field(c):
    return lambda x, t: c.expand_as(x)


@pytest.mark.parametrize("name", ["dpm", "euler"])
def test_constant_velocity_lands_on_the_straight_line(name):
    x1, c = noise(1), noise(2)
    for steps in [1, 3, 20]:
        from_pure_noise = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        got = SAMPLERS[name](constant_field(c), x1, from_pure_noise)
        torch.testing.assert_close(got, x1 - c, rtol=0, atol=1e-5)
    # the published DPM schedule starts just below pure noise, at sigma_0: x1 is read as x at sigma_0
    sigmas = dpm_flow_sigmas(20, 3.0)
    got = SAMPLERS[name](constant_field(c), x1, sigmas)
    torch.testing.assert_close(got, x1 - sigmas[0].float() * c, rtol=0, atol=1e-5)


def test_scm_one_step_from_pure_noise_follows_a_constant_velocity():
    x1, c = noise(1), noise(2)
    angles = torch.tensor([math.pi / 2, 0.0])
    got = sample_scm(constant_field(c), x1, angles, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, x1 - c, rtol=0, atol=1e-5)


def data_point_field(x0):
    return lambda x, t: (x - x0) / t.to(x.dtype).view(-1, 1, 1, 1)


@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_exact_data_point_field_is_recovered(steps):
    x0, x1 = noise(3), noise(4)
    field = data_point_field(x0)
    torch.testing.assert_close(sample_dpm_solver(field, x1, dpm_flow_sigmas(steps, 3.0)), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(sample_euler(field, x1, euler_flow_sigmas(steps, 3.0)), x0, rtol=0, atol=1e-5)
    # every SCM step predicts x0 exactly, so the fresh noise never reaches the result
    got = sample_scm(field, x1, scm_timesteps(steps), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(got, x0, rtol=0, atol=1e-5)


def test_dpm_solver_converges_faster_than_euler():
    # Steps evenly spaced in log-SNR lambda = log((1 - sigma) / sigma), the variable DPM-Solver is built on,
    # between sigma 0.982 and 0.018. (A schedule ending at sigma = 0 has a final first-order jump whose
    # size in lambda is infinite, and uniform-sigma steps are O(1) in lambda near 0: both mask the order.)
    field = make_field(rate=2.0)
    x1 = noise(5, torch.float64)

    def schedule(steps):
        return torch.sigmoid(-torch.linspace(-4.0, 4.0, steps + 1, dtype=torch.float64))

    reference = sample_dpm_solver(field, x1, schedule(2000))
    assert reference.dtype == torch.float64

    def error(sampler, steps):
        return (sampler(field, x1, schedule(steps)) - reference).abs().max().item()

    dpm = [error(sample_dpm_solver, n) for n in (16, 32, 64)]
    euler = [error(sample_euler, n) for n in (16, 32, 64)]
    for errors, low, high in [(dpm, 1.8, 2.2), (euler, 0.8, 1.2)]:
        orders = [math.log2(a / b) for a, b in zip(errors, errors[1:], strict=False)]
        assert all(low < o < high for o in orders), (errors, orders)
    assert dpm[-1] < euler[-1] / 10


# ---------------------------------------------------------------------------------------------- guidance


def test_cfg_batches_both_branches_in_one_call():
    calls = []
    uncond_out, cond_out = noise(6), noise(7)

    def model_fn(x, t):
        calls.append((x.clone(), t.clone()))
        return torch.cat([uncond_out, cond_out])

    x, t = noise(1), torch.full((SHAPE[0],), 0.5)
    out = classifier_free_guidance(model_fn, 4.5)(x, t)
    assert len(calls) == 1
    assert torch.equal(calls[0][0], torch.cat([x, x])) and torch.equal(calls[0][1], torch.cat([t, t]))
    assert torch.equal(out, uncond_out + 4.5 * (cond_out - uncond_out))
    assert torch.equal(classifier_free_guidance(model_fn, 1.0)(x, t), cond_out)
    assert uses_guidance(4.5) and not uses_guidance(1.0) and not uses_guidance(0.0)


def test_batched_guidance_takes_more_branches_and_upcasts():
    outs = [noise(i).to(torch.bfloat16) for i in (8, 9, 10)]
    velocity = batched_guidance(lambda x, t: torch.cat(outs), 3, lambda u, c, p: u + 2 * (c - u) + 3 * (c - p))
    got = velocity(noise(1), torch.zeros(SHAPE[0]))
    u, c, p = (o.float() for o in outs)
    assert got.dtype == torch.float32
    assert torch.equal(got, u + 2 * (c - u) + 3 * (c - p))


# ------------------------------------------------------------------------------------ contract and misc


def run_sampler(name, steps, **kw):
    field = make_field(rate=2.0)
    if name == "scm":
        return sample_scm(field, noise(), scm_timesteps(steps), generator=torch.Generator().manual_seed(0), **kw)
    schedule = dpm_flow_sigmas if name == "dpm" else euler_flow_sigmas
    return SAMPLERS[name](field, noise(), schedule(steps, 3.0), **kw)


@pytest.mark.parametrize("name", ["dpm", "euler", "scm"])
def test_callback_once_per_step_in_order(name):
    steps = 5
    seen: list[StepInfo] = []
    out = run_sampler(name, steps, callback=seen.append, progress=True)
    assert [s.index for s in seen] == list(range(steps))
    assert all(s.total == steps for s in seen)
    assert all(a.t > b.t for a, b in zip(seen, seen[1:], strict=False))
    assert all(s.x.shape == SHAPE and s.denoised.shape == SHAPE for s in seen)
    final = seen[-1].x if name == "euler" else seen[-1].denoised
    torch.testing.assert_close(out, final, rtol=0, atol=0)
    assert torch.equal(out, run_sampler(name, steps))  # callback and progress bar change nothing


def test_registry_and_bad_sampler_inputs():
    assert set(SAMPLERS) == {"dpm", "euler", "scm"}
    assert get_sampler("dpm") is sample_dpm_solver
    with pytest.raises(ValueError, match="unknown sampler 'dpm\\+\\+'"):
        get_sampler("dpm++")
    field = make_field(rate=2.0)
    for sampler in (sample_dpm_solver, sample_euler):
        with pytest.raises(ValueError, match="steps >= 1"):
            sampler(field, noise(), torch.tensor([1.0]))
        with pytest.raises(ValueError, match="model_times must have one entry per step"):
            sampler(field, noise(), dpm_flow_sigmas(4, 3.0), model_times=torch.arange(5))
    with pytest.raises(ValueError, match="steps >= 1"):
        sample_scm(field, noise(), torch.tensor([1.5]))


def test_half_precision_input_is_sampled_in_float32():
    field = make_field(rate=2.0)
    out = sample_dpm_solver(field, noise().to(torch.bfloat16), dpm_flow_sigmas(4, 3.0))
    assert out.dtype == torch.float32
