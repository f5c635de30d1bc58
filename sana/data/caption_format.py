"""A caption as the data spells it: its text and, optionally, its CLIP score, and `parse_captions`, which reads
the forms a manifest or a sidecar JSON file may hold. Both the data sources (sources.py) and caption selection
and scoring (captions.py) build on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from sana.errors import UserError


@dataclass(frozen=True)
class Caption:
    text: str
    score: float | None = None  # CLIP cosine similarity with the image; None = not scored


def parse_captions(value: Any, source: str) -> tuple[Caption, ...]:
    """Captions from a JSON value: "text", ["a", "b"], or [{"text": "a", "score": 0.3}, ...].

    Raises UserError naming `source` for anything else, an empty caption, or scores on only some captions.
    """
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items:
        raise UserError(f"{source}: no caption (expected a string or a non-empty list of captions)")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Caption(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("text"), str):
            score = item.get("score")
            if score is not None and (not isinstance(score, int | float) or not math.isfinite(score)):
                raise UserError(f"{source}: caption score must be a finite number, got {score!r}")
            out.append(Caption(item["text"].strip(), None if score is None else float(score)))
        else:
            raise UserError(f"{source}: a caption must be a string or an object with a 'text' string")
    if any(not c.text.strip() for c in out):
        raise UserError(f"{source}: empty caption")
    scored = sum(c.score is not None for c in out)
    if 0 < scored < len(out):
        raise UserError(
            f"{source}: {scored} of {len(out)} captions have a score; score all of them (sana captions score) "
            "or none"
        )
    return tuple(out)
