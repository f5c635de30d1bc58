"""`sana demo`: the quickest proof that everything works, offline.

Uses the model shipped with the package when there is one; until then it builds a tiny random-weight Sana
(same architecture, toy widths), saves it as a diffusers-layout folder, loads it back through the normal
loading path and generates from it. A random model draws noise-like pictures: the point is the path.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="folder for the model (if built) and the image")
    p.add_argument("--prompt", default="a red circle above a blue square", help="what to draw")
    p.add_argument("--seed", type=int, default=0, help="seed")


def run(args: argparse.Namespace) -> int:
    from sana.images import save_image
    from sana.pipeline import SanaPipeline
    from sana.pretrained import save_components, shipped_model

    out = Path(args.out)
    model = shipped_model()
    if model is None:
        from sana.tiny import tiny_components

        model = out / "tiny-random-model"
        if not (model / "model_index.json").is_file():
            save_components(tiny_components(seed=0), model)
        print(f"no shipped model yet: using a tiny random-weight model saved at {model}")
    pipe = SanaPipeline.from_pretrained(model)
    image = pipe(args.prompt, seed=args.seed, steps=20)[0]
    path = save_image(image, out / "demo.png")
    print(f"{path} ({image.width}x{image.height}, prompt {args.prompt!r}, seed {args.seed})")
    return 0
