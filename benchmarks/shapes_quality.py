"""The shipped shapes model, measured: prompt accuracy, steps against quality, 512^2, and end-to-end time.

Every accuracy comes from `sana.shapes.evaluate.evaluate_shapes`: fresh prompts from the grammar of
sana/shapes/world.py (prompt set = a pure function of --seed, image i sampled with seed + i), each image
scored by the deterministic analyzer. Parts, each writing its own section of docs/shapes.md:

  accuracy  --n-accuracy prompts per category at the model's defaults (its sampling.json: steps, CFG), 256^2;
            also docs/shapes_grid.png
  ceiling   the same prompts' ground-truth scenes encoded and decoded by the model's autoencoder: the score a
            perfect DiT would get with this decoder (`sana.shapes.evaluate.autoencoder_generator`)
  steps     Flow-DPM-Solver and Flow-Euler at 5, 10, 14, 20, 28, 50 steps, --n-steps prompts per category,
            the same prompts and seeds for every setting; also docs/shapes_steps.png
  512       the defaults at 512x512 (16x16 latent tokens; the model was trained on 8x8 only)
  placement where the two objects of a relation prompt go, when both are drawn right: along the asked axis
            or across it, and on the asked side or mirrored; for --n-accuracy fresh prompts and for as many
            relation captions of the training set itself (regenerated from the build's dataset seed), so a
            failure to generalise and a failure to learn look different
  probe     what the DiT reads in a relation prompt: its flow-matching loss on the true scenes of --n-accuracy
            relation prompts, with the prompt as given, with its two objects swapped (the opposite scene) and
            with their colours swapped; same noise and times. A DiT that ignores a change barely moves.
            Beside it, the gaps an ideal DiT would show at t -> 1 (the prior mean latent of each prompt,
            estimated from renders), and whether one cross-attention with positional queries can read from
            the text states where each object goes (trained without noise on rendered scenes).
            Also whether the text encoder's states carry the order at all: a ridge read-out of "first or
            second object" from the last hidden state of each colour and shape word; and whether the image
            tokens know their column (a ridge read-out of it from each block's output; NoPE leaves only the
            zero padding of the Mix-FFN's 3x3 convolution to tell them)
  handoff   the DiT handed the true layout: each prompt's ground-truth scene, encoded, noised to where the
            default schedule stands after k of its steps (with the noise a normal run of that seed draws), then
            sampled the remaining steps at the defaults; --n-steps prompts per category for sized, relation
            and counting. Where accuracy jumps says which steps decide what the DiT gets wrong
  timing    `sana generate PROMPT --output F` in a fresh process, process start included, median of --runs,
            beside `python -c "import torch"` timed the same way (the floor any torch program pays here)

Run: `python benchmarks/shapes_quality.py [--only PART,PART,...] [--model PATH]` (default: every part).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from docs_section import DOCS, write_section
from PIL import Image, ImageDraw, ImageFont

from sana.flow import dit_timesteps, interpolate, velocity_target
from sana.generation import dit_model, initial_noise, model_schedule, seeded_generators, start_latents
from sana.images import to_pil
from sana.models.text_encoder import TextEncoder
from sana.pipeline import SanaPipeline
from sana.pretrained import default_model
from sana.samplers import SAMPLERS as REGISTRY
from sana.samplers.guidance import guided_velocity
from sana.samplers.schedules import dpm_flow_sigmas
from sana.shapes.analyzer import Analysis, analyze, check
from sana.shapes.build import DATA_SEED, N_IMAGES
from sana.shapes.evaluate import (
    CHECKS,
    Generate,
    Report,
    autoencoder_generator,
    evaluate_shapes,
    oracle_generator,
    pipeline_generator,
)
from sana.shapes.world import (
    CATEGORIES,
    IMAGE_SIZE,
    PromptSpec,
    Thing,
    all_prompts,
    captions,
    parse_prompt,
    render,
    render_prompt,
    sample_prompts,
    scene_for_index,
)
from sana.types import Conditioning, TextEmbeddings

DOC = DOCS / "shapes.md"
_PAGE = "# The shipped shapes model\n\nFigures written by `benchmarks/shapes_quality.py`.\n"
STEPS = (5, 10, 14, 20, 28, 50)
SAMPLERS = {name: REGISTRY[name].label for name in ("dpm", "euler")}  # the steps table's samplers
WRITE = True  # --no-write: print only
TARGETS = {"single": 0.95, "sized": 0.90, "relation": 0.75, "counting": 0.75}


def where() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def table(rows: list[tuple[str, Report]], with_targets: bool = False) -> str:
    head = "| setting | " + " | ".join(CATEGORIES) + " | mean |\n|---|" + "---:|" * (len(CATEGORIES) + 1) + "\n"
    lines = [
        f"| {name} | " + " | ".join(f"{r.accuracy[c]:.0%}" for c in CATEGORIES) + f" | {r.overall:.0%} |"
        for name, r in rows
    ]
    if with_targets:
        lines.append("| target | " + " | ".join(f"≥ {TARGETS[c]:.0%}" for c in CATEGORIES) + " | |")
    return head + "\n".join(lines) + "\n"


def checks(report: Report) -> str:
    names = CHECKS
    head = "| category | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names) + "\n"
    cell = lambda c, k: f"{report.checks[c][k]:.0%}" if k in report.checks[c] else ""
    return head + "\n".join(f"| {c} | " + " | ".join(cell(c, k) for k in names) + " |" for c in CATEGORIES)


def part_accuracy(pipe: SanaPipeline, n: int, seed: int) -> None:
    start = time.perf_counter()
    out = Path(tempfile.mkdtemp(prefix="shapes-eval-"))
    report = evaluate_shapes(pipe, n_per_category=n, seed=seed, out_dir=out, progress=True)
    if WRITE:
        Image.open(out / "grid.png").save(DOCS / "shapes_grid.png")
    met = [c for c in CATEGORIES if report.accuracy[c] >= TARGETS[c]]
    text = f"""## Accuracy at the defaults

