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
