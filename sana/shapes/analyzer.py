"""Read a shapes-world image back: background, objects (colour, shape, size class, position), and whether it
shows what a prompt asked for.

Method (deterministic, numpy + Pillow only):

1. The image is resized so that its shorter side is 256 (`ANALYSIS_SIDE`): box-averaged down (which also
   averages noise away) or bicubic up (so that step 2 keeps the corners of small objects in small images).
   Bounding boxes are reported in the input's pixels.
2. A 3x3 median filter removes speckle noise (generated images are never exactly flat); it also shaves a
   pixel off sharp corners (a triangle's apex).
3. Background = the per-channel median of a thin border frame; its name is the nearest of `BACKGROUNDS`
   (None if none is within the colour tolerance).
4. Foreground = pixels farther than `fg_threshold` (RGB Euclidean) from the background colour. Palette
   colours lie at least ~147 from any background they may appear on, so 60 keeps blurred edges out of the
   way while no object pixel is lost.
5. Connected components (4-connectivity) by run-length labelling with union-find: each row is cut into runs
   of foreground pixels, and runs that overlap in consecutive rows are joined. Components below `min_area`
   (a fraction of the image) or `min_extent` (longest side, a fraction of the shorter image side) are noise.
6. Per component:
   * colour = the nearest palette colour to the median RGB of its core (pixels at least 80% as far from the
     background as its 95th percentile, so the blended rim is left out), or None if farther than
     `colour_tolerance`;
   * the mask is then cut at half the component's contrast with the background, so a blurred edge is
     measured where the sharp edge was; on it:
   * size class = longest bbox side / the image's shorter side (`world.size_class`);
   * taper = mean row width in the top quarter / in the bottom quarter: ~0.14 for an up-pointing triangle,
     ~1 for circles and squares; fill = area / bbox area: 1 for a square, pi/4 ~ 0.785 for a circle, 0.5 for
     a triangle; aspect = width / height;
   * shape: none unless aspect is within [0.5, 2]; triangle if taper < 0.45 and fill in [0.3, 0.7]; else,
     with taper in [0.6, 1.65], square if fill >= 0.87 and circle if fill >= 0.65. Anything else (blobs,
     merged objects, down-pointing triangles) gets shape None.

`check(spec, analysis)` then answers, per prompt category, which parts of the prompt the image satisfies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from sana.errors import UserError
from sana.shapes.world import BACKGROUNDS, COLOURS, RGB, PromptSpec, Thing, axis_holds, relation_holds, size_class

ANALYSIS_SIDE = 256  # images are analysed with their shorter side resized to this
MAX_OBJECTS = 8  # twice the most a scene holds: more objects than this and an image is judged noise

_PALETTE_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (8, 3)


@dataclass(frozen=True)
class DetectedObject:
    colour: str | None  # nearest palette colour, None if no palette colour is close
    shape: str | None  # "circle", "square", "triangle", or None when it is none of them
    size: str | None  # size class; None if smaller than small or larger than large
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) pixels, x1/y1 exclusive
    area: int  # pixels
    rgb: RGB  # median colour
    fill: float
    taper: float

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    def matches(self, thing: Thing) -> bool:
        return (
            self.colour == thing.colour
            and self.shape == thing.shape
            and (thing.size is None or self.size == thing.size)
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "bbox": list(self.bbox),
            "area": self.area,
            "rgb": list(self.rgb),
            "fill": round(self.fill, 3),
            "taper": round(self.taper, 3),
        }


@dataclass(frozen=True)
class Analysis:
    width: int
    height: int
    background: str | None
    background_rgb: RGB
    objects: tuple[DetectedObject, ...]

    @property
    def side(self) -> int:
        return min(self.width, self.height)

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width,
            "height": self.height,
            "background": self.background,
            "background_rgb": list(self.background_rgb),
            "objects": [o.to_json() for o in self.objects],
        }


# ------------------------------------------------------------------------------------------------ analysis


def analyze(
    image: Image.Image | np.ndarray,
    *,
    fg_threshold: float = 60.0,
    colour_tolerance: float = 100.0,
    min_area: float = 0.0008,
    min_extent: float = 0.05,
    min_thickness: float = 0.03,
) -> Analysis:
    """The background and the objects of a shapes image (PIL image or (H, W, 3) uint8 array, sides >= 32).

    Components smaller than `min_area` (a fraction of the image area), whose longest side is below
    `min_extent` (a fraction of the shorter image side; the smallest drawn object is 0.12), or whose mean
    thickness (area / longest side) is below `min_thickness` of it are noise. The last rule drops the thin
    lines a decoder's zero padding can leave along the image border; the thinnest drawn object, a small
    triangle, is about 0.05 thick.
    """
    pil = Image.fromarray(np.asarray(image, dtype=np.uint8)) if isinstance(image, np.ndarray) else image
    pil = pil.convert("RGB")
    width, height = pil.size
    if min(width, height) < 32:
        raise UserError(f"image too small to analyze: {width}x{height}")
    # Measured at a fixed size (module docstring, step 1); boxes are scaled back to the input's pixels.
    scale = min(width, height) / ANALYSIS_SIDE
    if scale != 1:
        pil = pil.resize((round(width / scale), round(height / scale)), Image.BOX if scale > 1 else Image.BICUBIC)
    pixels = np.asarray(pil.filter(ImageFilter.MedianFilter(3)), dtype=np.float32)  # (h, w, 3)
    h, w = pixels.shape[:2]

    border = max(1, min(w, h) // 64)
    frame = np.concatenate(
        [
            pixels[:border].reshape(-1, 3),
            pixels[-border:].reshape(-1, 3),
            pixels[:, :border].reshape(-1, 3),
            pixels[:, -border:].reshape(-1, 3),
        ]
    )
    bg = np.median(frame, axis=0)  # (3,)
    bg_names = list(BACKGROUNDS)
    bg_dist = np.linalg.norm(np.array([BACKGROUNDS[b] for b in bg_names], np.float32) - bg, axis=1)
    background = bg_names[int(bg_dist.argmin())] if bg_dist.min() <= colour_tolerance else None

    mask = np.linalg.norm(pixels - bg, axis=2) > fg_threshold  # (h, w)
    objects = []
    for runs in connected_runs(mask):
        area = int(sum(x1 - x0 for _, x0, x1 in runs))
        if area < min_area * w * h:
            continue
        obj = _describe(runs, pixels, bg, min(w, h), colour_tolerance, scale)
        x0, y0, x1, y1 = obj.bbox
        longest = max(x1 - x0, y1 - y0)  # in the input's pixels, as min_extent is
        thick = area * scale * scale / max(longest, 1)
        if longest >= min_extent * min(width, height) and thick >= min_thickness * min(width, height):
            objects.append(obj)
    objects.sort(key=lambda o: (o.centre[0], o.centre[1]))
    bg_rgb = tuple(int(round(float(v))) for v in bg)
    return Analysis(width, height, background, bg_rgb, tuple(objects))


def connected_runs(mask: np.ndarray) -> list[list[tuple[int, int, int]]]:
    """The 4-connected components of a boolean (H, W) mask, each as its runs (row, x0, x1 exclusive)."""
    padded = np.zeros((mask.shape[0], mask.shape[1] + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    edges = np.diff(padded, axis=1)  # (H, W+1): +1 where a run starts, -1 one past where it ends
    rows, starts = np.nonzero(edges == 1)  # row-major order, so the k-th start and k-th end share a run
    _, ends = np.nonzero(edges == -1)
    runs = list(zip(rows.tolist(), starts.tolist(), ends.tolist(), strict=True))
    row_start = np.searchsorted(rows, np.arange(mask.shape[0] + 1)).tolist()  # first run of each row

    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for y in range(1, mask.shape[0]):
        i, i_end = row_start[y - 1], row_start[y]  # runs of the previous row
        j, j_end = row_start[y], row_start[y + 1]
        while i < i_end and j < j_end:  # merge-walk both sorted run lists; overlap = shared columns
            _, a0, a1 = runs[i]
            _, b0, b1 = runs[j]
            if a0 < b1 and b0 < a1:
                ra, rb = find(i), find(j)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if a1 < b1:
                i += 1
            else:
                j += 1
    components: dict[int, list[tuple[int, int, int]]] = {}
    for k, run in enumerate(runs):
        components.setdefault(find(k), []).append(run)
    return list(components.values())  # ordered by each component's first run (top-down, left-right)


def _describe(
    runs: list[tuple[int, int, int]],
    pixels: np.ndarray,
    bg: np.ndarray,
    side: int,
    tolerance: float,
    scale: float,
) -> DetectedObject:
    ys = np.concatenate([np.full(b - a, y) for y, a, b in runs])  # (n,) every pixel of the component
    xs = np.concatenate([np.arange(a, b) for _, a, b in runs])
    colours = pixels[ys, xs]  # (n, 3)
    # The colour is read from the core: pixels nearly as far from the background as the component gets. On a
    # small, blurred object most pixels are rim, blended with the background, and would pull the median.
    dist_bg = np.linalg.norm(colours - bg, axis=1)  # (n,)
    rgb = np.median(colours[dist_bg >= 0.8 * np.percentile(dist_bg, 95)], axis=0)
    dist = np.linalg.norm(_PALETTE - rgb, axis=1)
    colour = _PALETTE_NAMES[int(dist.argmin())] if dist.min() <= tolerance else None

    # Measure the shape at half contrast: a blurred edge then sits where the sharp edge was, whatever the
    # blur, instead of wherever the (lower, global) detection threshold happens to cut it.
    keep = dist_bg >= 0.5 * np.linalg.norm(rgb - bg)
    ys, xs = ys[keep], xs[keep]
    x0, x1, y0, y1 = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
    w, h = x1 - x0, y1 - y0
    widths = np.bincount(ys - y0, minlength=h)  # (h,) pixels per row
    quarter = max(1, h // 4)
    taper = float(widths[:quarter].mean() / max(widths[-quarter:].mean(), 1e-6))
    fill = len(ys) / (w * h)
    return DetectedObject(
        colour=colour,
        shape=_classify_shape(fill, taper, w / h),
        size=size_class(max(w, h) / side),
        bbox=tuple(round(v * scale) for v in (x0, y0, x1, y1)),
        area=round(len(ys) * scale * scale),
        rgb=tuple(int(round(float(v))) for v in rgb),
        fill=fill,
        taper=taper,
    )


def _classify_shape(fill: float, taper: float, aspect: float) -> str | None:
    if not 0.5 <= aspect <= 2.0:
        return None
    if taper < 0.45 and 0.3 <= fill <= 0.7:
        return "triangle"
    if 0.6 <= taper <= 1.65:  # small circles drawn with few pixel rows taper unevenly
        if fill >= 0.87:  # between a circle's 0.785 and a square's 1, nearer the square: blur rounds corners
            return "square"
        if fill >= 0.65:
            return "circle"
    return None


# ------------------------------------------------------------------------------------------------ checking


def check(spec: PromptSpec, analysis: Analysis) -> dict[str, bool]:
    """Which parts of `spec` the analysed image satisfies. Keys, for each category:

    clean: at most MAX_OBJECTS objects were found; more means the image is clutter or noise rather than a
        scene, where a match could be pure chance, so it is never correct;
    found: at least as many objects as the prompt needs (1, 2 for a relation, n for counting);
    colour / shape: every colour / every shape the prompt names appears on some object;
    size (sized): an object with the prompt's colour, shape and size class;
    relation (relation): an object matching the subject lies `relation` an object matching the other;
    axis (relation): such a pair lies along the relation's axis, in either order (`axis_holds`); an image with
        the axis right but not the relation drew the scene mirrored;
    count (counting): exactly `count` objects with the prompt's colour and shape;
    background (only when the prompt names one): the background is that colour;
    correct: the whole prompt holds: single = an object of that colour and shape; sized = also of that size;
    relation = the relation; counting = the count; and always clean (and the background, when named).
    """
    objs = analysis.objects
    things = spec.things
    out = {
        "clean": len(objs) <= MAX_OBJECTS,
        "found": len(objs) >= {"relation": 2, "counting": spec.count}.get(spec.category, 1),
        "colour": all(any(o.colour == t.colour for o in objs) for t in things),
        "shape": all(any(o.shape == t.shape for o in objs) for t in things),
    }
    subject = [o for o in objs if o.matches(spec.subject)]
    if spec.category == "single":
        out["correct"] = bool(subject)
    elif spec.category == "sized":
        out["size"] = out["correct"] = bool(subject)
    elif spec.category == "relation":
        pairs = [(a.centre, b.centre) for a in subject for b in objs if b.matches(spec.other) and a is not b]
        out["axis"] = any(axis_holds(spec.relation, a, b, analysis.side) for a, b in pairs)
        out["relation"] = out["correct"] = any(
            relation_holds(spec.relation, a, b, analysis.side) for a, b in pairs
        )
    else:
        out["count"] = out["correct"] = len(subject) == spec.count
    if spec.background is not None:
        out["background"] = analysis.background == spec.background
        out["correct"] = out["correct"] and out["background"]
    out["correct"] = out["correct"] and out["clean"]
    return out
