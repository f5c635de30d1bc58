"""`sana quantize IN OUT --quantize MODE --quantize-text-encoder MODE`: a model folder with quantized weights.

OUT is IN with the DiT and/or the text encoder quantized by torchao (sana/quantization.py); it loads with
`sana generate --model OUT` (or `SanaPipeline.from_pretrained(OUT)`) without quantizing again, and reading it
never unpickles anything. Quantizing streams the weights block by block, so it needs little more memory than
the quantized model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sana.cli.options import add_quantize_options

EXAMPLE = (
    "example:\n"
    "  sana quantize Efficient-Large-Model/Sana_1600M_1024px_diffusers sana-1600m-int8 --quantize int8 "
    "--quantize-text-encoder int8"
)
OUT_OF_MEMORY = "quantize one component at a time, or use --dtype bf16"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="IN", help="model folder or Hub id to quantize (not itself quantized)")
    p.add_argument("output", metavar="OUT", help="new folder to write (must not exist)")
    add_quantize_options(p)
    p.add_argument(
        "--dtype",
        default="fp32",
        choices=["fp32", "bf16", "fp16"],
        help="dtype of the weights kept in high precision and of the scales",
    )
    p.add_argument("--device", default="cpu", help="the device the folder is for (int4 packs for it: cuda)")


def run(args: argparse.Namespace) -> int:
    from sana.errors import UserError

    if not args.quantize and not args.quantize_text_encoder:
        raise UserError("nothing to quantize: give --quantize, --quantize-text-encoder or both")
    out = Path(args.output)
    if out.exists():
        raise UserError(f"{out} already exists: choose a new folder for the quantized model")

    from sana.pretrained import resolve_model_dir
    from sana.quantization import write_quantized_folder
    from sana.weights import parse_dtype

    source = resolve_model_dir(args.model)
    write_quantized_folder(
        source,
        out,
        transformer=args.quantize,
        text_encoder=args.quantize_text_encoder,
        dtype=parse_dtype(args.dtype),
        device=args.device,
        progress=lambda message: print(message, file=sys.stderr),
    )
    print(out)
    return 0
