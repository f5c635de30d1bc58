"""The shapes world: 1 to 4 solid circles, squares and up-pointing triangles on a flat background.

Everything here is a pure function of a numpy Generator, so a dataset is a pure function of (seed, index):
`write_dataset(out, n, seed)` gives byte-identical files for the same seed (and the same Pillow), and image i
does not depend on how many images are written.

Definitions (shared with `analyzer`, which checks generated images against them):

* Colours: the eight `COLOURS`; backgrounds: white, gray or black. An object never has the background colour.
* Size class of an object = its longest side / the image side: small [0.10, 0.20), medium [0.20, 0.35),
  large [0.35, 0.50]. Objects are *drawn* well inside their class (`_DRAWN`) so that blur, resizing or a
  slightly imprecise generator cannot move a reference object across a boundary. Medium is the unspecified
  size: captions and prompts never say "medium".
* Shapes: a circle and a square have a d x d bounding box; a triangle is equilateral, pointing up, base d
  (so its longest side, the base, is d and its height is round(d * sqrt(3) / 2)).
* Relations: "A to the left of B" (right of, above, below) is stated in captions only when it is unambiguous:
  the bounding boxes do not overlap along that axis and the centre offset along it is at least twice the
  offset across it. Judging a generated image (`relation_holds`) asks less: the offset along the axis must
  dominate the offset across it and exceed 5% of the image side. Every stated relation passes that test.

Rendering is exact (no antialiasing): pixels are either the background or one palette colour, so training
targets have pure colours and the ground truth is exact; the analyzer is built for blurred, noisy, resized
images anyway, since generated images are all of those.

Captions: every image gets several true captions of different detail, each scored by completeness: the
fraction of the scene's facts it states (one fact per object for its colour and shape, one per small or large
object for its size, one for the background, and for a two-object scene one for their spatial relation). The
full description scores 1.0; "a red circle" for a large red circle on black scores 1/3. These are not CLIP
similarities: train on them with `caption_temperature` around 0.1-0.3 (the default 0.01 would nearly always
pick the full description, and the short prompt phrasings would go unlearned).
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from sana.errors import UserError, user_path

IMAGE_SIZE = 256

RGB = tuple[int, int, int]

# Saturated colours, at least ~127 apart in RGB from each other and from every background they may sit on.
COLOURS: dict[str, RGB] = {
    "red": (255, 0, 0),
    "green": (0, 170, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (140, 0, 200),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "gray": (128, 128, 128), "black": (0, 0, 0)}
SHAPES = ("circle", "square", "triangle")

# Longest side / image side. Classes are [lo, hi); drawn sizes keep a margin of 0.02-0.03 inside them.
SIZE_CLASSES: dict[str, tuple[float, float]] = {
    "small": (0.10, 0.20),
    "medium": (0.20, 0.35),
    "large": (0.35, 0.50),
}
_DRAWN: dict[str, tuple[float, float]] = {"small": (0.12, 0.18), "medium": (0.23, 0.32), "large": (0.38, 0.47)}
SIZE_WORDS = ("small", "large")  # the sizes a caption or prompt can name; medium is the unspecified size

RELATIONS = ("to the left of", "to the right of", "above", "below")
_INVERSE = {
    "to the left of": "to the right of",
    "to the right of": "to the left of",
    "above": "below",
    "below": "above",
}
NUMBERS = {2: "two", 3: "three", 4: "four"}

_MARGIN = 0.02  # objects keep this fraction of the side away from the image border
_GAP = 0.03  # and this much from each other, so that blur never joins two objects

# ------------------------------------------------------------------------------------------------ scenes


@dataclass(frozen=True)
class ShapeObject:
    colour: str
    shape: str
    size: str  # size class: "small", "medium" or "large"
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) in pixels, x1 and y1 exclusive

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return ((x0 + x1) / 2, (y0 + y1) / 2)

    @property
    def identity(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "colour": self.colour,
            "shape": self.shape,
            "size": self.size,
            "bbox": list(self.bbox),
            "centre": list(self.centre),
        }


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[ShapeObject, ...]
    image_size: int = IMAGE_SIZE
    kind: str = "mixed"  # how it was sampled: "single", "counting", "relation", "mixed" or "prompt"

    def to_json(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "background": self.background,
            "kind": self.kind,
            "objects": [o.to_json() for o in self.objects],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Scene:
        objects = tuple(ShapeObject(o["colour"], o["shape"], o["size"], tuple(o["bbox"])) for o in data["objects"])
        return cls(data["background"], objects, data["image_size"], data["kind"])


def size_class(extent: float) -> str | None:
    """The size class of a longest side given as a fraction of the image side; None outside [0.10, 0.50]."""
    for name, (lo, hi) in SIZE_CLASSES.items():
        if lo <= extent < hi or (name == "large" and extent == hi):
            return name
    return None


def spatial_relation(a: ShapeObject, b: ShapeObject) -> str | None:
    """How `a` lies relative to `b` when that is unambiguous (see the module docstring), else None."""
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay  # image y grows downwards
    apart_x = a.bbox[2] <= b.bbox[0] or b.bbox[2] <= a.bbox[0]
    apart_y = a.bbox[3] <= b.bbox[1] or b.bbox[3] <= a.bbox[1]
    if apart_x and abs(dx) >= 2 * abs(dy):
        return "to the left of" if dx > 0 else "to the right of"
    if apart_y and abs(dy) >= 2 * abs(dx):
        return "above" if dy > 0 else "below"
    return None


def relation_holds(relation: str, a: tuple[float, float], b: tuple[float, float], side: float) -> bool:
    """Whether centre `a` is `relation` centre `b` in a generated image (the tolerant test; pixels)."""
    dx, dy = b[0] - a[0], b[1] - a[1]
    along, across = {
        "to the left of": (dx, dy),
        "to the right of": (-dx, dy),
        "above": (dy, dx),
        "below": (-dy, dx),
    }[relation]
    return along > abs(across) and along > 0.05 * side


def axis_holds(relation: str, a: tuple[float, float], b: tuple[float, float], side: float) -> bool:
    """Whether centres `a` and `b` lie along `relation`'s axis in either order (side by side for left/right,
    one over the other for above/below): the half of a relation that needs no telling the two objects apart."""
    return relation_holds(relation, a, b, side) or relation_holds(_INVERSE[relation], a, b, side)


# ------------------------------------------------------------------------------------------------ rendering


def render(scene: Scene) -> Image.Image:
    """The scene as an RGB image, drawn without antialiasing."""
    image = Image.new("RGB", (scene.image_size, scene.image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.bbox
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)  # PIL boxes include their last pixel
        elif obj.shape == "square":
            draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
        else:
            draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=fill)
    return image


def _dims(shape: str, extent: int) -> tuple[int, int]:
    """(width, height) of a shape whose longest side is `extent` pixels."""
    return (extent, round(extent * math.sqrt(3) / 2)) if shape == "triangle" else (extent, extent)


# ------------------------------------------------------------------------------------------------ layout


@dataclass
class _Item:
    colour: str
    shape: str
    size: str
    free: bool = True  # may be made smaller when the objects do not fit


def _pick(rng: np.random.Generator, options: Sequence[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _place(rng: np.random.Generator, dims: list[tuple[int, int]], side: int) -> list[tuple] | None:
    """Non-overlapping boxes (with `_GAP` between them) for objects of these sizes, or None."""
    margin, gap = round(_MARGIN * side), round(_GAP * side)
    boxes: list[tuple[int, int, int, int]] = []
    for w, h in dims:
        for _ in range(30):
            x0 = int(rng.integers(margin, side - margin - w + 1))
            y0 = int(rng.integers(margin, side - margin - h + 1))
            box = (x0, y0, x0 + w, y0 + h)
            if all(_apart(box, other, gap) for other in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _layout(
    rng: np.random.Generator,
    items: list[_Item],
    side: int,
    accept: Callable[[list[ShapeObject]], bool] | None = None,
) -> list[ShapeObject]:
    """Sizes and positions for `items`; when they do not fit (or `accept` keeps refusing), the largest free
    item is made one class smaller and the search goes on."""
    order = list(SIZE_CLASSES)
    while True:
        for _ in range(100):
            extents = [round(float(rng.uniform(*_DRAWN[it.size])) * side) for it in items]
            boxes = _place(rng, [_dims(it.shape, e) for it, e in zip(items, extents, strict=True)], side)
            if boxes is None:
                continue
            objects = [ShapeObject(it.colour, it.shape, it.size, b) for it, b in zip(items, boxes, strict=True)]
            if accept is None or accept(objects):
                return objects
        shrinkable = [it for it in items if it.free and it.size != "small"]
        if not shrinkable:
            raise RuntimeError(f"cannot lay out {items} in a {side}px image")
        largest = max(shrinkable, key=lambda it: order.index(it.size))
        largest.size = order[order.index(largest.size) - 1]


def _background_for(rng: np.random.Generator, colours: set[str]) -> str:
    return _pick(rng, [b for b in BACKGROUNDS if b not in colours])


# Scene kinds of a dataset and how often each is drawn: single objects, counting groups (2-4 objects of one
# colour and shape), two objects in a stated relation, and anything else (1-4 objects of any kind).
SCENE_KINDS = {"single": 0.25, "counting": 0.25, "relation": 0.3, "mixed": 0.2}


def kind_weights(weights: dict[str, float]) -> dict[str, float]:
    """`weights` checked and normalised, over every kind of `SCENE_KINDS` in its order (unnamed kinds: 0).

    The order and the zeros keep the random draws aligned: the default weights give the same scenes as before.
    """
    return _normalised(weights, tuple(SCENE_KINDS), "scene kind")


def size_weights(weights: dict[str, float]) -> dict[str, float]:
    """`weights` checked and normalised over the size classes (`SIZE_CLASSES` order; unnamed classes: 0): how
    often a scene's freely drawn sizes are small, medium or large. Objects that do not fit are still shrunk."""
    return _normalised(weights, tuple(SIZE_CLASSES), "size class")


