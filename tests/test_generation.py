"""The seams the pipeline is composed of: the conditioning value, schedules and the samplers' registry,
placement policies, reversible LoRA merges, request plans, and one pipeline serving concurrent calls."""

from __future__ import annotations

import dataclasses
import math
import threading
import time

import numpy as np
import pytest
import torch

from sana.errors import UserError
from sana.generation import dit_model, initial_noise, plan_request, seeded_generators, start_latents
from sana.lora import LoRALayer, merge_lora
from sana.pipeline import SanaPipeline
from sana.placement import Offloaded, Placement, Resident
from sana.samplers import SAMPLERS, Schedule, check_sampler, get_sampler, guided_velocity
from sana.samplers.schedules import dpm_flow_sigmas
from sana.tiny import tiny_components
from sana.types import AttentionPerturbation, Conditioning, TextEmbeddings


def text(rows: int, length: int, seed: int = 0) -> TextEmbeddings:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[:, length - 1] = 0
    return TextEmbeddings(torch.randn(rows, length, 4, generator=g), mask)


@pytest.fixture(scope="module")
def pipe():
    parts = tiny_components(seed=0)
    return SanaPipeline(parts.transformer, parts.vae, parts.text_encoder, parts.scheduler)


# ------------------------------------------------------------------------------------------- conditioning


def test_stack_concatenates_every_field_in_branch_order():
    # A new field must get its case in Conditioning.stack (and here): this list is the reminder.
    fields = ["text", "guidance", "perturbation", "residuals", "control"]
    assert [f.name for f in dataclasses.fields(Conditioning)] == fields
    a = Conditioning(
        text(2, 3, 1), torch.tensor([1.0, 2.0]), None, (torch.full((2, 5, 6), 1.0),), torch.full((2, 3, 2, 2), 1.0)
    )
    b = Conditioning(
        text(2, 5, 2), torch.tensor([3.0, 4.0]), None, (torch.full((2, 5, 6), 2.0),), torch.full((2, 3, 2, 2), 2.0)
    )
    stacked = Conditioning.stack([a, b, b.perturbed([1, 3])])
    assert len(stacked) == 6
    assert stacked.text.hidden.shape == (6, 5, 4)  # padded to the longest branch
    assert torch.equal(stacked.text.mask[:2], torch.nn.functional.pad(a.text.mask, (0, 2)))  # padding is masked
    assert torch.equal(stacked.text.hidden[2:4], b.text.hidden)
    assert torch.equal(stacked.guidance, torch.tensor([1.0, 2.0, 3.0, 4.0, 3.0, 4.0]))
    assert stacked.perturbation.blocks == frozenset({1, 3})
    assert stacked.perturbation.rows.tolist() == [False] * 4 + [True] * 2  # only the last branch is perturbed
    assert [r[:, 0, 0].tolist() for r in stacked.residuals] == [[1.0, 1.0, 2.0, 2.0, 2.0, 2.0]]
    assert stacked.control[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 2.0, 2.0]
    assert Conditioning.stack([a]) is a


def test_stack_refuses_branches_that_disagree():
    a = Conditioning(text(1, 3))
    with pytest.raises(ValueError, match="every branch has a guidance value or none"):
        Conditioning.stack([a, dataclasses.replace(a, guidance=torch.ones(1))])
    with pytest.raises(ValueError, match="perturb different blocks"):
        Conditioning.stack([a.perturbed([0]), a.perturbed([1])])
    with pytest.raises(ValueError, match="different numbers of residuals"):
        Conditioning.stack([a, dataclasses.replace(a, residuals=(torch.zeros(1, 2, 2),))])
    with pytest.raises(ValueError, match="every branch has a control latent or none"):
        Conditioning.stack([a, dataclasses.replace(a, control=torch.zeros(1, 3, 2, 2))])
    with pytest.raises(ValueError, match="control must be"):
        Conditioning(text(2, 3), control=torch.zeros(3, 3, 2, 2))
    with pytest.raises(ValueError, match="guidance must be"):
        Conditioning(text(2, 3), guidance=torch.ones(3))
    with pytest.raises(ValueError, match="perturbation rows"):
        Conditioning(
            text(2, 3), perturbation=AttentionPerturbation(frozenset({0}), torch.ones(3, dtype=torch.bool))
        )


