"""The shapes benchmark: how well a text-to-image model follows shapes-world prompts.

GenEval-style, with the analyzer in place of an object detector. For each category (`world.CATEGORIES`) it
draws fresh prompts from the grammar (seeded), generates one image per prompt (image i gets seed + i), reads
every image back with `analyzer.analyze` and scores it with `analyzer.check`:

* single: an object of the prompt's colour and shape;
* sized: the same, of the prompt's size class;
* relation: both objects, in the prompt's relation;
* counting: exactly that many objects of that colour and shape.

The model is any `generate(prompts, seeds) -> list[PIL.Image]` callable (an oracle renderer, another
library's pipeline) or a `SanaPipeline`, which `pipeline_generator` turns into one. The report gives the
accuracy per category, their mean (`overall`), the rate of every partial check, and a record per image.
"""

from __future__ import annotations

import json
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sana.errors import UserError, user_path
from sana.shapes.analyzer import analyze, check
from sana.shapes.world import CATEGORIES, PromptSpec, parse_prompt, render, render_prompt, sample_prompts

Generate = Callable[[list[str], list[int]], list[Image.Image]]

_THUMB = 160  # grid cell: image side in pixels
_LABEL = 40  # grid cell: caption strip below the image


# The analyzer's partial checks (`sana.shapes.analyzer.check`) in the order tables show them; a category has
# only some of them ("axis" and "relation" only relation prompts, for instance).
CHECKS = ("found", "colour", "shape", "size", "axis", "relation", "count", "clean")


@dataclass
class Report:
    accuracy: dict[str, float]  # category -> fraction of its images fully correct
    checks: dict[str, dict[str, float]]  # category -> check name -> fraction true
    overall: float  # mean of the category accuracies
    records: list[dict[str, Any]]  # one per image: prompt, seed, checks, analysis
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "overall": self.overall,
            "accuracy": self.accuracy,
            "checks": self.checks,
            "settings": self.settings,
            "records": self.records,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path

    def summary(self) -> str:
        """A plain-text table: accuracy and partial checks per category, then the overall score."""
        names = CHECKS
        lines = [f"{'category':<10} {'n':>4} {'accuracy':>8}  " + " ".join(f"{c:>8}" for c in names)]
        for category, acc in self.accuracy.items():
            n = sum(r["category"] == category for r in self.records)
            cells = [f"{self.checks[category][c]:8.3f}" if c in self.checks[category] else " " * 8 for c in names]
            lines.append(f"{category:<10} {n:>4} {acc:8.3f}  " + " ".join(cells))
        lines.append(f"{'overall':<10} {len(self.records):>4} {self.overall:8.3f}")
        return "\n".join(lines)


def make_prompts(
    n_per_category: int, seed: int, categories: Sequence[str] = CATEGORIES, *, background_prob: float = 0.0
) -> list[PromptSpec]:
    """The benchmark's prompts: `n_per_category` of each category, a pure function of the arguments (and of
    each category's own stream, so dropping a category leaves the others' prompts unchanged)."""
    out = []
    for category in categories:
        if category not in CATEGORIES:
            raise UserError(f"unknown category {category!r}; expected some of {CATEGORIES}")
        rng = np.random.default_rng((seed, CATEGORIES.index(category)))
        out += sample_prompts(category, n_per_category, rng, background_prob=background_prob)
    return out


