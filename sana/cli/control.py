"""`sana control edges|hed IN OUT`: a ControlNet condition image (white edges on black) from a picture."""

from __future__ import annotations

import argparse
from pathlib import Path

from sana.errors import UserError, user_path

EDGES_EXAMPLE = "  sana control edges photo.jpg edges.png"
HED_EXAMPLE = "  sana control hed photo.jpg hed.png --weights lllyasviel/Annotators"
EXAMPLE = f"example:\n{EDGES_EXAMPLE}\n{HED_EXAMPLE}"


# The library's defaults (sana.data.control.EDGE_THRESHOLDS / EDGE_WIDTH, sana.preprocess.HED_HUB_ID /
# HED_RESOLUTION), spelled out so that building the parser imports no torch; a test keeps them equal.
EDGE_THRESHOLDS = (100, 200)
EDGE_WIDTH = 3
HED_HUB_ID = "lllyasviel/Annotators"
HED_RESOLUTION = 512


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    e = sub.add_parser(
        "edges",
        help="Canny edges (OpenCV), as `sana cache --control edges` makes them for training",
        description="Canny edges of IN (OpenCV; the strongest gradient over the colour channels), widened to "
        "--width pixels, written to OUT at IN's size.",
        epilog=f"example:\n{EDGES_EXAMPLE}",
        allow_abbrev=False,
    )
    h = sub.add_parser(
        "hed",
        help="soft HED edges, what the published Sana ControlNet was trained on (weights by path or Hub id)",
        description="HED edges of IN (the holistically-nested edge detector), written to OUT at IN's size. "
        "The weights: a ControlNetHED.pth file, a folder holding it, or a Hub id (downloaded once, then cached).",
        epilog=f"example:\n{HED_EXAMPLE}",
        allow_abbrev=False,
    )
    for s in (e, h):
        s.add_argument("input", metavar="IN", help="the picture (any format PIL reads)")
        s.add_argument("output", metavar="OUT", help="the condition image to write (.png, .jpg or .webp)")
    e.add_argument("--low", type=int, default=EDGE_THRESHOLDS[0], help="Canny's lower hysteresis threshold")
    e.add_argument("--high", type=int, default=EDGE_THRESHOLDS[1], help="Canny's upper hysteresis threshold")
    e.add_argument("--width", type=int, default=EDGE_WIDTH, help="line width in pixels (1: Canny's own lines)")
    h.add_argument("--weights", default=HED_HUB_ID, help="HED weights: a file, a folder or a Hub id")
    h.add_argument(
        "--resolution", type=int, default=HED_RESOLUTION, help="the short side HED runs at (0: the picture's own)"
    )
    h.add_argument("--device", default="cpu", help="torch device")


def run(args: argparse.Namespace) -> int:
    import numpy as np
    from PIL import Image

    from sana.image_input import open_image
    from sana.images import save_image

    out = Path(args.output)
    if Image.registered_extensions().get(out.suffix.lower()) is None:
        raise UserError(f"unknown image format for {out} (use .png, .jpg or .webp)")
    rgb = np.asarray(open_image(args.input, "input image").convert("RGB"))  # (H, W, 3) uint8
    if args.action == "edges":
        from sana.data.control import edges

        if not 0 <= args.low <= args.high:
            raise UserError(f"need 0 <= --low <= --high, got {args.low} and {args.high}")
        if args.width < 1:
            raise UserError(f"--width must be >= 1, got {args.width}")
        result = edges(rgb, args.low, args.high, args.width)
    else:
        from sana.preprocess import hed_edges, load_hed

        if args.resolution < 0:
            raise UserError(f"--resolution must be >= 0, got {args.resolution}")
        model = load_hed(args.weights, device=args.device)
        result = hed_edges(rgb, model, resolution=args.resolution or None)
    with user_path(out, "output image", "write to"):
        save_image(Image.fromarray(result), out)
    print(out)
    return 0
