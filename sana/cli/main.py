"""`sana` entry point: a table of subcommands, each a thin module that parses and calls the library.

Command modules import nothing heavy at module level, so `sana --help` is instant; torch and the models
load when a command runs. Each module has `add_arguments(parser)`, `run(args)` and `EXAMPLE` (the example that
ends its help), and may have `OUT_OF_MEMORY` (what to try when the device runs out of memory).

Exit statuses and what is printed:
- a usage error (argparse: unknown or abbreviated option, bad value): the usage and one error line, status 2;
- the user's mistake (`sana.errors.UserError`: bad settings, files, configs): one line,
  `sana COMMAND: error: MESSAGE`, status 2;
- a runtime failure (`sana.errors.RuntimeFailure`: the Hub unreachable, a training run that diverged; or
  torch's OutOfMemoryError): the same one line, status 1;
- anything else is a bug: it propagates with its traceback, status 1.
`sana --debug COMMAND ...` or SANA_DEBUG=1 shows the traceback of the one-line errors too.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

import sana
from sana.errors import RuntimeFailure, UserError, one_line

COMMANDS = {
    "generate": ("sana.cli.generate", "generate images from text prompts"),
    "convert": ("sana.cli.convert", "convert an original NVlabs .pth checkpoint to the diffusers layout"),
    "control": ("sana.cli.control", "make ControlNet condition images: `control edges|hed IN OUT`"),
    "demo": ("sana.cli.demo", "generate a first image offline (the main job of `make demo`)"),
    "cache": ("sana.cli.cache", "precompute DC-AE latents and caption embeddings of a training set"),
    "captions": ("sana.cli.captions", "caption tools: `captions score` fills CLIP scores into a manifest"),
    "train": ("sana.cli.train", "train or fine-tune a Sana model from a run YAML (torchrun for many GPUs)"),
    "data": ("sana.cli.data", "make training data: `data shapes` writes the procedural shapes world"),
    "serve": ("sana.cli.serve", "serve an OpenAI-compatible image API over HTTP (jobs, live progress, metrics)"),
    "eval": ("sana.cli.eval", "evaluate a model: `eval shapes` scores prompt following on the shapes world"),
    "comfyui": ("sana.cli.comfyui", "ComfyUI nodes: `comfyui install COMFYUI_DIR` links the node pack into it"),
    "quantize": ("sana.cli.quantize", "write a model folder with int8/int4 weights (torchao) for low-memory use"),
}

EXAMPLE = 'example:\n  sana demo\n  sana generate "a red circle above a blue square" --seed 0 -o out.png'


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with two changes:

    - an option's help gets "(default: X)" only where it does not already speak of its default and X says
      something (not None, False, "" or []): each default is stated once (inside a closing parenthesis
      the help already has, as "; default: X)");
    - text is filled paragraph by paragraph, and a paragraph that starts with "example:" is kept as written,
      so the example that ends each command's help can be copied line by line.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        unstated = (
            default is None
            or default is False
            or default is argparse.SUPPRESS
            or (isinstance(default, (str, list, tuple)) and not default)
        )
        shown = action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE)
        if "default" in help_text.lower() or unstated or not shown:
            return help_text
        # "TCP port (0: any free port)" -> "TCP port (0: any free port; default: 8000)"
        if help_text.endswith(")"):
            return f"{help_text[:-1]}; default: %(default)s)"
        return f"{help_text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = [p for p in text.strip("\n").split("\n\n") if p.strip()]
        filled = []
        for paragraph in paragraphs:
            if paragraph.lstrip().startswith(("example:", "examples:")):
                filled.append("\n".join(indent + line for line in paragraph.strip("\n").splitlines()))
            else:
                filled.append(super()._fill_text(paragraph, width, indent))
        return "\n\n".join(filled)


def configure(parser: argparse.ArgumentParser) -> None:
    """What every parser, sub-subcommands included, shares: the formatter and no abbreviated options (argparse
    would read `--image` as `--images-per-prompt`)."""
    parser.formatter_class = HelpFormatter
    parser.allow_abbrev = False
    for child in subparsers(parser):
        configure(child)


def subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    return [
        child
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for child in dict.fromkeys(action.choices.values())
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sana",
        description=f"Sana text-to-image: {', '.join(COMMANDS)}. `sana COMMAND --help` shows a command's "
        "options and an example.",
        epilog=EXAMPLE,
        formatter_class=HelpFormatter,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"sana {sana.__version__}")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of one-line errors too (bad settings, files, configs, runtime failures); "
        "also SANA_DEBUG=1",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter, allow_abbrev=False
        )
        module = importlib.import_module(module_name)
        module.add_arguments(cmd)
        cmd.epilog = "\n\n".join(text for text in (cmd.epilog, module.EXAMPLE) if text)
        cmd.set_defaults(module=module_name)
    configure(parser)
    return parser


def command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub-)subcommand that `args` ran, so its usage errors show its own usage."""
    for name in (args.command, getattr(args, "action", None)):
        children = {
            key: child
            for action in parser._actions
            if isinstance(action, argparse._SubParsersAction)
            for key, child in action.choices.items()
        }
        if name not in children:
            break
        parser = children[name]
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse (before Python 3.12.7) fills a `KEY=VALUE ...` positional in one go, so in `sana train run.yaml
    # --resume CKPT max_steps=9` the overrides after the option are left over; they are still the overrides.
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") or "=" not in e for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    module = importlib.import_module(args.module)
    try:
        return module.run(args) or 0
    except Exception as e:
        failure = explain(e, args, module)
        if failure is None or args.debug or debug_from_env():
            raise
        status, message = failure
        print(f"sana {args.command}: error: {message}", file=sys.stderr)
        return status


def explain(error: Exception, args: argparse.Namespace, module) -> tuple[int, str] | None:
    """(exit status, one-line message) for a failure the user can act on; None for a bug."""
    if isinstance(error, RuntimeFailure):  # first: a HubUnavailableError is a CheckpointError too
        return 1, one_line(error)
    if isinstance(error, UserError):
        return 2, one_line(error)
    if is_out_of_memory(error):
        device = getattr(args, "device", None) or "the device"
        hint = getattr(module, "OUT_OF_MEMORY", "try a smaller workload")
        return 1, f"out of memory on {device}: {hint}"
    return None


def is_out_of_memory(error: BaseException) -> bool:
    """torch's OutOfMemoryError (a device allocation that failed). Without torch loaded it cannot be one."""
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) or getattr(
        getattr(torch, "cuda", None), "OutOfMemoryError", None
    )
    return oom is not None and isinstance(error, oom)


def debug_from_env() -> bool:
    """SANA_DEBUG set to anything but "", "0", "false", "no" or "off"."""
    return os.environ.get("SANA_DEBUG", "").strip().lower() not in ("", "0", "false", "no", "off")


if __name__ == "__main__":
    raise SystemExit(main())