def _normalised(weights: dict[str, float], names: tuple[str, ...], what: str) -> dict[str, float]:
    unknown = sorted(set(weights) - set(names))
    if unknown:
        raise UserError(f"unknown {what} name(s) {', '.join(unknown)}; choose from {', '.join(names)}")
    if (
        not all(isinstance(w, int | float) and 0 <= w < math.inf for w in weights.values())
        or not sum(weights.values()) > 0
    ):
        raise UserError(f"{what} weights must be finite, >= 0 and not all 0, got {weights}")
    total = sum(weights.values())
    return {k: weights.get(k, 0.0) / total for k in names}


def sample_scene(
    rng: np.random.Generator,
    side: int = IMAGE_SIZE,
    kinds: dict[str, float] = SCENE_KINDS,
    sizes: dict[str, float] | None = None,
) -> Scene:
    """A random scene of a kind drawn with probabilities `kinds` (normalised by `kind_weights`); free sizes are
    drawn with probabilities `sizes` (normalised by `size_weights`), or uniformly when None."""
    names = list(kinds)
    kind = names[int(rng.choice(len(names), p=list(kinds.values())))]
    background = _pick(rng, list(BACKGROUNDS))
    colours = [c for c in COLOURS if c != background]
    size_names = list(SIZE_CLASSES)

    def size() -> str:
        if sizes is None:  # the uniform draw of the default datasets: the same random stream, the same scenes
            return _pick(rng, size_names)
        return size_names[int(rng.choice(len(size_names), p=[sizes[n] for n in size_names]))]

    def item() -> _Item:
        return _Item(_pick(rng, colours), _pick(rng, SHAPES), size())

    accept = None
    if kind == "single":
        items = [item()]
    elif kind == "counting":
        first = item()
        same_size = rng.random() < 0.5
        items = [first] + [
            _Item(first.colour, first.shape, first.size if same_size else size())
            for _ in range(int(rng.integers(1, 4)))
        ]
    elif kind == "relation":
        items = [item(), item()]
        while items[1].colour == items[0].colour and items[1].shape == items[0].shape:
            items[1] = item()
        relation = _pick(rng, RELATIONS)
        accept = lambda objs: spatial_relation(objs[0], objs[1]) == relation  # noqa: E731
    else:
        items = [item() for _ in range(int(rng.integers(1, 5)))]
    objects = _layout(rng, items, side, accept)
    return Scene(background, tuple(objects), side, kind)


