"""`sana captions score MANIFEST --model ViT-B-32 --pretrained TAG_OR_FILE --out OUT.jsonl`: fill every
caption's CLIP score (cosine similarity with its image) with an open_clip model."""

from __future__ import annotations

import argparse

from sana.errors import UserError

EXAMPLE = (
    "example:\n  sana captions score manifest.jsonl --model ViT-B-32 --pretrained laion2b_s34b_b79k "
    "--out scored.jsonl --device cuda"
)
OUT_OF_MEMORY = "try a smaller --batch-size"


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    s = sub.add_parser(
        "score",
        help="write a copy of a JSONL manifest with CLIP scores on every caption",
        description=__doc__,
        epilog=EXAMPLE,
        allow_abbrev=False,
    )
    s.add_argument("manifest", help="JSONL manifest (one {image, captions | text} object per line)")
    s.add_argument("--out", required=True, help="manifest to write (may equal MANIFEST: written atomically)")
    s.add_argument(
        "--model", default="ViT-B-32", help='open_clip architecture, "local-dir:FOLDER" or "hf-hub:ORG/NAME"'
    )
    s.add_argument("--pretrained", help="open_clip weights tag (e.g. laion2b_s34b_b79k) or checkpoint file")
    s.add_argument("--model-config", help="an open_clip architecture JSON to register; its file stem is a --model")
    s.add_argument("--batch-size", type=int, default=32, help="images per CLIP call")
    s.add_argument("--device", default="cpu", help="torch device")


def run(args: argparse.Namespace) -> int:
    import logging

    from sana.data.captions import open_clip_scorer, score_manifest

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.pretrained is None and not args.model.startswith(("local-dir:", "hf-hub:")):
        raise UserError("--pretrained is required: a CLIP with random weights gives meaningless scores")
    scorer = open_clip_scorer(args.model, args.pretrained, model_config=args.model_config, device=args.device)
    report = score_manifest(args.manifest, args.out, scorer, batch_size=args.batch_size)
    print(f"scored {report.scored} images into {args.out} ({report.unreadable} unreadable, left unscored)")
    return 0
