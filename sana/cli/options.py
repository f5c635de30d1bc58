"""Option values the commands share, read from the library's registries."""

from __future__ import annotations

import argparse
from collections.abc import Iterator


class SamplerChoices:
    """The `--sampler` choices: the names in the samplers' registry (sana.samplers.SAMPLERS), so a sampler added
    there is offered here. Read when argparse first needs them (checking a value, printing a command's help),
    because importing the registry loads torch, which `sana --help` must not."""

    def _names(self) -> list[str]:
        from sana.samplers import SAMPLERS

        return list(SAMPLERS)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()


SAMPLER_CHOICES = SamplerChoices()


def add_sampler_option(parser: argparse.ArgumentParser) -> None:
    """`--sampler NAME`, one of the registry's names (default: the model folder's scheduler)."""
    parser.add_argument(
        "--sampler",
        choices=SAMPLER_CHOICES,
        metavar="NAME",  # a metavar keeps argparse from reading the registry (torch) when building the parser
        help="one of %(choices)s (default: the model folder's scheduler)",
    )


def add_low_memory_options(parser: argparse.ArgumentParser, low_memory_help: str) -> None:
    """What `sana generate` and `sana serve` offer to fit a small device: quantization, offloading, a memory
    budget, and the older --low-memory (the text encoder alone offloaded, also on a CPU-only machine)."""
    add_quantize_options(parser)
    parser.add_argument(
        "--offload",
        choices=["model", "sequential"],
        help="keep models on the CPU and bring them to --device only to run: model (each whole, while it runs) "
        "or sequential (block by block: the least memory, the slowest); needs a device other than the CPU",
    )
    parser.add_argument(
        "--max-memory",
        metavar="SIZE",
        help="most memory the process may hold on --device, e.g. 8GB or 7.5GiB (RAM on the CPU); the "
        "autoencoder decodes in tiles to stay under it (default: what is free; on the CPU at most a quarter "
        "of the RAM for a decode)",
    )
    parser.add_argument("--low-memory", action="store_true", help=low_memory_help)


def add_quantize_options(parser: argparse.ArgumentParser) -> None:
    """--quantize and --quantize-text-encoder (torchao modes; see sana/quantization.py)."""
    parser.add_argument(
        "--quantize",
        choices=["w8a8", "int8", "int4"],
        help="quantize the DiT with torchao: w8a8 (int8 weights and activations, the paper's scheme), int8 or "
        "int4 weight-only (int4: CUDA and --dtype bf16 only)",
    )
    parser.add_argument(
        "--quantize-text-encoder",
        choices=["int8", "int4"],
        help="quantize the text encoder with torchao: int8 or int4 weight-only (int4: CUDA and --dtype bf16 only)",
    )


def low_memory_settings(args: argparse.Namespace) -> dict:
    """The `SanaPipeline.from_pretrained` keywords of the options above (a one-line error for a contradiction)."""
    from sana.errors import UserError

    if args.low_memory and args.offload:
        raise UserError("--low-memory and --offload contradict each other: give one")
    from sana.placement import parse_memory

    return {
        "quantize": args.quantize,
        "quantize_text_encoder": args.quantize_text_encoder,
        "offload": args.offload or (("text_encoder",) if args.low_memory else ()),
        "max_memory": parse_memory(args.max_memory),
    }