def test_guided_velocity_orders_branches_uncond_cond_perturbed():
    seen = []

    def model(x, t, cond):  # each row's output is its first text state, so the branch order shows
        seen.append(cond)
        return cond.text.hidden[:, 0, 0].view(-1, 1, 1, 1).expand(-1, *x.shape[1:]).clone()

    cond, uncond = Conditioning(text(2, 3, 1)), Conditioning(text(2, 3, 2))
    x, t = torch.zeros(2, 1, 2, 2), torch.zeros(2)
    u, c = uncond.text.hidden[:, 0, 0], cond.text.hidden[:, 0, 0]
    out = guided_velocity(model, cond, uncond, scale=3.0, pag_scale=2.0, pag_layers=[1])(x, t)
    stacked = seen[-1]
    assert stacked.perturbation.rows.tolist() == [False, False, False, False, True, True]
    assert torch.equal(stacked.text.hidden[:2], uncond.text.hidden)
    # u + s (c - u) + p (c - perturbed), with the perturbed branch's output equal to c here
    torch.testing.assert_close(out[:, 0, 0, 0], u + 3.0 * (c - u), rtol=0, atol=1e-6)
    assert torch.equal(guided_velocity(model, cond)(x, t)[:, 0, 0, 0], c)  # no guidance: the model itself
    only_pag = guided_velocity(model, cond, None, pag_scale=2.0, pag_layers=[0])(x, t)
    assert seen[-1].perturbation.rows.tolist() == [False, False, True, True]
    torch.testing.assert_close(only_pag[:, 0, 0, 0], c, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------- schedules and registry


def test_schedules_slice_with_their_model_times():
    full = SAMPLERS["dpm"].schedule(10, shift=3.0, timestep_scale=1.0)
    assert full.steps == 10 and full.model_times.shape == (10,)
    tail = full.last(4)
    assert torch.equal(tail.times, full.times[6:]) and torch.equal(tail.model_times, full.model_times[6:])
    assert torch.equal(full.for_strength(1.0).times, full.times)
    assert full.for_strength(0.3).steps == 3  # ceil(0.3 * 10), not 4 from float rounding
    assert full.for_strength(0.01).steps == 1 and full.for_strength(0.55).steps == 6
    for bad in (0.0, -0.5, 1.5, math.nan):
        with pytest.raises(ValueError, match="strength must be in"):
            full.for_strength(bad)
    with pytest.raises(ValueError, match="1 to 10 steps"):
        full.last(11)


def test_schedules_noise_a_latent_to_their_first_time():
    x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    flow = Schedule(torch.tensor([0.6, 0.2, 0.0], dtype=torch.float64))
    torch.testing.assert_close(flow.noised(x0, eps), 0.4 * x0 + 0.6 * eps)
    trig = SAMPLERS["scm"].schedule(2, sigma_data=0.5)
    t = trig.times[0]
    torch.testing.assert_close(trig.noised(x0, eps), torch.cos(t) * x0 + torch.sin(t) * eps)
    torch.testing.assert_close(flow.noised(x0, eps, index=2), x0)  # the end of a schedule is the data


def test_registry_entries_build_schedules_their_functions_accept():
    for name, entry in SAMPLERS.items():
        assert check_sampler(name) is entry and get_sampler(name) is entry.function
        schedule = entry.schedule(6, shift=3.0, sigma_data=0.5, timestep_scale=1.0)
        assert isinstance(schedule, Schedule) and schedule.steps == 6
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1, 2, 3, 3, generator=g)
        field = lambda x, t: 0.5 * x  # noqa: E731
        via_run = entry.run(field, x, schedule, generator=torch.Generator().manual_seed(1))
        kw = {"generator": torch.Generator().manual_seed(1), "sigma_data": 0.5} if name == "scm" else {}
        direct = entry(field, x, schedule.times, **kw) if name == "scm" else None
        if name != "scm":
            direct = entry(field, x, schedule.times, model_times=schedule.model_times)
        assert torch.equal(via_run, direct)
    with pytest.raises(UserError, match="unknown sampler 'heun'; choose one of dpm, euler, scm"):
        check_sampler("heun")


