"""`sana demo`: the quickest proof that everything works, offline.

Draws the demo prompt with the model shipped with the package (sana/assets/shapes-model) and checks the picture
with the shapes analyzer, printing what it found. A build without the shipped model instead builds a tiny
random-weight Sana (same architecture, toy widths), saves it as a diffusers-layout folder, loads it back
through the normal loading path and generates from it: noise-like pictures, but the same path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sana.errors import UserError

EXAMPLE = 'example:\n  sana demo --out out/demo --prompt "two green triangles"'


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="folder for the model (if built) and the image")
    p.add_argument("--prompt", default="a red circle above a blue square", help="what to draw")
    p.add_argument("--seed", type=int, default=0, help="seed")


def run(args: argparse.Namespace) -> int:
    from sana.images import save_image
    from sana.pipeline import SanaPipeline
    from sana.pretrained import save_components, shipped_model

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    model = shipped_model()
    if model is None:
        from sana.tiny import tiny_components

        model = out / "tiny-random-model"
        if not (model / "model_index.json").is_file():
            save_components(tiny_components(seed=0), model)
        print(f"no shipped model yet: using a tiny random-weight model saved at {model}")
    pipe = SanaPipeline.from_pretrained(model)
    image = pipe(args.prompt, seed=args.seed)[0]  # the model's own steps
    path = save_image(image, out / "demo.png")
    print(f"{path} ({image.width}x{image.height}, prompt {args.prompt!r}, seed {args.seed})")
    if shipped_model() is not None:
        print(_verdict(args.prompt, image))
    return 0


def _verdict(prompt: str, image) -> str:
    """What the shapes analyzer sees in the picture, and whether that is what the prompt asked for."""
    from sana.shapes.analyzer import analyze, check
    from sana.shapes.world import parse_prompt

    analysis = analyze(image)
    seen = ", ".join(f"{o.colour} {o.shape}" for o in analysis.objects) or "no object"
    try:
        spec = parse_prompt(prompt)
    except UserError:  # not a prompt of the shapes grammar: report what is there, judge nothing
        return f"analyzer: sees {seen}"
    ok = check(spec, analysis)["correct"]
    return f"analyzer: sees {seen} -> {'matches' if ok else 'does NOT match'} the prompt"