def pipeline_generator(
    pipe: Any,
    *,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> Generate:
    """A `Generate` callable sampling `pipe` (a SanaPipeline) with these settings (None: the defaults)."""
    kwargs: dict[str, Any] = {"sampler": sampler, "height": height, "width": width}
    if steps is not None:
        kwargs["steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return pipe(list(prompts), seed=list(seeds), **kwargs)

    return generate


def oracle_generator(side: int = 256) -> Generate:
    """A perfect "model": renders each prompt's ground truth (seeded). Its benchmark score is 1.0."""

    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return [
            render(render_prompt(parse_prompt(p), np.random.default_rng(s), side))
            for p, s in zip(prompts, seeds, strict=True)
        ]

    return generate


def autoencoder_generator(vae: Any, side: int = 256) -> Generate:
    """The ground truth of each prompt (as `oracle_generator`) encoded and decoded by `vae` (a DCAE): what a
    model with this autoencoder would draw if its DiT were perfect, so its score is the autoencoder's ceiling."""
    import torch

    truth = oracle_generator(side)
    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype

    @torch.inference_mode()
    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        pixels = np.stack([np.asarray(im, dtype=np.float32) for im in truth(prompts, seeds)])  # (B, H, W, 3)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1).to(device, dtype)  # [-1, 1]
        y = vae.decode(vae.encode(x)).float().clamp(-1, 1).add(1).mul(127.5).round().byte()
        return [Image.fromarray(a) for a in y.permute(0, 2, 3, 1).cpu().numpy()]

    return generate


def evaluate_shapes(
    model: Any,
    *,
    n_per_category: int = 16,
    seed: int = 0,
    categories: Sequence[str] = CATEGORIES,
    batch_size: int = 8,
    background_prob: float = 0.0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    height: int | None = None,
    width: int | None = None,
    out_dir: str | Path | None = None,
    save_images: bool = False,
    grid_per_category: int = 8,
    progress: bool = False,
) -> Report:
    """Run the benchmark on `model`: a SanaPipeline (sampled with steps / guidance_scale / sampler / height /
    width; None keeps the pipeline's defaults) or a `generate(prompts, seeds) -> images` callable.

    With `out_dir`: writes report.json, grid.png (up to `grid_per_category` images per category, framed green
    when correct, red when not) and, with `save_images`, every image under images/.
    """
    sampling = {
        "steps": steps,
        "guidance_scale": guidance_scale,
        "sampler": sampler,
        "height": height,
        "width": width,
    }
    generate = _as_generate(model, sampling)
    if n_per_category < 1 or batch_size < 1:
        raise UserError(f"n_per_category and batch_size must be >= 1, got {n_per_category} and {batch_size}")
    specs = make_prompts(n_per_category, seed, categories, background_prob=background_prob)
    seeds = [seed + i for i in range(len(specs))]
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with user_path(out, "output folder", "create"):
            (out / "images" if save_images else out).mkdir(parents=True, exist_ok=True)

    records, thumbs = [], []
    shown = dict.fromkeys(categories, 0)
    starts = range(0, len(specs), batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="shapes eval", unit="batch")
    for start in starts:
        batch, batch_seeds = specs[start : start + batch_size], seeds[start : start + batch_size]
        images = generate([s.text for s in batch], batch_seeds)
        if len(images) != len(batch):
            raise ValueError(f"the model returned {len(images)} images for {len(batch)} prompts")
        for i, (spec, image_seed, image) in enumerate(zip(batch, batch_seeds, images, strict=True)):
            analysis = analyze(image)
            result = check(spec, analysis)
            index = start + i
            records.append(
                {"index": index, "category": spec.category, "prompt": spec.text, "seed": image_seed,
                 "correct": result["correct"], "checks": result, "analysis": analysis.to_json()}
            )  # fmt: skip
            if out is not None and save_images:
                image.save(out / "images" / f"{index:04d}-{spec.category}.png")
            if shown[spec.category] < grid_per_category:
                shown[spec.category] += 1
                thumbs.append((spec, image, result["correct"]))

    report = _summarise(records, list(categories))
    report.settings = {
        "n_per_category": n_per_category,
        "seed": seed,
        "categories": list(categories),
        "background_prob": background_prob,
        "batch_size": batch_size,
        **_defaults_of(model),
        **{k: v for k, v in sampling.items() if v is not None},
    }
    if out is not None:
        report.save(out / "report.json")
        make_grid(thumbs, list(categories), grid_per_category).save(out / "grid.png")
    return report


def _defaults_of(model: Any) -> dict[str, Any]:
    """What a SanaPipeline samples with when a setting is left None (its folder's), so reports say it."""
    spec = getattr(model, "scheduler", None)
    if spec is None:
        return {}
    return {"steps": spec.steps, "guidance_scale": spec.guidance_scale, "sampler": spec.sampler}


def _as_generate(model: Any, sampling: dict[str, Any]) -> Generate:
    from sana.pipeline import SanaPipeline  # torch is loaded anyway when a model is being evaluated

    if isinstance(model, SanaPipeline):
        return pipeline_generator(model, **sampling)
    if not callable(model):
        raise ValueError(f"model must be a SanaPipeline or a generate(prompts, seeds) callable, got {model!r}")
    given = [k for k, v in sampling.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to a SanaPipeline; a generate callable samples on its own")
    return model


def _summarise(records: list[dict[str, Any]], categories: list[str]) -> Report:
    accuracy, checks = {}, {}
    for category in categories:
        rows = [r["checks"] for r in records if r["category"] == category]
        accuracy[category] = float(np.mean([r["correct"] for r in rows]))
        names = list(dict.fromkeys(k for r in rows for k in r if k != "correct"))  # "background" may be rare
        checks[category] = {k: float(np.mean([r[k] for r in rows if k in r])) for k in names}
    overall = float(np.mean(list(accuracy.values())))
    return Report(accuracy, checks, overall, records)


def make_grid(
    thumbs: list[tuple[PromptSpec, Image.Image, bool]], categories: list[str], per_row: int
) -> Image.Image:
    """One row per category: each image framed green (correct) or red (wrong), its prompt printed below."""
    cell_w, cell_h = _THUMB + 8, _THUMB + 8 + _LABEL
    grid = Image.new("RGB", (max(1, per_row) * cell_w, max(1, len(categories)) * cell_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    columns = dict.fromkeys(categories, 0)
    for spec, image, correct in thumbs:
        row, col = categories.index(spec.category), columns[spec.category]
        columns[spec.category] += 1
        x, y = col * cell_w, row * cell_h
        draw.rectangle((x, y, x + _THUMB + 7, y + _THUMB + 7), fill=(0, 160, 0) if correct else (210, 0, 0))
        grid.paste(image.convert("RGB").resize((_THUMB, _THUMB), Image.BICUBIC), (x + 4, y + 4))
        label = "\n".join(textwrap.wrap(spec.text, 28)[:3])
        draw.multiline_text((x + 4, y + _THUMB + 9), label, fill=(0, 0, 0), font=font, spacing=1)
    return grid