# ------------------------------------------------------------------------------------------------ captions


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def fix_articles(text: str) -> str:
    """ "a orange circle" -> "an orange circle"."""
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


def object_phrase(colour: str, shape: str, size: str | None = None, count: int = 1) -> str:
    """ "a red circle", "a large red circle", "three small red circles" (size None or "medium": unsaid)."""
    words = ([size] if size in SIZE_WORDS else []) + [colour, shape + ("s" if count > 1 else "")]
    return " ".join([NUMBERS[count] if count > 1 else _article(words[0]), *words])


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


@dataclass
class _Statement:
    """A caption and which facts it states (for its score)."""

    text: str
    objects: int = 0  # objects whose colour and shape it states
    sizes: int = 0  # objects whose size class it states
    background: bool = False
    relation: bool = False

    def with_background(self, background: str) -> _Statement:
        return _Statement(
            f"{self.text} on a {background} background", self.objects, self.sizes, True, self.relation
        )


def _groups(objects: Sequence[ShapeObject], by_size: bool) -> list[tuple[ShapeObject, int, str | None]]:
    """(first member, count, size to state or None) per group of objects, in reading order.

    Grouped by colour and shape (and size class when `by_size`); a group's size is stated when `by_size`.
    """
    groups: dict[tuple, list[ShapeObject]] = {}
    for obj in objects:
        groups.setdefault(obj.identity + ((obj.size,) if by_size else ()), []).append(obj)
    out = []
    for members in groups.values():
        size = members[0].size if by_size and members[0].size in SIZE_WORDS else None
        out.append((members[0], len(members), size))
    return out


