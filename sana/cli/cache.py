"""`sana cache DATA --model M --out DIR` (or `--config FILE`): precompute DC-AE latents and the text
embeddings of every caption, so training can read `kind: cache` instead of decoding and encoding each step.
Re-running on the same folder finishes an interrupted cache; finished shards are kept."""

from __future__ import annotations

import argparse

from sana.config import ConfigError
from sana.errors import UserError

_FLAGS = (
    "model",
    "out",
    "kind",
    "resolution",
    "no_buckets",
    "shard_size",
    "batch_size",
    "device",
    "dtype",
    "control",
)

EXAMPLE = "example:\n  sana cache photos --model sana/assets/shapes-model --out data/photos-cache --resolution 256"
OUT_OF_MEMORY = "try a smaller --batch-size or --resolution"


def add_arguments(p: argparse.ArgumentParser) -> None:
    # Flags default to "not given" (SUPPRESS), so a --config run can tell that none was passed beside it.
    p.argument_default = argparse.SUPPRESS
    p.add_argument(
        "data", nargs="*", default=[], help="image folder, JSONL manifest, or WebDataset .tar shard(s) / glob"
    )
    p.add_argument("--config", help="YAML/JSON with the CacheConfig keys (data: {path, ...}, model, out, ...)")
    p.add_argument("--model", help="Sana model folder or Hub id whose vae/ and text_encoder/ are used")
    p.add_argument("--out", help="cache folder to write (or complete)")
    p.add_argument("--kind", choices=["auto", "folder", "jsonl", "webdataset"], help="data kind (default: auto)")
    p.add_argument("--resolution", type=int, help="training resolution, selects the bucket table (default: 512)")
    p.add_argument("--no-buckets", action="store_true", help="square centre crops, no buckets")
    p.add_argument("--shard-size", type=int, help="samples per shard file (default: 256)")
    p.add_argument("--batch-size", type=int, help="images / captions per encoder call (default: 8)")
    p.add_argument("--device", help="torch device (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="encoder and storage dtype (default: fp32)")
    p.add_argument("--no-chi", action="store_true", default=None, help="encode captions without the instruction")
    p.add_argument("--chi-file", help="this file's exact contents as the instruction (default: the model's own)")
    p.add_argument(
        "--control",
        choices=["edges"],
        help="also cache a control image made from each image, for ControlNet training (edges: Canny lines)",
    )


def read_config_file(path: str):
    """The YAML (or JSON) value in `path`; a one-line UserError naming the file if it cannot be read or parsed."""
    from sana.config import read_yaml_file

    return read_yaml_file(path, "--config file")


def cache_config(args: argparse.Namespace):
    from sana.data.cache import CacheConfig
    from sana.data.loader import DataConfig

    args = argparse.Namespace(
        **{n: getattr(args, n, None) for n in (*_FLAGS, "no_chi", "chi_file", "config")}, data=args.data
    )

    if args.config:
        given = [
            f"--{n.replace('_', '-')}" for n in (*_FLAGS, "no_chi", "chi_file") if getattr(args, n) is not None
        ]
        if args.data or given:
            raise UserError(f"give either --config or DATA and flags, not both (got {', '.join(given) or 'DATA'})")
        data = read_config_file(args.config)
        if not isinstance(data, dict):
            raise ConfigError(f"{args.config} must hold a mapping of CacheConfig keys")
        return CacheConfig.from_dict(data, source=args.config)
    if not args.data or not args.model or not args.out:
        raise UserError("need DATA, --model and --out (or --config FILE)")
    data = DataConfig(
        path=args.data[0] if len(args.data) == 1 else tuple(args.data),
        kind=args.kind or "auto",
        resolution=args.resolution or 512,
        buckets=not args.no_buckets,
    )
    optional = {
        "shard_size": args.shard_size,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "chi": None if args.no_chi is None else not args.no_chi,
        "chi_file": args.chi_file,
        "control": args.control,
    }
    return CacheConfig(
        data=data, model=args.model, out=args.out, **{k: v for k, v in optional.items() if v is not None}
    )


def run(args: argparse.Namespace) -> int:
    import logging

    from sana.data.cache import build_cache, load_encoders

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = cache_config(args)
    vae, text_encoder = load_encoders(cfg)
    report = build_cache(
        cfg.data, cfg.out, vae=vae, text_encoder=text_encoder, shard_size=cfg.shard_size,
        batch_size=cfg.batch_size, control=cfg.control,
    )  # fmt: skip
    print(
        f"cached {report.samples} samples in {cfg.out} ({report.shards_written} shard(s) written, "
        f"{report.shards_reused} reused, {len(report.unreadable)} unreadable image(s) skipped)"
    )
    return 0