{n} fresh prompts per category (seed {seed}), {defaults(pipe)}, 256x256, float32 on
{where()}; {time.perf_counter() - start:.0f} s in all. Targets met: {", ".join(met) or "none"}.

{table([("shipped model", report)], with_targets=True)}
Which checks pass, per category (an image is correct when every check of its category passes):

{checks(report)}

![sample grid: green frame = correct, red = wrong](shapes_grid.png)
"""
    publish("shapes_accuracy", text)


def defaults(pipe: SanaPipeline) -> str:
    spec = pipe.scheduler
    return f"{SAMPLERS.get(spec.sampler, spec.sampler)}, {spec.steps} steps, guidance {spec.guidance_scale:g}"


def part_ceiling(pipe: SanaPipeline, n: int, seed: int) -> None:
    report = evaluate_shapes(autoencoder_generator(pipe.vae), n_per_category=n, seed=seed)
    text = f"""## The autoencoder's ceiling

The same {n} prompts per category (seed {seed}), but each image is the prompt's ground-truth scene passed
through the model's autoencoder (encode, then decode): what the model would score if its DiT produced the
true scene's latents exactly. No DiT can score above this with this decoder.

{table([("ground truth through the autoencoder", report)], with_targets=True)}
{checks(report)}
"""
    publish("shapes_ceiling", text)


def part_steps(pipe: SanaPipeline, n: int, seed: int) -> None:
    results: dict[str, dict[int, Report]] = {s: {} for s in SAMPLERS}
    for sampler in SAMPLERS:
        for steps in STEPS:
            r = evaluate_shapes(pipe, n_per_category=n, seed=seed, steps=steps, sampler=sampler)
            results[sampler][steps] = r
            print(f"{sampler} {steps:>2} steps: mean {r.overall:.3f} {r.accuracy}", flush=True)
    rows = [(f"{SAMPLERS[s]}, {k} steps", results[s][k]) for s in SAMPLERS for k in STEPS]
    plot(results, DOCS / "shapes_steps.png" if WRITE else Path(tempfile.mkdtemp()) / "steps.png")
    dpm = {k: results["dpm"][k].overall for k in STEPS}
    euler = {k: results["euler"][k].overall for k in STEPS}
    verdict = (
        f"Flow-DPM-Solver at 14-20 steps: {dpm[14]:.0%} / {dpm[20]:.0%}; Flow-Euler at 28-50 steps: "
        f"{euler[28]:.0%} / {euler[50]:.0%}."
    )
    text = f"""## Steps against quality

{n} prompts per category (seed {seed}), the same prompts and seeds for every row, guidance
{pipe.scheduler.guidance_scale:g}, 256x256.
{verdict}