def _listing(objects: Sequence[ShapeObject], by_size: bool) -> _Statement:
    parts, sizes = [], 0
    for first, count, size in _groups(objects, by_size):
        parts.append(object_phrase(first.colour, first.shape, size, count))
        sizes += count if size else 0
    return _Statement(_join(parts), len(objects), sizes)


def _relation_statement(a: ShapeObject, relation: str, b: ShapeObject, with_sizes: bool) -> _Statement:
    sa, sb = (a.size, b.size) if with_sizes else (None, None)
    text = f"{object_phrase(a.colour, a.shape, sa)} {relation} {object_phrase(b.colour, b.shape, sb)}"
    sizes = sum(s in SIZE_WORDS for s in (sa, sb))
    return _Statement(text, 2, sizes, relation=True)


def _stateable_pair(objects: Sequence[ShapeObject]) -> tuple[ShapeObject, str, ShapeObject] | None:
    """The first pair of objects unique in colour+shape with an unambiguous relation."""
    counts: dict[tuple[str, str], int] = {}
    for obj in objects:
        counts[obj.identity] = counts.get(obj.identity, 0) + 1
    unique = [o for o in objects if counts[o.identity] == 1]
    for i, a in enumerate(unique):
        for b in unique[i + 1 :]:
            relation = spatial_relation(a, b)
            if relation is not None:
                return a, relation, b
    return None


def captions(scene: Scene) -> list[tuple[str, float]]:
    """Several true captions of the scene with their completeness scores in (0, 1] (module docstring)."""
    objects = sorted(scene.objects, key=lambda o: (o.centre[0], o.centre[1]))  # reading order: left to right
    # Relations follow the stored order (random in sampled scenes), so every relation word leads a full caption.
    pair = _stateable_pair(scene.objects)
    two_related = len(objects) == 2 and pair is not None
    total = len(objects) + sum(o.size in SIZE_WORDS for o in objects) + 1 + int(two_related)

    statements: list[_Statement] = []
    if two_related:
        a, relation, b = pair
        full, plain = _relation_statement(a, relation, b, True), _relation_statement(a, relation, b, False)
        reverse = _relation_statement(b, _INVERSE[relation], a, False)
        statements += [
            full.with_background(scene.background),
            full,
            plain,
            plain.with_background(scene.background),
        ]
        statements += [reverse, _listing(objects, by_size=False)]
    else:
        full, plain = _listing(objects, by_size=True), _listing(objects, by_size=False)
        statements += [
            full.with_background(scene.background),
            full,
            plain,
            plain.with_background(scene.background),
        ]
        if pair is not None:  # three or four objects: one relation among them
            statements.append(_relation_statement(*pair, with_sizes=False))
    singles = [g for g in _groups(objects, by_size=False) if g[1] == 1]
    if len(objects) > 1 and singles:  # a partial caption naming one object
        statements.append(_Statement(object_phrase(singles[0][0].colour, singles[0][0].shape), 1))

    out, seen = [], set()
    for s in statements:
        text = fix_articles(s.text)
        if text not in seen:
            seen.add(text)
            stated = s.objects + s.sizes + int(s.background) + int(s.relation)
            out.append((text, round(stated / total, 4)))
    return out


# ------------------------------------------------------------------------------------------------ prompts

