"""Draw docs/images/conditioning.png, the README's picture of image-conditioned generation with the shipped models.

One row, left to right: a text-to-image start picture; img2img from it with another prompt; the inpainting mask
(white = repaint); the inpainted result; the start picture's edge map; the shipped edge ControlNet drawing the
edge map's layout in the colours of a prompt that disagrees with the start picture. Every panel is what the
command under it in docs/conditioning.md makes.

    .venv/bin/python benchmarks/conditioning_figure.py        # ~10 s on a laptop CPU
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from sana.data.control import edges
from sana.pipeline import SanaPipeline
from sana.pretrained import shipped_controlnet, shipped_model

ROOT = Path(__file__).resolve().parents[1]
START = "a red circle above a blue square"


def panels() -> list[tuple[str, Image.Image]]:
    pipe = SanaPipeline.from_pretrained(shipped_model(), controlnet=shipped_controlnet())
    start = pipe(START, seed=0)[0]
    varied = pipe("a yellow circle above a blue square", image=start, strength=0.6, seed=1)[0]
    mask = Image.new("L", start.size, 0)
    mask.paste(255, (0, 0, start.width, start.height // 2))  # repaint the top half
    inpaint = "a green triangle above a blue square on a black background"
    repainted = pipe(inpaint, image=start, mask_image=mask, seed=2)[0]
    edge_map = Image.fromarray(edges(np.asarray(start.convert("RGB"))))
    controlled = pipe("a purple circle above an orange square", control_image=edge_map, seed=3)[0]
    return [
        (f'"{START}"', start),
        ("img2img 0.6: yellow circle", varied),
        ("mask (white = repaint)", mask.convert("RGB")),
        ("inpaint: green triangle", repainted),
        ("sana control edges", edge_map),
        ("ControlNet: purple / orange", controlled),
    ]


def strip(items: list[tuple[str, Image.Image]], caption_height: int = 22, gap: int = 6) -> Image.Image:
    side = items[0][1].width
    out = Image.new("RGB", (len(items) * (side + gap) - gap, side + caption_height), "white")
    draw = ImageDraw.Draw(out)
    for i, (caption, image) in enumerate(items):
        x = i * (side + gap)
        out.paste(image.convert("RGB"), (x, 0))
        draw.text((x + 2, side + 5), caption[:42], fill="black")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "conditioning.png")
    args = p.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    strip(panels()).save(args.out, optimize=True)
    print(args.out)


if __name__ == "__main__":
    main()
