"""`sana data shapes --n N --seed S --out DIR`: write a procedural training set (see `sana.shapes.world`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from sana.errors import UserError

EXAMPLE = "example:\n  sana data shapes --n 10000 --seed 0 --out data/shapes"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser(
        "shapes",
        help="flat coloured shapes with scored captions: DIR/images/*.png, manifest.jsonl, scenes.jsonl",
        description=__doc__,
        epilog=EXAMPLE,
        allow_abbrev=False,
    )
    s.add_argument("--n", type=int, required=True, help="number of images")
    s.add_argument("--seed", type=int, default=0, help="the same seed writes byte-identical files")
    s.add_argument("--out", required=True, help="output folder (created)")
    s.add_argument("--size", type=int, default=256, help="image side in pixels")
    s.add_argument(
        "--kinds",
        default=None,
        metavar="KIND=W,...",
        help="scene kind weights, e.g. relation=0.5,single=0.2,counting=0.2,mixed=0.1 (unnamed kinds: 0); "
        "default: single=0.25,counting=0.25,relation=0.3,mixed=0.2",
    )
    s.add_argument(
        "--sizes",
        default=None,
        metavar="SIZE=W,...",
        help="size class weights for the sizes a scene draws freely, e.g. small=0.4,medium=0.4,large=0.2 "
        "(unnamed classes: 0); default: all three equally likely",
    )
    s.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def parse_weights(text: str, flag: str) -> dict[str, float]:
    """'relation=0.5,single=0.5' -> {'relation': 0.5, 'single': 0.5} (names and values are checked by
    `write_dataset`, with `kind_weights` or `size_weights`, before it writes anything)."""
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            weight = float(value) if sep else None
        except ValueError:
            weight = None
        if weight is None:
            raise UserError(f"{flag} takes NAME=WEIGHT pairs separated by commas, got {item!r}")
        if name in weights:
            raise UserError(f"{flag} names {name!r} twice")
        weights[name] = weight
    return weights


def run(args: argparse.Namespace) -> int:
    import time

    from sana.shapes.world import SCENE_KINDS, write_dataset

    out = Path(args.out)
    if (out / "manifest.jsonl").exists() and not args.overwrite:
        raise UserError(f"{out} already holds a dataset (manifest.jsonl); pass --overwrite to replace it")
    if args.size < 64:
        raise UserError(f"--size must be at least 64, got {args.size}")
    kinds = SCENE_KINDS if args.kinds is None else parse_weights(args.kinds, "--kinds")
    sizes = None if args.sizes is None else parse_weights(args.sizes, "--sizes")
    start = time.perf_counter()
    stats = write_dataset(out, args.n, args.seed, side=args.size, kinds=kinds, sizes=sizes)
    seconds = time.perf_counter() - start
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(stats.kinds.items()))
    print(f"wrote {stats.images} images ({kinds}) with {stats.captions} captions to {out} in {seconds:.1f} s")
    print(f"train on {out / 'manifest.jsonl'} (ground truth in {out / 'scenes.jsonl'})")
    return 0