CATEGORIES = ("single", "sized", "relation", "counting")

# The prompt language of the benchmark: one template per category, plus an optional background suffix.
# Articles are fixed afterwards ("a orange" -> "an orange"); shapes are pluralised by the trailing "s".
GRAMMAR: dict[str, str] = {
    "single": "a {colour} {shape}",
    "sized": "a {size} {colour} {shape}",
    "relation": "a {colour} {shape} {relation} a {colour2} {shape2}",
    "counting": "{number} {colour} {shape}s",
}
BACKGROUND_SUFFIX = " on a {background} background"

_FIELDS = {
    "colour": tuple(COLOURS),
    "colour2": tuple(COLOURS),
    "shape": SHAPES,
    "shape2": SHAPES,
    "size": SIZE_WORDS,
    "relation": RELATIONS,
    "number": tuple(NUMBERS.values()),
    "background": tuple(BACKGROUNDS),
}


@dataclass(frozen=True)
class Thing:
    """An object a prompt asks for: colour, shape and maybe a size word."""

    colour: str
    shape: str
    size: str | None = None


@dataclass(frozen=True)
class PromptSpec:
    """A benchmark prompt: what it asks for, in structured form; `text` is its wording."""

    category: str
    subject: Thing
    count: int = 1  # counting: how many subjects
    relation: str | None = None  # relation: subject `relation` other
    other: Thing | None = None
    background: str | None = None

    def __post_init__(self) -> None:
        if self.category not in GRAMMAR:
            raise ValueError(f"unknown prompt category {self.category!r}; expected one of {CATEGORIES}")
        things = [self.subject] + ([self.other] if self.other else [])
        if self.background is not None and any(t.colour == self.background for t in things):
            raise UserError(f"an object cannot have the background colour ({self.background})")

    @property
    def things(self) -> list[Thing]:
        return [self.subject] + ([self.other] if self.other is not None else [])

    @property
    def text(self) -> str:
        s, o = self.subject, self.other
        values = {"colour": s.colour, "shape": s.shape, "size": s.size, "relation": self.relation}
        values.update(number=NUMBERS.get(self.count), colour2=o and o.colour, shape2=o and o.shape)
        text = GRAMMAR[self.category].format(**values)
        if self.background is not None:
            text += BACKGROUND_SUFFIX.format(background=self.background)
        return fix_articles(text)

    def to_json(self) -> dict[str, Any]:
        return {
            "category": self.category,
            "text": self.text,
            "subject": vars(self.subject),
            "count": self.count,
            "relation": self.relation,
            "other": vars(self.other) if self.other else None,
            "background": self.background,
        }


def _pattern(template: str) -> str:
    out = []
    for literal, name, _, _ in string.Formatter().parse(template):
        out.append(re.sub(r"\ba\b", "an?", re.escape(literal)))
        if name is not None:
            out.append(f"(?P<{name}>{'|'.join(_FIELDS[name])})")
    return "".join(out)


_PATTERNS = {c: re.compile(_pattern(t) + f"(?:{_pattern(BACKGROUND_SUFFIX)})?") for c, t in GRAMMAR.items()}


def parse_prompt(text: str) -> PromptSpec:
    """The spec of a prompt written in the grammar (any case, surrounding spaces ignored); UserError if not."""
    for category, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text.strip().lower())
        if m is None:
            continue
        g = m.groupdict()
        subject = Thing(g["colour"], g["shape"], g.get("size"))
        other = Thing(g["colour2"], g["shape2"]) if category == "relation" else None
        count = {v: k for k, v in NUMBERS.items()}[g["number"]] if category == "counting" else 1
        return PromptSpec(category, subject, count, g.get("relation"), other, g.get("background"))
    raise UserError(f"not a shapes-world prompt: {text!r}")


def all_prompts(category: str) -> list[PromptSpec]:
    """Every prompt of a category without a background suffix, in a fixed order."""
    things = [Thing(c, s) for c in COLOURS for s in SHAPES]
    if category == "single":
        return [PromptSpec("single", t) for t in things]
    if category == "sized":
        return [PromptSpec("sized", Thing(t.colour, t.shape, z)) for z in SIZE_WORDS for t in things]
    if category == "counting":
        return [PromptSpec("counting", t, n) for n in NUMBERS for t in things]
    if category == "relation":
        return [
            PromptSpec("relation", a, relation=r, other=b)
            for a in things
            for b in things
            if a != b
            for r in RELATIONS
        ]
    raise UserError(f"unknown prompt category {category!r}; expected one of {CATEGORIES}")