{table(rows)}
![mean accuracy against steps](shapes_steps.png)
"""
    publish("shapes_steps", text)


def plot(results: dict[str, dict[int, Report]], path: Path) -> None:
    """Mean accuracy against steps, one line per sampler (PIL: no plotting dependency)."""
    w, h, m = 640, 400, 60
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    xs = lambda k: m + (w - 2 * m) * (STEPS.index(k)) / (len(STEPS) - 1)
    ys = lambda a: h - m - (h - 2 * m) * a
    d.line((m, h - m, w - m, h - m), fill="black")
    d.line((m, m, m, h - m), fill="black")
    for a in (0.0, 0.25, 0.5, 0.75, 1.0):
        d.line((m - 4, ys(a), w - m, ys(a)), fill=(225, 225, 225))
        d.text((m - 40, ys(a) - 6), f"{a:.0%}", fill="black", font=font)
    for k in STEPS:
        d.text((xs(k) - 6, h - m + 8), str(k), fill="black", font=font)
    d.text((w // 2 - 20, h - 24), "steps", fill="black", font=font)
    for (sampler, label), colour in zip(SAMPLERS.items(), ((200, 0, 0), (0, 0, 200)), strict=True):
        pts = [(xs(k), ys(results[sampler][k].overall)) for k in STEPS]
        d.line(pts, fill=colour, width=3)
        for x, y in pts:
            d.ellipse((x - 4, y - 4, x + 4, y + 4), fill=colour)
        y0 = m - 40 + 16 * list(SAMPLERS).index(sampler)
        d.line((w - m - 150, y0 + 6, w - m - 120, y0 + 6), fill=colour, width=3)
        d.text((w - m - 112, y0), label, fill="black", font=font)
    d.text((m, 12), "shapes benchmark: mean accuracy of the 4 categories", fill="black", font=font)
    img.save(path)


def part_512(pipe: SanaPipeline, n: int, seed: int) -> None:
    r256 = evaluate_shapes(pipe, n_per_category=n, seed=seed)
    r512 = evaluate_shapes(pipe, n_per_category=n, seed=seed, height=512, width=512)
    if pipe.transformer.config.interpolation_scale is None:
        grid = "NoPE means nothing in it is tied to a grid size"
    else:  # sincos_positions: a grid of h cells spans [0, base_size / interpolation_scale) whatever h is
        grid = "its sincos positions are interpolated, so the 16x16 grid spans the range of the 8x8 one"
    text = f"""## Beyond the training size: 512x512

Trained on 256x256 only (8x8 latent tokens). At 512x512 the DiT sees 16x16 tokens:
{grid}, but it has never seen objects at these latent scales.
{n} prompts per category (seed {seed}), {defaults(pipe)}, the same prompts at both sizes.

{table([("256x256 (trained)", r256), ("512x512", r512)])}"""
    publish("shapes_512", text)


def part_placement(pipe: SanaPipeline, n: int, seed: int) -> None:
    fresh = [s for s in sample_prompts("relation", 2 * n, np.random.default_rng(seed)) if _distinct(s)][:n]
    seen = trained_relation_prompts(n)
    generate = pipeline_generator(pipe)
    rows = []
    for name, specs in ((f"fresh prompts (seed {seed})", fresh), ("captions of the training set", seen)):
        counts: Counter[str | None] = Counter()
        for start in range(0, len(specs), 10):  # ten images at a time bounds the decoder's memory
            batch = specs[start : start + 10]
            images = generate([s.text for s in batch], [seed + start + i for i in range(len(batch))])
            counts.update(placement(s, analyze(im)) for s, im in zip(batch, images, strict=True))
        drawn = len(specs) - counts[None]
        along = counts["asked side"] + counts["mirrored"]
        rows.append(
            f"| {name} | {len(specs)} | {drawn} | {along} of {drawn} ({along / max(drawn, 1):.0%}) | "
            f"{counts['asked side']} of {along} ({counts['asked side'] / max(along, 1):.0%}) |"
        )
    text = f"""## Where the objects of a relation prompt go

