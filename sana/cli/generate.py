"""`sana generate PROMPT [PROMPT ...]`: text to PNG files, with the parameters stored in each PNG.

Into a folder, image i is `{i:03d}-{slug}-{seed+i}.png`; an image whose file is already there is skipped, so
re-running an interrupted command makes only what is missing. `torchrun --nproc-per-node K -m sana generate
--seed S ...` shards the images over K processes (sana/cli/sharding.py), each on its own device; together they
write the files one process writes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
from pathlib import Path

from sana.cli.options import add_low_memory_options, add_sampler_option, low_memory_settings
from sana.cli.sharding import batches, launch_from_env, rank_device, shard
from sana.errors import UserError, read_user_file

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

EXAMPLE = 'example:\n  sana generate "a red circle above a blue square" --seed 0 -o out.png'
OUT_OF_MEMORY = (
    "try --offload model (or sequential), --quantize int8, --low-memory, a smaller --batch-size, or a smaller "
    "--height / --width (see docs/low-memory.md)"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help='text prompts ("" generates unconditionally)')
    p.add_argument("--prompts-file", help="a text file with one prompt per line (added after PROMPTs)")
    p.add_argument("--model", help="model folder or Hub id (default: the model shipped with the package)")
    p.add_argument("--seed", type=int, help="seed of the first image; image i uses seed+i (default: random)")
    p.add_argument("--images-per-prompt", type=int, default=1, help="images for each prompt")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's, else 20; Sprint 2)")
    p.add_argument(
        "--guidance", type=float, help="classifier-free guidance scale, <= 1: off (default: the model's, else 4.5)"
    )
    add_sampler_option(p)
    p.add_argument("--height", type=int, help="image height, a multiple of 32 (default: the model's native size)")
    p.add_argument("--width", type=int, help="image width, a multiple of 32 (default: the model's native size)")
    p.add_argument("--negative-prompt", default="", help="what to steer away from (used with guidance > 1)")
    p.add_argument(
        "--no-chi", action="store_true", help="do not prefix prompts with the complex human instruction"
    )
    p.add_argument("--chi-file", help="use this file's exact contents as the complex human instruction")
    p.add_argument("--no-binning", action="store_true", help="sample at the exact size, not the nearest bucket")
    p.add_argument("--pag-scale", type=float, default=0.0, help="perturbed-attention guidance scale (0: off)")
    p.add_argument("--pag-layers", type=int, nargs="+", default=[0], help="blocks perturbed by PAG")
    p.add_argument("--lora", help="LoRA weights to merge: a pytorch_lora_weights.safetensors or its folder")
    p.add_argument("--lora-scale", type=float, default=1.0, help="strength of the LoRA (0: none, 1: as trained)")
    p.add_argument(
        "--controlnet",
        help="a Sana ControlNet folder or Hub id to steer the model with (a model folder with a controlnet/ "
        "brings its own; without --model, the shipped model's edge ControlNet); needs --control-image",
    )
    p.add_argument(
        "--control-image",
        help="the ControlNet's condition image (e.g. from `sana control edges`), resized and centre-cropped to "
        "the image size",
    )
    p.add_argument(
        "--control-scale", type=float, default=1.0, help="strength of the ControlNet (0: none, 1: as trained)"
    )
    p.add_argument(
        "--image",
        help="start from this image (img2img; with --mask, inpainting), resized and centre-cropped to the "
        "image size",
    )
    p.add_argument(
        "--strength",
        type=float,
        help="with --image: how much to change it, in (0, 1]; the last ceil(strength x steps) steps run "
        "(default: 0.6; with --mask 1)",
    )
    p.add_argument("--mask", help="with --image: repaint where this mask is white, keep where it is black")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="compute dtype")
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device, e.g. cpu, cuda, cuda:1, mps; under torchrun, cuda means each rank's cuda:LOCAL_RANK",
    )
    add_low_memory_options(p, "keep the text encoder on the CPU between prompts")
    p.add_argument(
        "--output",
        "-o",
        default="outputs",
        help="a file for one image (overwritten), else a folder; images whose file is already in the folder "
        "are skipped, so a re-run makes only the missing ones",
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=4,
        help="images per pipeline call; each batch is saved when done. Every image has its own seed and "
        "generator, so this changes memory and speed, not the images",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.epilog = (
        "Many processes: `torchrun --nproc-per-node K -m sana generate --prompts-file P --seed S --output DIR` "
        "shards the images over K processes (image i on rank i % K), each on its own device (--device cuda: "
        "cuda:LOCAL_RANK); they write the same files as one process. A fixed --seed is required there."
    )


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.prompts_file:
        lines = read_user_file(args.prompts_file, "--prompts-file").splitlines()
        prompts += [line for line in lines if line.strip()]
    if not prompts:
        raise UserError("no prompt given (pass PROMPT arguments or --prompts-file)")
    return prompts


def is_file_output(output: str, n: int) -> bool:
    """One image and an image file name: written there (and overwritten); otherwise `output` is a folder."""
    return n == 1 and Path(output).suffix.lower() in IMAGE_SUFFIXES


def output_paths(output: str, prompts: list[str], per_prompt: int, seeds: list[int]) -> list[Path]:
    """Where each image goes; checks the location is writable before any model work."""
    out = Path(output)
    n = len(prompts) * per_prompt
    if is_file_output(output, n):
        paths, folder = [out], out.parent
    else:
        if out.suffix.lower() in IMAGE_SUFFIXES:
            raise UserError(f"{n} images need a folder for --output, got the file name {out}")
        folder = out
        paths = []
        for i in range(n):
            slug = re.sub(r"[^a-z0-9]+", "-", prompts[i // per_prompt].lower()).strip("-")[:40] or "empty"
            paths.append(out / f"{i:03d}-{slug}-{seeds[i]}.png")
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None or not existing.is_dir() or not os.access(existing, os.W_OK):
        raise UserError(f"cannot write to {folder}")
    return paths


def check_control(args: argparse.Namespace):
    """The decoded --control-image (None without one), after the cheap checks of the ControlNet options: each
    mistake is one line before the model loads."""
    import math

    from sana.config import read_json
    from sana.image_input import open_image
    from sana.pretrained import controlnet_dir, default_model, resolve_model_dir, shipped_controlnet

    if not math.isfinite(args.control_scale):
        raise UserError(f"--control-scale must be a finite number, got {args.control_scale}")
    if args.control_image is None:
        if args.controlnet:
            raise UserError("--controlnet steers nothing without --control-image")
        return None
    image = open_image(args.control_image, "control image")
    if args.controlnet is None and args.model is None and shipped_controlnet() is not None:
        args.controlnet = str(shipped_controlnet())  # the shipped model comes with its edge ControlNet
    if args.controlnet:
        controlnet_dir(args.controlnet)  # a folder that is no ControlNet fails now, not after loading the model
    elif "controlnet" not in read_json(resolve_model_dir(args.model or default_model()) / "model_index.json"):
        raise UserError(
            "--control-image needs a ControlNet: pass --controlnet PATH, or a --model folder with a controlnet/"
        )
    return image


def fit_control_image(pipe, image, args: argparse.Namespace, tag: str):
    """The control image fitted to the size the model samples at, saying so on stderr when that resized it."""
    from sana.image_input import image_tensor

    plan = pipe.plan("", height=args.height, width=args.width, use_resolution_binning=not args.no_binning)
    fitted = image_tensor(image, *plan.sample_size, what="control image")
    note = fitted.note(f"{tag}control image")
    if note:
        print(note, file=sys.stderr)
    return fitted.tensor


def check_image_inputs(args: argparse.Namespace) -> dict:
    """The pipeline's image, mask_image and strength arguments from --image, --mask and --strength, the files
    decoded: each mistake is one line before the model loads."""
    from sana.generation import IMG2IMG_STRENGTH
    from sana.image_input import open_image

    if args.image is None:
        for flag, value in (("--mask", args.mask), ("--strength", args.strength)):
            if value is not None:
                raise UserError(f"{flag} needs --image (the picture to start from)")
        return {}
    strength = args.strength if args.strength is not None else (1.0 if args.mask else IMG2IMG_STRENGTH)
    if not 0 < strength <= 1:  # also refuses nan
        raise UserError(f"--strength must be in (0, 1], got {strength}")
    mask = None if args.mask is None else open_image(args.mask, "mask")
    return {"image": open_image(args.image, "image"), "mask_image": mask, "strength": strength}


def run(args: argparse.Namespace) -> int:
    launch = launch_from_env()
    prompts = read_prompts(args)
    n = len(prompts) * args.images_per_prompt
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if launch.distributed and args.seed is None:
        raise UserError(
            f"{launch.world_size} processes (torchrun) need a fixed --seed: each would draw its own random one"
        )
    first = args.seed if args.seed is not None else random.randrange(2**31)
    seeds = [first + i for i in range(n)]
    paths = output_paths(args.output, prompts, args.images_per_prompt, seeds)  # every rank checks
    tag = f"rank {launch.rank}/{launch.world_size}: " if launch.distributed else ""

    mine = shard(n, launch.rank, launch.world_size)
    if is_file_output(args.output, n):
        todo = mine  # an explicit file is overwritten, as asked
    else:
        done = {i for i in mine if paths[i].exists()}
        todo = [i for i in mine if i not in done]
        skipped = [paths[i].name for i in sorted(done)]
        if skipped:
            names = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
            print(f"{tag}skipped {len(skipped)} image(s) already in {paths[0].parent}: {names}", file=sys.stderr)

    from sana.generation import check_settings
    from sana.images import PARAMETERS_KEY, save_image
    from sana.pipeline import SanaPipeline
    from sana.pretrained import choose_instruction, default_model

    instruction = choose_instruction(args.no_chi, args.chi_file)
    memory = low_memory_settings(args)  # --quantize, --offload, --max-memory, --low-memory
    # Cheap checks first: a bad setting must not cost a model load.
    check_settings(
        height=32 if args.height is None else args.height,
        width=32 if args.width is None else args.width,
        steps=1 if args.steps is None else args.steps,  # None: the model's, which loading checks
        guidance_scale=1.0 if args.guidance is None else args.guidance,
        sampler=args.sampler or "dpm",
        pag_scale=args.pag_scale,
        pag_layers=[],
        images_per_prompt=args.images_per_prompt,
        num_layers=1,
    )
    if args.lora:
        from sana.lora import lora_file

        lora_file(args.lora)  # a missing file fails before the model loads
    control_image = check_control(args)  # a bad control image or ControlNet fails before the model loads
    image_inputs = check_image_inputs(args)  # so does an unreadable --image or --mask, or a bad --strength
    if not todo:
        return 0
    device = rank_device(args.device, launch)
    if launch.distributed and device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(device)
    pipe = SanaPipeline.from_pretrained(
        args.model or default_model(),
        dtype=args.dtype,
        device=device,
        instruction=instruction,
        controlnet=args.controlnet,
        # With a LoRA the DiT is quantized after the merge: a LoRA cannot be merged into int8 weights.
        **{**memory, "quantize": None if args.lora else memory["quantize"]},
    )
    if args.lora:
        pipe.load_lora(args.lora, args.lora_scale)
        if memory["quantize"]:
            from sana.quantization import quantize_pipeline_transformer

            quantize_pipeline_transformer(pipe, memory["quantize"])
    if control_image is not None:
        control_image = fit_control_image(pipe, control_image, args, tag)
    if image_inputs:  # say when --image or --mask had to be resized (one plan, before any model work)
        plan = pipe.plan(prompts[0], height=args.height, width=args.width, **image_inputs)
        for note in plan.notes:
            print(f"{tag}{note}", file=sys.stderr)
    for batch in batches(todo, args.batch_size):
        # One image per prompt entry with its own seed: image i is the same whatever batch it lands in.
        images = pipe(
            [prompts[i // args.images_per_prompt] for i in batch],
            negative_prompt=args.negative_prompt,
            height=args.height,
            width=args.width,
            steps=args.steps,
            guidance_scale=args.guidance,
            sampler=args.sampler,
            seed=[seeds[i] for i in batch],
            images_per_prompt=1,
            use_resolution_binning=not args.no_binning,
            pag_scale=args.pag_scale,
            pag_layers=args.pag_layers,
            progress=not args.quiet,
            control_image=control_image,
            control_scale=args.control_scale,
            **image_inputs,
        )
        for i, image in zip(batch, images, strict=True):
            params = json.loads(image.info[PARAMETERS_KEY])
            params["index_in_batch"] = i  # the image's index in the whole command, whatever its batch or rank
            image.info[PARAMETERS_KEY] = json.dumps(params, sort_keys=True)
            save_image(image, paths[i])  # atomic: a killed run leaves no half-written file to skip
            print(paths[i])
    return 0