def sample_prompts(
    category: str, n: int, rng: np.random.Generator, *, background_prob: float = 0.0
) -> list[PromptSpec]:
    """`n` fresh random prompts of a category: drawn without replacement (so small sets cover the category
    evenly) until all are used, then again; each gets a background suffix with probability `background_prob`."""
    pool = all_prompts(category)
    out: list[PromptSpec] = []
    while len(out) < n:
        out += [pool[i] for i in rng.permutation(len(pool))[: n - len(out)]]
    result = []
    for spec in out:
        if rng.random() < background_prob:
            taken = {t.colour for t in spec.things}
            spec = PromptSpec(spec.category, spec.subject, spec.count, spec.relation, spec.other,
                              _background_for(rng, taken))  # fmt: skip
        result.append(spec)
    return result


def render_prompt(spec: PromptSpec, rng: np.random.Generator, side: int = IMAGE_SIZE) -> Scene:
    """A scene that satisfies `spec` exactly and has no other object (the benchmark's ground truth)."""
    sizes = list(SIZE_CLASSES)

    def item(thing: Thing) -> _Item:
        if thing.size is not None:
            return _Item(thing.colour, thing.shape, thing.size, free=False)
        return _Item(thing.colour, thing.shape, _pick(rng, sizes))

    accept = None
    if spec.category == "relation":
        items = [item(spec.subject), item(spec.other)]
        accept = lambda objs: spatial_relation(objs[0], objs[1]) == spec.relation  # noqa: E731
    else:
        items = [item(spec.subject) for _ in range(spec.count)]
    background = spec.background or _background_for(rng, {t.colour for t in spec.things})
    return Scene(background, tuple(_layout(rng, items, side, accept)), side, "prompt")


# ------------------------------------------------------------------------------------------------ datasets


@dataclass
class DatasetStats:
    images: int = 0
    captions: int = 0
    kinds: dict[str, int] = field(default_factory=dict)


def scene_for_index(
    seed: int,
    index: int,
    side: int = IMAGE_SIZE,
    kinds: dict[str, float] = SCENE_KINDS,
    sizes: dict[str, float] | None = None,
) -> Scene:
    """Scene `index` of the dataset with this seed (and kind and size weights): depends on nothing else."""
    return sample_scene(np.random.default_rng((seed, index)), side, kinds, sizes)


def write_dataset(
    out: str | Path,
    n: int,
    seed: int,
    *,
    side: int = IMAGE_SIZE,
    kinds: dict[str, float] = SCENE_KINDS,
    sizes: dict[str, float] | None = None,
) -> DatasetStats:
    """Write `n` scenes as out/images/NNNNNN.png, out/manifest.jsonl (image + scored captions, the format
    `sana.data` reads) and out/scenes.jsonl (the ground truth of each image, same order). `kinds` weighs the
    scene kinds (`kind_weights`), e.g. to oversample two-object relation scenes; `sizes`, when given, the size
    classes (`size_weights`), e.g. to draw groups of objects that fit with room between them."""
    kinds = kind_weights(kinds)
    sizes = None if sizes is None else size_weights(sizes)
    if n < 1:
        raise UserError(f"n must be >= 1, got {n}")
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    out = Path(out)
    with user_path(out, "output folder", "create"):
        (out / "images").mkdir(parents=True, exist_ok=True)
    stats = DatasetStats()
    width = max(6, len(str(n - 1)))
    with (
        open(out / "manifest.jsonl", "w", encoding="utf-8") as manifest,
        open(out / "scenes.jsonl", "w", encoding="utf-8") as scenes,
    ):
        for i in range(n):
            scene = scene_for_index(seed, i, side, kinds, sizes)
            name = f"images/{i:0{width}d}.png"
            render(scene).save(out / name, format="PNG")
            caps = captions(scene)
            record = {
                "image": name,
                "width": side,
                "height": side,
                "captions": [{"text": t, "score": s} for t, s in caps],
            }
            manifest.write(json.dumps(record) + "\n")
            scenes.write(json.dumps({"image": name, **scene.to_json()}) + "\n")
            stats.images += 1
            stats.captions += len(caps)
            stats.kinds[scene.kind] = stats.kinds.get(scene.kind, 0) + 1
    return stats
