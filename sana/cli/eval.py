"""`sana eval shapes --model PATH`: prompt-following accuracy on the shapes world (see sana.shapes.evaluate).

Prints the accuracy per category (single, sized, relation, counting) and their mean; with --out, writes
report.json (every prompt, seed, check and detected object) and grid.png (a sample, framed green or red).

`sana eval shapes --control`: the edge ControlNet instead (sana.shapes.evaluate_control): held-out scenes drawn
from their captions with and without their edge maps, and with captions whose colours disagree with the scene;
prints the IoU of each drawn object with the scene's, per setting.
"""

from __future__ import annotations

import argparse

from sana.cli.options import add_sampler_option
from sana.errors import UserError

EXAMPLE = (
    "example:\n  sana eval shapes --n-per-category 50 --seed 3000 --out out/eval\n"
    "  sana eval shapes --control --n-scenes 100 --seed 1000 --out out/eval-control"
)
OUT_OF_MEMORY = "try a smaller --batch-size, --dtype bf16, or a smaller --height / --width"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser(
        "shapes",
        help="accuracy on fresh shapes-world prompts, scored by the shape analyzer",
        description=__doc__,
        epilog=EXAMPLE,
        allow_abbrev=False,
    )
    s.add_argument("--model", help="model folder or Hub id (default: the model shipped with the package)")
    s.add_argument("--n-per-category", type=int, default=16, help="prompts (= images) per category")
    s.add_argument("--seed", type=int, default=0, help="picks the prompts; image i is sampled with seed + i")
    s.add_argument(
        "--categories",
        help="comma-separated categories to score, e.g. counting (default: single, sized, relation, counting)",
    )
    s.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 20; Sprint 2)")
    s.add_argument(
        "--guidance", type=float, help="classifier-free guidance, <= 1: off (default: the model's, else 4.5)"
    )
    add_sampler_option(s)
    s.add_argument("--height", type=int, help="image height (default: the model's native size)")
    s.add_argument("--width", type=int, help="image width (default: the model's native size)")
    s.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    s.add_argument(
        "--background-prob", type=float, default=0.0, help='share of prompts ending "on a X background"'
    )
    s.add_argument("--no-chi", action="store_true", help="no instruction prefix (default: the model's own)")
    s.add_argument("--chi-file", help="use this file's exact contents as the complex human instruction")
    s.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype")
    s.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda")
    s.add_argument("--out", help="folder for report.json and grid.png")
    s.add_argument("--save-images", action="store_true", help="also write every image to OUT/images")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    c = s.add_argument_group("the edge ControlNet benchmark")
    c.add_argument(
        "--control",
        action="store_true",
        help="score the edge ControlNet: IoU of each drawn object with its scene's, with and without the edge map",
    )
    c.add_argument("--controlnet", help="ControlNet folder (default: the one shipped with the package)")
    c.add_argument("--control-scale", type=float, default=1.0, help="multiplies the ControlNet's residuals")
    c.add_argument("--n-scenes", type=int, default=50, help="held-out scenes (= images per setting)")


def run(args: argparse.Namespace) -> int:
    if args.control:
        return run_control(args)
    if args.controlnet is not None or args.n_scenes != 50 or args.control_scale != 1.0:
        raise UserError("--controlnet, --n-scenes and --control-scale belong to --control")
    if args.n_per_category < 1 or args.batch_size < 1:
        raise UserError("--n-per-category and --batch-size must be >= 1")
    if args.save_images and not args.out:
        raise UserError("--save-images needs --out")
    from sana.shapes.world import CATEGORIES

    given = args.categories if args.categories is not None else ",".join(CATEGORIES)
    categories = [c.strip() for c in given.split(",") if c.strip()]
    unknown = [c for c in categories if c not in CATEGORIES]
    if not categories or unknown or len(set(categories)) != len(categories):
        raise UserError(
            f"--categories takes distinct names among {', '.join(CATEGORIES)}; got {args.categories!r}"
        )
    from sana.pipeline import SanaPipeline
    from sana.pretrained import choose_instruction, default_model
    from sana.shapes.evaluate import evaluate_shapes

    instruction = choose_instruction(args.no_chi, args.chi_file)
    pipe = SanaPipeline.from_pretrained(
        args.model or default_model(), dtype=args.dtype, device=args.device, instruction=instruction
    )
    report = evaluate_shapes(
        pipe,
        n_per_category=args.n_per_category,
        seed=args.seed,
        categories=categories,
        batch_size=args.batch_size,
        background_prob=args.background_prob,
        steps=args.steps,
        guidance_scale=args.guidance,
        sampler=args.sampler,
        height=args.height,
        width=args.width,
        out_dir=args.out,
        save_images=args.save_images,
        progress=not args.quiet,
    )
    print(report.summary())
    if args.out:
        print(f"report: {args.out}/report.json  grid: {args.out}/grid.png")
    return 0


def run_control(args: argparse.Namespace) -> int:
    """`sana eval shapes --control`: the edge ControlNet benchmark (sana.shapes.evaluate_control)."""
    given = [f for f, v in (("--categories", args.categories), ("--height", args.height), ("--width", args.width),
                            ("--save-images", args.save_images or None)) if v is not None]  # fmt: skip
    if given:
        raise UserError(f"{', '.join(given)} do not apply to --control (its images are the scenes' 256x256)")
    if args.n_scenes < 1 or args.batch_size < 1:
        raise UserError("--n-scenes and --batch-size must be >= 1")
    import math

    if not math.isfinite(args.control_scale):
        raise UserError(f"--control-scale must be a finite number, got {args.control_scale}")
    from sana.pipeline import SanaPipeline
    from sana.pretrained import choose_instruction, default_model, shipped_controlnet
    from sana.shapes.evaluate_control import autoencoder_drawer, evaluate_control, pipeline_drawer

    controlnet = args.controlnet or shipped_controlnet()
    if controlnet is None:
        raise UserError("this installation ships no shapes ControlNet: pass --controlnet PATH")
    instruction = choose_instruction(args.no_chi, args.chi_file)
    pipe = SanaPipeline.from_pretrained(
        args.model or default_model(), dtype=args.dtype, device=args.device, instruction=instruction,
        controlnet=controlnet,
    )  # fmt: skip
    scale, steps, guidance = args.control_scale, args.steps, args.guidance
    draw = pipeline_drawer(pipe, control_scale=scale, steps=steps, guidance_scale=guidance, sampler=args.sampler)
    sampling = {"steps": args.steps or pipe.scheduler.steps, "sampler": args.sampler or pipe.scheduler.sampler,
                "guidance_scale": pipe.scheduler.guidance_scale if args.guidance is None else args.guidance,
                "control_scale": args.control_scale, "controlnet": str(controlnet)}  # fmt: skip
    report = evaluate_control(
        draw, n_scenes=args.n_scenes, seed=args.seed, batch_size=args.batch_size,
        ceiling=autoencoder_drawer(pipe.vae), out_dir=args.out, progress=not args.quiet, settings=sampling,
    )  # fmt: skip
    print(report.summary())
    if args.out:
        print(f"report: {args.out}/report.json  grid: {args.out}/grid.png")
    return 0
