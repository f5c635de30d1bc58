"""`sana convert CKPT.pth OUT`: an original NVlabs checkpoint (DiT or ControlNet) -> a diffusers-layout folder."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from sana.errors import UserError, user_path

BASE_PARTS = ("vae", "text_encoder", "tokenizer")  # what --base gives the converted folder

EXAMPLE = (
    "example:\n"
    "  sana convert Sana_600M_1024px.pth sana-600m --image-size 1024 "
    "--base Efficient-Large-Model/Sana_600M_1024px_diffusers\n"
    "  sana convert Sana_600M_1024px_ControlNet_HED.pth sana-600m-hed "
    "--base Efficient-Large-Model/Sana_600M_1024px_diffusers"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="original .pth file (read with weights_only=True)")
    p.add_argument(
        "output",
        help="folder to write: transformer/ and scheduler/ (a ControlNet checkpoint: controlnet/ too, and the "
        "base it holds, if any), plus the rest with --base",
    )
    p.add_argument("--image-size", type=int, default=1024, help="resolution the checkpoint was trained at")
    p.add_argument("--preset", help="use this DiT preset instead of inferring the config from the weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument(
        "--base",
        help="a Sana model folder or Hub id to take vae/, text_encoder/ and tokenizer/ from (and transformer/ "
        "and scheduler/ for a ControlNet checkpoint without its base): a complete folder",
    )


def run(args: argparse.Namespace) -> int:
    from sana.config import read_config, read_json
    from sana.convert import convert_original, flow_shift_for, is_controlnet_checkpoint, read_original_checkpoint
    from sana.models.dit import DiTConfig
    from sana.pretrained import SchedulerSpec, resolve_model_dir
    from sana.weights import CONFIG_NAME, CheckpointError, parse_dtype, save_model, write_json

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"the output {out} is a file, not a folder")
    base = resolve_model_dir(args.base) if args.base else None  # fail on a bad --base before the heavy part
    if base is not None:
        index = read_json(base / "model_index.json")
        missing = [part for part in BASE_PARTS if not (base / part).is_dir()]
        if missing:
            raise CheckpointError(f"--base {base} has no {', '.join(f'{p}/' for p in missing)}")
    original = read_original_checkpoint(args.checkpoint)
    preset = args.preset
    if preset is None and base is not None and is_controlnet_checkpoint(original):
        if not (base / "transformer").is_dir():
            raise CheckpointError(f"--base {base} has no transformer/ for the ControlNet to steer")
        preset = read_config(DiTConfig, base / "transformer" / CONFIG_NAME)  # the model the ControlNet steers
    model, controlnet = convert_original(
        original, image_size=args.image_size, preset=preset, source=args.checkpoint
    )
    borrowed = ("transformer", "scheduler") if model is None and base is not None else ()  # the base's own
    dtype = parse_dtype(args.dtype)
    with user_path(out, "output folder", "write to"):
        if controlnet is not None:
            save_model(controlnet, out / "controlnet", dtype=dtype)
        if model is not None:
            save_model(model, out / "transformer", dtype=dtype)
            spec = SchedulerSpec(sampler="dpm", flow_shift=flow_shift_for(args.image_size))
            write_json(out / "scheduler" / "scheduler_config.json", spec.to_dict())
        if base is not None:
            for part in BASE_PARTS + borrowed:
                if (base / part).is_dir():
                    shutil.copytree(base / part, out / part, dirs_exist_ok=True)
            if model is not None:
                index["transformer"] = ["diffusers", "SanaTransformer2DModel"]
                index["scheduler"] = ["diffusers", "DPMSolverMultistepScheduler"]
            if controlnet is not None:
                index["_class_name"] = "SanaControlNetPipeline"
                index["controlnet"] = ["diffusers", controlnet.diffusers_class_name]
            write_json(out / "model_index.json", index)
    if base is not None:
        print(f"wrote a complete model folder to {out}")
    elif model is None:
        print(f"wrote {out}/controlnet; steer a base model with it: sana generate --controlnet {out} ...")
    else:
        also = f"{out}/controlnet, " if controlnet is not None else ""
        print(
            f"wrote {also}{out}/transformer and {out}/scheduler; add vae/, text_encoder/, tokenizer/ (or --base)"
        )
    return 0