Relation prompts whose two objects differ in colour and in shape, at the defaults ({defaults(pipe)}), image i
with seed {seed} + i. Of the images where both objects were drawn right, how many put the pair along the
asked axis (side by side for "left of" / "right of", one over the other for "above" / "below"; about half
would by chance), and of those, how many put the named first object on the asked side (chance: half). The
second row asks the same of relation captions the DiT was trained on (the plain phrasing, from the first
scenes of the build's dataset, seed {DATA_SEED}): if it does no better there, it has not learned relations
at all, rather than learned them and failed to generalise.

| prompts | n | both objects right | along the asked axis | ... and on the asked side |
|---|---:|---:|---:|---:|
{chr(10).join(rows)}
"""
    publish("shapes_placement", text)


HANDOFF_SKIPS = (0, 1, 2, 3, 4, 6, 10)
HANDOFF_CATEGORIES = ("sized", "relation", "counting")  # single objects are right already


def part_handoff(pipe: SanaPipeline, n: int, seed: int) -> None:
    sigmas = dpm_flow_sigmas(pipe.scheduler.steps, pipe.scheduler.flow_shift)
    rows = []
    for skip in HANDOFF_SKIPS:
        generate = handoff_generator(pipe, skip)
        r = evaluate_shapes(generate, n_per_category=n, seed=seed, categories=HANDOFF_CATEGORIES)
        name = "none: a normal run from noise" if skip == 0 else f"after {skip} of {len(sigmas) - 1} steps"
        rows.append(
            f"| {name} | {float(sigmas[skip]):.2f} | "
            + " | ".join(f"{r.accuracy[c]:.0%}" for c in HANDOFF_CATEGORIES)
            + f" | {r.checks['relation']['axis']:.0%} |"
        )
        print(rows[-1], flush=True)
    text = f"""## Which steps decide what goes wrong: the DiT handed the true layout

{n} prompts per category (seed {seed}), {defaults(pipe)}. Each image starts as its
prompt's ground-truth scene (the scene the analyzer would score as right), encoded by the autoencoder and
noised to the noise level t where the default schedule stands after k steps, with the same noise a normal
run of that seed starts from; the DiT then samples the remaining steps as usual. A category that jumps
when k steps are handed over is lost in those first k steps; one that stays low is lost later, or by the
decoder (its ceiling is the ceiling section's).

| true layout handed over | at t | {" | ".join(HANDOFF_CATEGORIES)} | relation: along the axis |
|---|---:|{"---:|" * (len(HANDOFF_CATEGORIES) + 1)}
{chr(10).join(rows)}
"""
    publish("shapes_handoff", text)


def handoff_generator(pipe: SanaPipeline, skip: int) -> Generate:
    """Like `pipeline_generator(pipe)` at the defaults, but the first `skip` steps are replaced by the truth:
    sampling starts at the schedule's `skip`-th noise level from the ground-truth scene's latent noised there
    (x_t = (1 - t) x0 + t noise), as img2img does. skip 0 is a normal run, bit for bit."""
    spec = pipe.scheduler
    if spec.sampler != "dpm" or not 0 <= skip < spec.steps:
        raise ValueError(f"need a Flow-DPM-Solver model and 0 <= skip < {spec.steps}, got {spec.sampler}, {skip}")
    truth = oracle_generator()
    full = model_schedule("dpm", spec.steps, spec, pipe.transformer)

    @torch.inference_mode()
    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        plan = pipe.plan(prompts, seed=list(seeds), height=IMAGE_SIZE, width=IMAGE_SIZE)
        s = plan.settings
        pixels = np.stack([np.asarray(im, dtype=np.float32) for im in truth(prompts, seeds)])  # (B, H, W, 3)
        x0 = pipe.vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1)).float()
        noise = initial_noise(seeded_generators(plan.seed, plan.n), plan.n, plan.latent_shape)
        strength = (spec.steps - skip) / spec.steps  # keeps the last steps - skip steps
        x, schedule = start_latents(full, noise, None if skip == 0 else x0, strength)
        cond, uncond = pipe.encode(plan)
        model = dit_model(pipe.transformer, pipe.device, pipe.dtype)
        velocity = guided_velocity(model, cond, uncond, scale=s.guidance_scale)
        final = REGISTRY["dpm"].run(velocity, x, schedule)
        return to_pil(pipe.vae.decode(final).float(), [{} for _ in prompts])

    return generate


def _distinct(spec: PromptSpec) -> bool:
    return spec.subject.colour != spec.other.colour and spec.subject.shape != spec.other.shape


def trained_relation_prompts(n: int) -> list[PromptSpec]:
    """The first `n` plain relation captions ("a red circle above a blue square", objects distinct in colour
    and shape) of the shipped model's training set, in scene order: scenes are a pure function of
    (seed, index), so they come back without the dataset on disk."""
    out: list[PromptSpec] = []
    for index in range(N_IMAGES):
        scene = scene_for_index(DATA_SEED, index)
        if len(scene.objects) != 2:  # a relation caption of a larger scene leaves objects unsaid
            continue
        for text, _score in captions(scene):
            try:
                spec = parse_prompt(text)
            except ValueError:  # a phrasing outside the prompt grammar (sizes inside a relation, a listing)
                continue
            if spec.category == "relation" and spec.background is None:
                if _distinct(spec):
                    out.append(spec)
                break  # one caption per scene (its plain phrasing; the reversed one comes later)
        if len(out) == n:
            return out
    raise ValueError(f"the training set has fewer than {n} plain relation captions")


def placement(spec: PromptSpec, analysis: Analysis) -> str | None:
    """None unless an object matching each of the two is found; else, by the analyzer's checks, "asked side"
    (the relation holds), "mirrored" (only its axis does: the sides are swapped) or "off axis"."""
    if not all(any(o.matches(thing) for o in analysis.objects) for thing in (spec.subject, spec.other)):
        return None
    result = check(spec, analysis)
    return "asked side" if result["relation"] else "mirrored" if result["axis"] else "off axis"


def part_probe(pipe: SanaPipeline, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    pool = sample_prompts("relation", 4 * n, rng)
    specs = [s for s in pool if s.subject.colour != s.other.colour and s.subject.shape != s.other.shape][:n]
    variants = {
        "as given": specs,
        "objects swapped": [PromptSpec("relation", s.other, relation=s.relation, other=s.subject) for s in specs],
        "colours swapped": [
            PromptSpec(
                "relation",
                Thing(s.other.colour, s.subject.shape),
                relation=s.relation,
                other=Thing(s.subject.colour, s.other.shape),
            )
            for s in specs
        ],
    }
    scenes = oracle_generator()([s.text for s in specs], [seed + i for i in range(len(specs))])
    pixels = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in scenes]))  # (B, H, W, 3)
    times = (0.3, 0.5, 0.7, 0.9, 0.95, 0.98)
    with torch.inference_mode():
        x0 = pipe.vae.encode(pixels.permute(0, 3, 1, 2).div(127.5).sub(1))  # scaled latents, as the DiT sees
        texts = {k: pipe.text_encoder.encode([s.text for s in v]) for k, v in variants.items()}
        noise = torch.randn((len(times), *x0.shape), generator=torch.Generator().manual_seed(seed))
        loss = {k: [] for k in variants}
        for t, eps in zip(times, noise, strict=True):
            tt = torch.full((len(specs),), t)
            x_t, target = interpolate(x0, eps, tt), velocity_target(x0, eps)
            steps = dit_timesteps(tt, pipe.transformer.config.timestep_scale)
            for k, text in texts.items():
                loss[k].append(F.mse_loss(pipe.transformer(x_t, steps, Conditioning(text)), target).item())
    head = "| prompt | " + " | ".join(f"t = {t}" for t in times) + " |\n|---|" + "---:|" * len(times) + "\n"
    given = loss["as given"]
    cells = {
        k: " | ".join(f"{v:.4f} ({v / g - 1:+.1%})" for v, g in zip(vals, given, strict=True))
        for k, vals in loss.items()
    }
    rows = "".join(f"| {k} | {c} |\n" for k, c in cells.items())
    text = f"""## What the DiT reads in a relation prompt

The ground-truth scenes of {len(specs)} relation prompts (seed {seed}; the two objects differ in colour and in
shape) as clean latents, noised to flow time t with the same noise for every row; the DiT's flow-matching loss
(mean squared error of its velocity) when it is told the prompt as given, the prompt with its two objects
swapped ("a red circle above a blue square" -> "a blue square above a red circle", the opposite scene), and the
prompt with their colours swapped ("a blue circle above a red square"). In brackets: the change against the
prompt as given. A wrong prompt the DiT has learned to read raises the loss; one it ignores leaves it flat.

{head}{rows}
{prior_mean_gap(pipe, variants, seed)}
{role_readout(pipe.text_encoder, variants["as given"], texts["as given"], texts["objects swapped"])}
{binding_readout(pipe.text_encoder, seed)}
{position_readout(pipe, x0, texts["as given"], seed)}"""
    publish("shapes_probe", text)


def prior_mean_gap(pipe: SanaPipeline, variants: dict[str, list[PromptSpec]], seed: int, n: int = 24) -> str:
    """How big the loss table's gaps could be: at t -> 1 the DiT sees only noise, so the best it can predict is
    the mean latent of all scenes of its prompt (the prior mean), and its loss is that mean's squared error.
    Estimated on the first `n` prompts from renders: scenes of the prompt as given, scored against the prior
    mean of each variant's prompt and against a mean that ignores where things are (the scenes' mean latent
    vector, the same at every token)."""
    renders = 48  # scenes per prompt and mean: enough for the gaps, small beside the DiT's loss
    rng = np.random.default_rng(seed)

    def latents(spec: PromptSpec) -> torch.Tensor:  # (renders, C, h, w)
        pixels = np.stack([np.asarray(render(render_prompt(spec, rng)), dtype=np.float32) for _ in range(renders)])
        with torch.inference_mode():
            return pipe.vae.encode(torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1))

    error: dict[str, list[float]] = {k: [] for k in [*variants, "blind to layout"]}
    for i in range(n):
        scenes = latents(variants["as given"][i])
        # Each mean from fresh scenes of its own, so that no scene is scored against a mean it is part of.
        means = {k: latents(v[i]).mean(0) for k, v in variants.items()}
        means["blind to layout"] = scenes.mean((0, 2, 3))[:, None, None]  # (C, 1, 1)
        for k, mean in means.items():
            error[k].append(((scenes - mean) ** 2).mean().item())
    given = float(np.mean(error["as given"]))
    gaps = ", ".join(f"{k} {np.mean(v) / given - 1:+.1%}" for k, v in error.items() if k != "as given")
    return f"""For scale, the loss an ideal DiT would pay at t -> 1, where it can only predict the mean latent of
its prompt's scenes: {given:.4f} with the prompt as given (first {n} prompts, {renders} renders per mean); {gaps}.
Those are the gaps a DiT that had learned where a prompt's objects go would show at the highest t.
"""


def ridge_predict(x: np.ndarray, y: np.ndarray, cut: int, lam: float) -> np.ndarray:
    """Ridge regression with a bias column, fitted on rows [:cut] of x (rows, features); predicts rows [cut:]."""
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    coef = np.linalg.solve(x[:cut].T @ x[:cut] + lam * np.eye(x.shape[1]), x[:cut].T @ y[:cut])
    return x[cut:] @ coef


def role_readout(
    encoder: TextEncoder, specs: list[PromptSpec], given: TextEmbeddings, swapped: TextEmbeddings
) -> str:
    """Whether the order is in the text at all: can a linear read-out tell, from the text encoder's last hidden
    state at a colour or shape word, whether that word belongs to the first or the second object? `given` and
    `swapped` are the encoded prompts and their object-swapped twins, row for row."""
    feats, roles, same = [], [], []
    for s, here, there in zip(specs, given.hidden, swapped.hidden, strict=True):  # (L, C) each
        twin = PromptSpec("relation", s.other, relation=s.relation, other=s.subject)
        at_here, at_there = word_positions(encoder, s.text), word_positions(encoder, twin.text)
        for role, thing in enumerate((s.subject, s.other)):
            for word in (thing.colour, thing.shape):
                feats.append(here[at_here[word]].float().numpy())
                roles.append(2.0 * role - 1.0)
                same.append(F.cosine_similarity(here[at_here[word]], there[at_there[word]], dim=0).item())
    x, y = np.stack(feats), np.array(roles)  # (4n, C), (4n,) in {-1, +1}
    cut = 4 * (3 * len(specs) // 4)  # four words a prompt: fit on ~3/4 of the prompts, score on the rest
    held_out = float(np.mean(np.sign(ridge_predict(x, y, cut, 1e-2)) == y[cut:]))
    return f"""The text side, on the same prompts: a ridge read-out fitted on the last hidden state of each
colour and shape word of {cut // 4} prompts tells whether the word belongs to the first or the second object
for {held_out:.0%} of the words of the other {(len(x) - cut) // 4} (chance: 50%); the same word's state in the
prompt and in its swapped twin has a mean cosine similarity of {np.mean(same):.2f}. So the order is in what
the DiT reads; the loss table above says whether the DiT uses it.
"""


class _Placer(torch.nn.Module):
    """One cross-attention from a learned query per latent cell to the text states, then an MLP: each cell's
    share of the first and of the second object. The DiT's cross-attention, given the one thing a NoPE DiT
    lacks, a query that knows its cell."""

    def __init__(self, text_dim: int, cells: int, dim: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.query = torch.nn.Parameter(torch.randn(cells, dim) * 0.02)
        self.kv = torch.nn.Linear(text_dim, 2 * dim)
        self.attn = torch.nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = torch.nn.Sequential(
            torch.nn.LayerNorm(dim), torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim)
        )
        self.out = torch.nn.Linear(dim, 2)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # (B, L, C), (B, L)
        k, v = self.kv(hidden).chunk(2, dim=-1)
        x = self.query.expand(len(hidden), -1, -1)
        x = x + self.attn(x, k, v, key_padding_mask=~mask.bool())[0]
        return self.out(x + self.mlp(x))  # (B, cells, 2)


def binding_readout(encoder: TextEncoder, seed: int, grid: int = 8, steps: int = 1500) -> str:
    """Whether the text states say which object goes where, in a form one cross-attention can read: `_Placer`
    trained (supervised, no noise) on where the two objects of rendered relation scenes lie, then asked on
    held-out prompts whether the first object's predicted centre lies on the asked side of the second's."""
    pool = all_prompts("relation")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(pool))
    cut = 4 * len(pool) // 5
    fit, held = [pool[i] for i in order[:cut]], [pool[i] for i in order[cut:]]
    fit = fit * 8  # eight random scenes per prompt: the target is where the objects lie on average
    cell = IMAGE_SIZE / grid

    def occupancy(spec: PromptSpec) -> np.ndarray:  # (grid*grid, 2): each cell's share of each object's box
        edges = np.arange(grid + 1) * cell
        out = []
        for obj in render_prompt(spec, rng).objects:
            x0, y0, x1, y1 = obj.bbox
            wx = np.clip(np.minimum(edges[1:], x1) - np.maximum(edges[:-1], x0), 0, None) / cell
            wy = np.clip(np.minimum(edges[1:], y1) - np.maximum(edges[:-1], y0), 0, None) / cell
            out.append(np.outer(wy, wx).reshape(-1))  # token index = row * grid + column
        return np.stack(out, axis=1)

    with torch.inference_mode():
        text_fit, text_held = encoder.encode([s.text for s in fit]), encoder.encode([s.text for s in held])
    target = torch.from_numpy(np.stack([occupancy(s) for s in fit])).float()
    torch.manual_seed(seed)
    placer = _Placer(text_fit.hidden.shape[-1], grid * grid)
    opt = torch.optim.Adam(placer.parameters(), lr=1e-3)
    # Prompts fill the first few of the encoder's positions and the rest is masked padding: attend to the
    # longest prompt's length only (the same result, several times faster).
    length = int(max(text_fit.mask.sum(dim=1).max(), text_held.mask.sum(dim=1).max()))
    hidden, mask = text_fit.hidden[:, :length].float(), text_fit.mask[:, :length]
    held_hidden, held_mask = text_held.hidden[:, :length].float(), text_held.mask[:, :length]
    row, col = np.divmod(np.arange(grid * grid), grid)
    checkpoints, scores = (steps // 6, steps // 3, steps), []
    for step in range(1, steps + 1):
        i = torch.randint(0, len(fit), (256,))
        loss = F.mse_loss(placer(hidden[i], mask[i]), target[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in checkpoints:
            with torch.no_grad():
                share = placer(held_hidden, held_mask).clamp(min=0).numpy()  # (n, cells, 2)
            weight = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-6)
            dx = weight[..., 1] @ col - weight[..., 0] @ col  # second object's centre minus the first's
            dy = weight[..., 1] @ row - weight[..., 0] @ row
            along = [
                {"to the left of": x, "to the right of": -x, "above": y, "below": -y}[s.relation]
                for s, x, y in zip(held, dx, dy, strict=True)
            ]
            scores.append(f"{np.mean(np.array(along) > 0):.0%} after {step * 256 // 1000}k scenes")
    return f"""And whether the text says which object goes where, in a form the DiT's cross-attention could read:
one cross-attention layer from a learned query per latent cell ({grid}x{grid}) to these states, trained
without noise on where the two objects of rendered scenes lie ({len(fit) // 8} relation prompts, eight random
scenes each), puts the first object's centre on the asked side of the second's for {", ".join(scores)}, on
the {len(held)} prompts it never saw (chance: 50%). The DiT's own cross-attention reads the same states; its
queries know their cell only if the DiT has positions (the image side, below).
"""


def position_readout(pipe: SanaPipeline, x0: torch.Tensor, text: TextEmbeddings, seed: int, t: float = 0.9) -> str:
    """Whether the image tokens know where they are: a ridge read-out of each token's column from every block's
    output, fitted on three quarters of the scenes and scored on the rest, at flow time `t`."""
    outs: list[torch.Tensor] = []
    blocks = pipe.transformer.transformer_blocks
    hooks = [b.register_forward_hook(lambda _m, _i, out: outs.append(out)) for b in blocks]
    n, _, h, w = x0.shape
    try:
        with torch.inference_mode():
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + 1))
            tt = torch.full((n,), t)
            pipe.transformer(
                interpolate(x0, eps, tt),
                dit_timesteps(tt, pipe.transformer.config.timestep_scale),
                Conditioning(text),
            )
    finally:
        for hook in hooks:
            hook.remove()
    column = np.tile(np.arange(w, dtype=np.float64), h)  # token index = row * w + column
    cut = 3 * n // 4
    cells = []
    y = np.tile(column, n)  # (n*h*w,)
    truth = y[cut * h * w :]  # the held-out scenes' tokens
    for out in outs:  # (B, h*w, C) each
        guess = ridge_predict(out.float().numpy().reshape(n * h * w, -1), y, cut * h * w, 1.0)
        half = np.mean((guess > (w - 1) / 2) == (truth > (w - 1) / 2))
        cells.append(f"{1 - np.mean((guess - truth) ** 2) / np.var(truth):.2f} / {half:.0%}")
    positions = "sincos positions" if pipe.transformer.config.interpolation_scale is not None else "no positions"
    head = "| | " + " | ".join(f"block {i}" for i in range(len(cells))) + " |\n|---|" + "---:|" * len(cells)
    return f"""The image side ({positions}): a ridge read-out of each token's column (0-{w - 1}) from each block's
output at t = {t}, fitted on {cut} scenes and scored on the other {n - cut}: R² / share of tokens placed in the
correct half, left or right (chance 50%).

{head}
| column | {" | ".join(cells)} |
"""


def word_positions(encoder: TextEncoder, text: str) -> dict[str, int]:
    """Each word of `text` -> the index of its last token in the encoded sequence (<bos> is index 0)."""
    words = text.split()
    return {w: len(encoder.tokenizer.encode(" ".join(words[: k + 1]))) - 1 for k, w in enumerate(words)}


def wall(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def part_timing(model: str | None, runs: int, settings: str) -> None:
    prompt = "a red circle above a blue square"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "sana", "generate", prompt, "--seed", "0", "--output", f"{tmp}/x.png"]
        cmd += ["--model", model] if model else []
        floor = [sys.executable, "-c", "import torch"]
        wall(cmd, 1)  # warm the file cache
        ours, base = wall(cmd, runs), wall(floor, runs)
    text = f"""## End-to-end time of one 256x256 image

`sana generate "{prompt}" --seed 0 --output x.png` (the model's defaults: {settings}; float32), timed
from process start to exit, median of {runs} runs on {where()}: **{ours:.2f} s**. For scale, the same
timer around `python -c "import torch"` gives {base:.2f} s ({base / ours:.0%} of it).
"""
    publish("shapes_timing", text)


def _doc() -> Path:
    if not DOC.exists():
        DOC.write_text(_PAGE)
    return DOC


def publish(name: str, text: str) -> None:
    print(text)
    if WRITE:
        print(f"wrote {write_section(name, text, _doc())}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the shipped one)")
    p.add_argument(
        "--only",
        default="accuracy,ceiling,steps,512,placement,handoff,probe,timing",
        help="comma-separated parts to run",
    )
    p.add_argument("--n-accuracy", type=int, default=100, help="prompts per category, accuracy part")
    p.add_argument("--n-steps", type=int, default=25, help="prompts per category, steps and 512 parts")
    p.add_argument("--seed", type=int, default=1000, help="prompt set (the training data never sees prompts)")
    p.add_argument("--runs", type=int, default=5, help="timing runs")
    p.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    args = p.parse_args()
    global WRITE
    WRITE = not args.no_write
    parts = set(args.only.split(","))
    unknown = parts - {"accuracy", "ceiling", "steps", "512", "placement", "handoff", "probe", "timing"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}")
    pipe = SanaPipeline.from_pretrained(args.model or default_model())
    if "accuracy" in parts:
        part_accuracy(pipe, args.n_accuracy, args.seed)
    if "ceiling" in parts:
        part_ceiling(pipe, args.n_accuracy, args.seed)
    if "steps" in parts:
        part_steps(pipe, args.n_steps, args.seed)
    if "512" in parts:
        part_512(pipe, args.n_steps, args.seed)
    if "placement" in parts:
        part_placement(pipe, args.n_accuracy, args.seed)
    if "handoff" in parts:
        part_handoff(pipe, args.n_steps, args.seed)
    if "probe" in parts:
        part_probe(pipe, args.n_accuracy, args.seed)
    if "timing" in parts:
        part_timing(args.model, args.runs, defaults(pipe))


if __name__ == "__main__":
    main()
