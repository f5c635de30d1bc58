"""`sana train RUN.yaml [dotted.key=value ...] [--resume [CHECKPOINT]]`: train or fine-tune a Sana DiT, or (with
`task: dcae` / `task: text_encoder` in the YAML) the DC-AE autoencoder or the small Gemma-2 text encoder and its
tokenizer that a model built from scratch needs (configs/train/shapes_dcae.yaml, shapes_text.yaml), or (with
`task: controlnet`) a ControlNet for a frozen model (configs/train/shapes_controlnet.yaml).

One process: `sana train run.yaml`. Several GPUs (DDP, or FSDP2 with distributed.strategy: fsdp):
`torchrun --nproc-per-node 8 -m sana train run.yaml`. The YAML keys are documented in
sana/training/config.py; configs/train/ holds examples.
"""

from __future__ import annotations

import argparse

EXAMPLE = "example:\n  sana train configs/train/shapes_finetune.yaml data.path=data/photos-cache max_steps=500"
OUT_OF_MEMORY = (
    "try a smaller data.batch_size (with optim.grad_accum_steps to keep the batch) or precision.mixed: bf16"
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the run's YAML file")
    p.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-4 max_steps=500"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="CHECKPOINT",
        help="continue the run: from its newest checkpoint, or from the CHECKPOINT folder given",
    )


def run(args: argparse.Namespace) -> int:
    from sana.training.tasks import load_train_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_train_config(args.config, overrides)

    from sana.training import train

    result = train(cfg)  # a run that diverges raises TrainingError, a RuntimeFailure: one line, exit status 1
    if result.final_model is not None:
        print(f"{result.final_model} (step {result.step}, final loss {_last(result.losses)})")
    return 0


def _last(losses: list[float]) -> str:
    return f"{losses[-1]:.4f}" if losses else "n/a"
