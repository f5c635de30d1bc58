"""`sana convert CKPT.pth OUT`: an original NVlabs checkpoint -> a diffusers-layout folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sana.errors import UserError, user_path

BASE_PARTS = ("vae", "text_encoder", "tokenizer")  # what --base gives the converted folder

EXAMPLE = (
    "example:\n"
    "  sana convert Sana_600M_1024px.pth sana-600m --image-size 1024 "
    "--base Efficient-Large-Model/Sana_600M_1024px_diffusers"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="original .pth file (read with weights_only=True)")
    p.add_argument("output", help="folder to write (transformer/ and scheduler/, plus the rest with --base)")
    p.add_argument("--image-size", type=int, default=1024, help="resolution the checkpoint was trained at")
    p.add_argument("--preset", help="use this DiT preset instead of inferring the config from the weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument(
        "--base",
        help="a Sana model folder or Hub id to take vae/, text_encoder/ and tokenizer/ from (complete folder)",
    )


def run(args: argparse.Namespace) -> int:
    from sana.config import read_json
    from sana.convert import convert_checkpoint, flow_shift_for
    from sana.pretrained import SchedulerSpec, resolve_model_dir
    from sana.weights import CheckpointError, parse_dtype, save_model, write_json

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"the output {out} is a file, not a folder")
    base = resolve_model_dir(args.base) if args.base else None  # fail on a bad --base before the heavy part
    if base is not None:
        index = read_json(base / "model_index.json")
        missing = [part for part in BASE_PARTS if not (base / part).is_dir()]
        if missing:
            raise CheckpointError(f"--base {base} has no {', '.join(f'{p}/' for p in missing)}")
    model = convert_checkpoint(args.checkpoint, image_size=args.image_size, preset=args.preset)
    with user_path(out, "output folder", "write to"):
        save_model(model, out / "transformer", dtype=parse_dtype(args.dtype))
        spec = SchedulerSpec(sampler="dpm", flow_shift=flow_shift_for(args.image_size))
        write_json(out / "scheduler" / "scheduler_config.json", spec.to_dict())
        if base is not None:
            for part in BASE_PARTS:
                shutil.copytree(base / part, out / part, dirs_exist_ok=True)
            index["transformer"] = ["diffusers", "SanaTransformer2DModel"]
            index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
            write_json(out / "model_index.json", index)
    if base is not None:
        print(f"wrote a complete model folder to {out}")
    else:
        print(f"wrote {out}/transformer and {out}/scheduler; add vae/, text_encoder/, tokenizer/ (or use --base)")
    return 0