@pytest.mark.parametrize("name", ["dpm", "euler"])
def test_a_run_started_part_way_lands_on_the_data(name):
    """With the exact velocity field of one data point, starting from that point noised to any step of the
    schedule recovers it: the sliced schedule and the noised start agree on where the run begins."""
    x0, eps = torch.randn(1, 2, 4, 4, dtype=torch.float64), torch.randn(1, 2, 4, 4, dtype=torch.float64)
    entry = SAMPLERS[name]
    full = entry.schedule(12, shift=3.0)
    times = dict(zip(full.model_times.tolist(), full.times[:-1].tolist(), strict=True))

    def field(x, t):  # v = (x - x0) / sigma, sigma read back from the model time the sampler passes
        sigma = torch.tensor([times[v] for v in t.tolist()], dtype=x.dtype).view(-1, 1, 1, 1)
        return (x - x0) / sigma

    for strength in (1.0, 0.5, 0.2):
        x, schedule = start_latents(full, eps, x0, strength)
        out = entry.run(field, x.double(), schedule)
        torch.testing.assert_close(out, x0, rtol=0, atol=1e-5)
        assert schedule.steps == math.ceil(strength * 12)


def test_start_latents_without_an_image_is_the_noise():
    full = Schedule(dpm_flow_sigmas(4, 3.0))
    noise = torch.randn(1, 2, 2, 2)
    x, schedule = start_latents(full, noise)
    assert x is noise and schedule is full
    with pytest.raises(UserError, match="needs an initial image"):
        start_latents(full, noise, strength=0.5)


# --------------------------------------------------------------------------------------------- placement


