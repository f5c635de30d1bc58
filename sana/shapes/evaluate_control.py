"""The shapes ControlNet benchmark (`sana eval shapes --control`): does the drawing follow the edge map?

Held-out scenes (`world.scene_for_index(seed, i)`, any seed the ControlNet was not trained on) give each image a
caption (the scene's full description: every object's colour, shape and size, the relation of a two-object
scene, the background) and a control image (the Canny edge map of the rendered scene, `sana.data.control.edges`,
what `sana cache --control edges` trained on). Image i is drawn with seed + i in every setting:

* without control: the caption alone (the base model; the figure to beat);
* with control: the caption and the edge map;
* colours changed: the edge map of the scene, but a caption whose object colours are all replaced (a random
  derangement of the colours allowed on that background), to see which of the two the drawing follows when they
  disagree: the colour should be the caption's, the place the edges';
* the autoencoder's ceiling: the true scene encoded and decoded (no DiT), the best any model can score.

Each image is read back by the analyzer (`analyzer.analyze`). Scene objects and drawn objects are matched
greedily by the IoU of their bounding boxes (largest first, each drawn object used once); a scene object left
without a match scores 0. Per setting: the mean IoU over all scene objects, the share of images in which every
object's IoU is at least 0.5, and, of the matched objects, the share drawn in the caption's colour and shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sana.errors import UserError, user_path
from sana.shapes.analyzer import analyze
from sana.shapes.world import COLOURS, Scene, captions, render, scene_for_index

IOU_PASS = 0.5  # an object is drawn in place when its box overlaps the scene's with at least this IoU
GOAL = {"mean_iou": 0.8, "all_placed": 0.9}  # the target with control

Box = tuple[int, int, int, int]
# (captions, control images or None, seeds) -> images; a SanaPipeline wrapped by `pipeline_drawer`
Draw = Callable[[list[str], list[Image.Image] | None, list[int]], list[Image.Image]]


def box_iou(a: Box, b: Box) -> float:
    """Intersection over union of two (x0, y0, x1, y1) boxes, x1 and y1 exclusive."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def match_objects(truth: list[Box], drawn: list[Box]) -> list[int | None]:
    """For each true box, the index of its drawn box (greedy by IoU, largest first; each used once) or None."""
    pairs = sorted(((box_iou(t, d), i, j) for i, t in enumerate(truth) for j, d in enumerate(drawn)), reverse=True)
    match: list[int | None] = [None] * len(truth)
    used: set[int] = set()
    for iou, i, j in pairs:
        if iou <= 0:
            break
        if match[i] is None and j not in used:
            match[i] = j
            used.add(j)
    return match


