"""`sana` entry point: a table of subcommands, each a thin module that parses and calls the library.

Command modules import nothing heavy at module level, so `sana --help` is instant; torch and the models
load when a command runs. The user's mistakes (`sana.errors.UserError`: bad settings, files, configs) print
one line, `sana COMMAND: error: MESSAGE`, and exit with status 2; `sana --debug COMMAND ...` or SANA_DEBUG=1
shows their traceback instead. Every other exception is a bug or an environment failure: it propagates with
its traceback (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from sana.errors import UserError, one_line

COMMANDS = {
    "generate": ("sana.cli.generate", "generate images from text prompts"),
    "convert": ("sana.cli.convert", "convert an original NVlabs .pth checkpoint to the diffusers layout"),
    "demo": ("sana.cli.demo", "generate a first image offline (the main job of `make demo`)"),
    "cache": ("sana.cli.cache", "precompute DC-AE latents and caption embeddings of a training set"),
    "captions": ("sana.cli.captions", "caption tools: `captions score` fills CLIP scores into a manifest"),
    "train": ("sana.cli.train", "train or fine-tune a Sana model from a run YAML (torchrun for many GPUs)"),
    "data": ("sana.cli.data", "make training data: `data shapes` writes the procedural shapes world"),
    "serve": ("sana.cli.serve", "serve an OpenAI-compatible image API over HTTP (jobs, live progress, metrics)"),
    "eval": ("sana.cli.eval", "evaluate a model: `eval shapes` scores prompt following on the shapes world"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sana", description="Sana text-to-image: run, convert, train, serve.")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of user errors too (bad settings, files, configs); also SANA_DEBUG=1",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        importlib.import_module(module).add_arguments(cmd)
        cmd.set_defaults(module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse (before Python 3.12.7) fills a `KEY=VALUE ...` positional in one go, so in `sana train run.yaml
    # --resume CKPT max_steps=9` the overrides after the option are left over; they are still the overrides.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return importlib.import_module(args.module).run(args) or 0
    except UserError as e:
        if args.debug or debug_from_env():
            raise
        print(f"sana {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2


def debug_from_env() -> bool:
    """SANA_DEBUG set to anything but "", "0", "false", "no" or "off"."""
    return os.environ.get("SANA_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


if __name__ == "__main__":
    raise SystemExit(main())