def test_offloaded_component_serves_one_user_at_a_time():
    module = torch.nn.Linear(2, 2)
    policy = Offloaded(torch.device("cpu"))
    inside, overlap = [], []

    def use():
        with policy.use(module):
            inside.append(1)
            overlap.append(len(inside))
            time.sleep(0.05)
            inside.pop()

    threads = [threading.Thread(target=use) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert overlap == [1, 1, 1, 1]  # never two users inside at once
    resident = Resident(torch.device("cpu"))
    with resident.use(module) as m:
        assert m is module


def test_placement_is_what_the_pipeline_was_built_with(pipe):
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    placement = Placement.build("cpu", torch.bfloat16, offload=["text_encoder"])
    assert placement.offloaded == ("text_encoder",) and placement.decode_dtype == torch.bfloat16
    with pytest.raises(UserError, match="cannot offload dit"):
        Placement.build("cpu", torch.float32, offload=["dit"])


# ------------------------------------------------------------------------------------------------- LoRA


def test_lora_merges_and_comes_off_bit_for_bit(pipe):
    model = pipe.transformer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    dim = model.config.hidden_size

    def lora(module: str) -> dict[str, LoRALayer]:
        return {module: LoRALayer(torch.randn(2, dim, generator=g), torch.randn(dim, 2, generator=g), 0.3)}

    first = merge_lora(model, lora("transformer_blocks.0.attn1.to_q"), 0.7)
    second = merge_lora(model, lora("transformer_blocks.0.attn1.to_q"), 1.3)
    assert len(first) == 1 and first.modules == ["transformer_blocks.0.attn1.to_q"]
    assert not torch.equal(model.state_dict()["transformer_blocks.0.attn1.to_q.weight"], before[
        "transformer_blocks.0.attn1.to_q.weight"])  # fmt: skip
    with pytest.raises(UserError, match="remove the LoRAs merged later first"):
        first.remove()
    second.remove()
    first.remove()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(UserError, match="already removed"):
        first.remove()


# ------------------------------------------------------------------------------------------------- plans


def test_plan_holds_the_validated_request(pipe):
    plan = pipe.plan(["a cat", "a dog"], seed=[1, 2, 3, 4], images_per_prompt=2, guidance_scale=1.0)
    assert plan.n == 4 and plan.seed == (1, 2, 3, 4) and not plan.cfg
    f = pipe.vae.config.spatial_compression
    assert plan.latent_shape == (pipe.transformer.config.in_channels, *(s // f for s in plan.sample_size))
    params = plan.image_parameters(instruction=True)
    assert [p["prompt"] for p in params] == ["a cat", "a cat", "a dog", "a dog"]
    assert [p["seed"] for p in params] == [1, 2, 3, 4] and params[0]["negative_prompt"] is None
    assert pipe.plan("a cat", guidance_scale=4.5).cfg
    sprint = dataclasses.replace(pipe.facts, guidance_embeds=True)
    assert not plan_request(sprint, "a cat", guidance_scale=4.5).cfg  # Sprint embeds the scale instead
    with pytest.raises(UserError, match="one negative prompt per prompt"):
        pipe.plan(["a", "b"], negative_prompt=["x"])


def test_pipeline_steps_composed_by_hand_give_the_pipeline_image(pipe):
    """The functions the pipeline is made of are usable on their own (a server or a node graph composes
    them): doing its steps by hand reproduces its output."""
    kw = dict(seed=[3, 4], steps=3, height=64, width=96, guidance_scale=3.0, pag_scale=1.0, pag_layers=[1])
    expected = pipe(["a red cat", "a dog"], output_type="latent", **kw)
    plan = pipe.plan(["a red cat", "a dog"], **kw)
    cond, uncond = pipe.encode(plan)
    velocity = guided_velocity(
        dit_model(pipe.transformer, pipe.device, pipe.dtype), cond, uncond,
        scale=plan.settings.guidance_scale, pag_scale=1.0, pag_layers=[1],
    )  # fmt: skip
    noise = initial_noise(seeded_generators(plan.seed, plan.n), plan.n, plan.latent_shape)
    schedule = SAMPLERS["dpm"].schedule(3, shift=pipe.scheduler.flow_shift)
    x, schedule = start_latents(schedule, noise)
    assert torch.equal(SAMPLERS["dpm"].run(velocity, x, schedule), expected)


def test_concurrent_calls_on_one_pipeline_equal_calls_one_by_one(pipe):
    jobs = [("a red cat", 1, "dpm"), ("a blue dog", 2, "euler"), ("a green bird", 3, "dpm")]
    kw = dict(steps=3, height=64, width=64, guidance_scale=3.0)
    alone = [np.asarray(pipe(p, seed=s, sampler=m, **kw)[0]) for p, s, m in jobs]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        p, s, m = jobs[i]
        for _ in range(2):
            results[i] = np.asarray(pipe(p, seed=s, sampler=m, **kw)[0])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for i, image in enumerate(alone):
        assert np.array_equal(results[i], image), jobs[i]


def test_the_cli_offers_the_registry_samplers(monkeypatch):
    from sana.cli.main import build_parser
    from sana.samplers import dpm_solver

    monkeypatch.setitem(SAMPLERS, "dpm-copy", dpm_solver.SAMPLER)  # a sampler registered in one line
    parser = build_parser()
    args = parser.parse_args(["generate", "a cat", "--sampler", "dpm-copy"])
    assert args.sampler == "dpm-copy"
    eval_args = parser.parse_args(["eval", "shapes", "--sampler", "dpm-copy"])
    assert eval_args.sampler == "dpm-copy"
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "a cat", "--sampler", "heun"])


@pytest.mark.parametrize("name", ["dpm", "euler", "scm"])
def test_a_callback_can_hold_a_region_on_its_noised_path(name):
    """Inpainting's seam: after every step the callback puts the kept region back on the path of the original
    latent (noised to where the state now is); the sampler continues from what it returns, and the kept region
    ends as the original exactly while the repainted region is the sampler's own."""
    entry = SAMPLERS[name]
    schedule = entry.schedule(6, shift=3.0, sigma_data=0.5)
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 2, 4, 4, generator=g), torch.randn(1, 2, 4, 4, generator=g)
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1  # the left half is kept
    field = lambda x, t: 0.7 * x + x.mean(dim=(-2, -1), keepdim=True)  # noqa: E731  (couples the halves)

    def hold(info):
        return keep * schedule.noised(init, noise, info.index + 1) + (1 - keep) * info.x

    x, sched = start_latents(schedule, noise)
    free = entry.run(field, x, sched, generator=torch.Generator().manual_seed(1))
    held = entry.run(field, x, sched, generator=torch.Generator().manual_seed(1), callback=hold)
    torch.testing.assert_close(held[..., :2], init[..., :2], rtol=0, atol=1e-6)
    assert (held[..., 2:] - free[..., 2:]).abs().max() > 1e-3  # the kept half steers the rest
    assert not torch.equal(held[..., 2:], init[..., 2:])