def recoloured(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with every object colour replaced: a derangement of the colours allowed on its background (no
    colour maps to itself, two colours never to one), so the caption disagrees with the scene on every object."""
    allowed = [c for c in COLOURS if c != scene.background]
    while True:
        order = [allowed[k] for k in rng.permutation(len(allowed))]
        mapping = dict(zip(allowed, order, strict=True))
        if all(mapping[o.colour] != o.colour for o in scene.objects):
            break
    return replace(scene, objects=tuple(replace(o, colour=mapping[o.colour]) for o in scene.objects))


def edge_map(scene: Scene) -> Image.Image:
    """The control image of a scene: Canny edges of its rendering, as `sana cache --control edges` makes them."""
    from sana.data.control import edges

    return Image.fromarray(edges(np.asarray(render(scene))))


def score_image(image: Image.Image, scene: Scene) -> dict[str, Any]:
    """One image against the scene it should show (`scene`'s boxes, colours and shapes): IoU per object."""
    analysis = analyze(image)
    drawn = analysis.objects
    match = match_objects([o.bbox for o in scene.objects], [d.bbox for d in drawn])
    objects = []
    for obj, j in zip(scene.objects, match, strict=True):
        d = drawn[j] if j is not None else None
        objects.append({
            "colour": obj.colour, "shape": obj.shape, "bbox": list(obj.bbox),
            "iou": box_iou(obj.bbox, d.bbox) if d is not None else 0.0,
            "drawn": None if d is None else {"colour": d.colour, "shape": d.shape, "bbox": list(d.bbox)},
        })  # fmt: skip
    return {"objects": objects, "drawn": len(drawn), "extra": len(drawn) - sum(j is not None for j in match)}


@dataclass
class Row:
    """The figures of one setting over all images."""

    name: str
    images: int = 0
    objects: int = 0
    iou_sum: float = 0.0
    all_placed: int = 0  # images in which every object's IoU >= IOU_PASS
    matched: int = 0
    colour: int = 0  # matched objects drawn in the caption's colour
    shape: int = 0
    scene_colour: int = 0  # matched objects drawn in the colour of the scene the edges come from

    def add(self, result: dict[str, Any], asked: Scene, edges_of: Scene) -> None:
        self.images += 1
        self.all_placed += all(o["iou"] >= IOU_PASS for o in result["objects"])
        for o, want, seen in zip(result["objects"], asked.objects, edges_of.objects, strict=True):
            self.objects += 1
            self.iou_sum += o["iou"]
            if o["drawn"] is not None:
                self.matched += 1
                self.colour += o["drawn"]["colour"] == want.colour
                self.shape += o["drawn"]["shape"] == want.shape
                self.scene_colour += o["drawn"]["colour"] == seen.colour

    def to_json(self) -> dict[str, Any]:
        share = lambda k, n: k / n if n else 0.0  # noqa: E731
        return {
            "name": self.name,
            "images": self.images,
            "objects": self.objects,
            "mean_iou": share(self.iou_sum, self.objects),
            "all_placed": share(self.all_placed, self.images),
            "colour": share(self.colour, self.matched),
            "shape": share(self.shape, self.matched),
            "scene_colour": share(self.scene_colour, self.matched),
        }


@dataclass
class ControlReport:
    rows: dict[str, dict[str, Any]]  # setting -> figures (Row.to_json)
    records: list[dict[str, Any]]  # one per scene: caption, seed, per setting the per-object results
    settings: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "settings": self.settings, "records": self.records}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")
        return path

    def summary(self) -> str:
        """A plain-text table, one line per setting."""
        head = f"{'setting':<26} {'images':>6} {'objects':>7} {'mean IoU':>8} {'all >= 0.5':>10}"
        lines = [head + f" {'colour':>7} {'shape':>6}"]
        for name, r in self.rows.items():
            lines.append(
                f"{name:<26} {r['images']:>6} {r['objects']:>7} {r['mean_iou']:>8.3f} {r['all_placed']:>10.1%}"
                f" {r['colour']:>7.1%} {r['shape']:>6.1%}"
            )
        changed = self.rows.get("colours changed")
        if changed is not None:
            lines.append(
                f"colours changed: {changed['colour']:.1%} of the matched objects take the caption's colour, "
                f"{changed['scene_colour']:.1%} the edge scene's; {changed['all_placed']:.1%} of the images "
                "have every object where the edges put it"
            )
        goal = self.rows.get("with control")
        if goal is not None:
            met = goal["mean_iou"] >= GOAL["mean_iou"] and goal["all_placed"] >= GOAL["all_placed"]
            lines.append(
                f"goal with control: mean IoU >= {GOAL['mean_iou']} and >= {GOAL['all_placed']:.0%} of images "
                f"with every object placed: {'met' if met else 'not met'}"
            )
        return "\n".join(lines)


def pipeline_drawer(
    pipe: Any,
    *,
    control_scale: float = 1.0,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
) -> Draw:
    """A `Draw` sampling `pipe` (a SanaPipeline with a ControlNet) at 256x256 with these settings."""
    kwargs: dict[str, Any] = {"sampler": sampler, "height": 256, "width": 256}
    if steps is not None:
        kwargs["steps"] = steps
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale

    def draw(prompts: list[str], controls: list[Image.Image] | None, seeds: list[int]) -> list[Image.Image]:
        if controls is None:
            return pipe(list(prompts), seed=list(seeds), **kwargs)
        return pipe(list(prompts), seed=list(seeds), control_image=controls, control_scale=control_scale, **kwargs)

    return draw


def autoencoder_drawer(vae: Any) -> Callable[[list[Scene]], list[Image.Image]]:
    """Scenes rendered, encoded and decoded by `vae`: the images a perfect DiT would give with this decoder."""
    import torch

    device, dtype = next(vae.parameters()).device, next(vae.parameters()).dtype

    @torch.inference_mode()
    def draw(scenes: list[Scene]) -> list[Image.Image]:
        pixels = np.stack([np.asarray(render(s), dtype=np.float32) for s in scenes])  # (B, H, W, 3)
        x = torch.from_numpy(pixels).permute(0, 3, 1, 2).div(127.5).sub(1).to(device, dtype)
        y = vae.decode(vae.encode(x)).float().clamp(-1, 1).add(1).mul(127.5).round().byte()
        return [Image.fromarray(a) for a in y.permute(0, 2, 3, 1).cpu().numpy()]

    return draw


SETTINGS = ("autoencoder ceiling", "without control", "with control", "colours changed")


def evaluate_control(
    draw: Draw,
    *,
    n_scenes: int = 50,
    seed: int = 1000,
    batch_size: int = 8,
    ceiling: Callable[[list[Scene]], list[Image.Image]] | None = None,
    out_dir: str | Path | None = None,
    grid_rows: int = 8,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
) -> ControlReport:
    """Run the benchmark (module docstring) with `draw` (see `pipeline_drawer`); `ceiling` (see
    `autoencoder_drawer`) adds the autoencoder's row. With `out_dir`: report.json and grid.png (per scene: the
    edge map, then the image of each setting)."""
    if n_scenes < 1 or batch_size < 1:
        raise UserError(f"the number of scenes and the batch size must be >= 1, got {n_scenes} and {batch_size}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        with user_path(out, "output folder", "create"):
            out.mkdir(parents=True, exist_ok=True)
    rows = {name: Row(name) for name in SETTINGS if name != "autoencoder ceiling" or ceiling is not None}
    records: list[dict[str, Any]] = []
    thumbs: list[list[Image.Image]] = []
    starts = range(0, n_scenes, batch_size)
    if progress:
        from tqdm import tqdm

        starts = tqdm(starts, desc="control eval", unit="batch")
    for start in starts:
        index = list(range(start, min(start + batch_size, n_scenes)))
        scenes = [scene_for_index(seed, i) for i in index]
        changed = [recoloured(s, np.random.default_rng((seed, i, 1))) for s, i in zip(scenes, index, strict=True)]
        seeds = [seed + i for i in index]
        edges = [edge_map(s) for s in scenes]
        caption = [captions(s)[0][0] for s in scenes]  # the full description (score 1.0)
        caption_changed = [captions(s)[0][0] for s in changed]
        images = {
            "without control": draw(caption, None, seeds),
            "with control": draw(caption, edges, seeds),
            "colours changed": draw(caption_changed, edges, seeds),
        }
        if ceiling is not None:
            images["autoencoder ceiling"] = ceiling(scenes)
        for k, i in enumerate(index):
            record = {"index": i, "seed": seeds[k], "caption": caption[k], "caption_changed": caption_changed[k],
                      "scene": scenes[k].to_json(), "settings": {}}  # fmt: skip
            for name in rows:
                asked = changed[k] if name == "colours changed" else scenes[k]
                result = score_image(images[name][k], scenes[k])  # the place is always the edges' scene
                rows[name].add(result, asked, scenes[k])
                record["settings"][name] = result
            records.append(record)
            if len(thumbs) < grid_rows:
                thumbs.append([edges[k]] + [images[name][k] for name in rows])
    report = ControlReport({name: row.to_json() for name, row in rows.items()}, records)
    report.settings = {"n_scenes": n_scenes, "seed": seed, "batch_size": batch_size, **(settings or {})}
    if out is not None:
        report.save(out / "report.json")
        control_grid(thumbs, ["edge map", *rows]).save(out / "grid.png")
    return report


def control_grid(rows: list[list[Image.Image]], titles: list[str], side: int = 128) -> Image.Image:
    """One row per scene: the edge map, then each setting's image; titles above the columns."""
    title_h = 16
    grid = Image.new("RGB", (len(titles) * (side + 4), title_h + len(rows) * (side + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    for c, title in enumerate(titles):
        draw.text((c * (side + 4) + 2, 2), title, fill=(0, 0, 0), font=font)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            thumb = image.convert("RGB").resize((side, side), Image.BICUBIC)
            grid.paste(thumb, (c * (side + 4) + 2, title_h + r * (side + 4)))
    return grid
