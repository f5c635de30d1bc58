"""`python -m sana.shapes.build` (`make shapes-model`): the shipped shapes model, from nothing, in one command.

Seven steps, each with this project's own commands and each skipped when its result exists, so an interrupted
build resumes where it stopped (the three trainings resume from their newest checkpoint):

    1. data        `sana data shapes`: N procedural images with scored captions        -> data/shapes
    2. text        configs/train/shapes_text.yaml: BPE tokenizer + small Gemma-2 LM      -> runs/shapes-text/final
    3. autoencoder configs/train/shapes_dcae.yaml: DC-AE f32c32 at widths 8..128         -> runs/shapes-dcae/final
    4. components  text encoder + autoencoder as one model folder without a transformer,
                   declaring bare captions (instruction.json) and the sampling steps
                   (SAMPLING below; sampling.json only if they are not the usual)        -> runs/shapes-components
    5. cache       `sana cache`: latents + embeddings of every caption, 256^2, no buckets -> data/shapes-cache
    6. dit         configs/train/shapes_dit.yaml: the Linear DiT by flow matching        -> runs/shapes-dit/final
    7. ship        the final folder in float16, checked to load here and to fit the size
                   budget, copied into the package                                     -> sana/assets/shapes-model

All paths are relative to --root (default: the working directory, a checkout of this repository, whose
configs/train/ holds the three YAML files). Any step's settings can be changed in its YAML; --device picks
where the trainings run; `--dit-steps N` trains the DiT on from its newest checkpoint to N steps and ships the
result (the cosine schedule is then stretched to N, a warm restart).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from sana.pretrained import SHIPPED_MODEL_DIR

logger = logging.getLogger("sana.shapes")

SHIPPED_BUDGET_BYTES = 30 * 2**20  # the package ships at most 30 MB of model
DATA, CACHE = Path("data/shapes"), Path("data/shapes-cache")
N_IMAGES, DATA_SEED = 10000, 0  # the shipped model's training set: scenes 0..N_IMAGES-1 of this seed
COMPONENTS = Path("runs/shapes-components")
CONFIGS = {name: Path(f"configs/train/shapes_{name}.yaml") for name in ("text", "dcae", "dit")}
TEXT_FINAL, DCAE_FINAL, DIT_FINAL = (Path(f"runs/shapes-{n}/final") for n in ("text", "dcae", "dit"))
# What `sana generate` uses with this model when a call names no steps. Measured on the shipped model (mean of
# the four categories; `sana eval shapes --n-per-category 100 --seed 2000 --steps N`, then the steps study of
# docs/shapes.md): Flow-DPM-Solver at 10 steps 60.0 % / 57.0 %, 14 steps 60.3 % / 60.0 %, 20 steps 62.5 % /
# 61.5 % (sizes gain most), and 20 steps cost 0.2 s more end to end (2.46 s against 2.25 s, median of 7
# interleaved runs). 20 is also the library's usual count, so the folder declares nothing (sampling.json is
# written only for departures from it).
SAMPLING = {"steps": 20}
_DONE = ".complete"  # written into the dataset folder after its last image


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def make_data(n: int, seed: int) -> None:
    from sana.shapes.world import write_dataset

    if (DATA / _DONE).is_file():
        return
    stats = write_dataset(DATA, n, seed)
    (DATA / _DONE).write_text(f"{stats.images} images, seed {seed}\n")


def run_training(name: str, device: str, max_steps: int | None = None) -> Path:
    """Train (or finish training) one YAML of the build; its exported folder. With `max_steps`, the run is
    continued (or cut) to that many steps from its newest checkpoint and exported again."""
    from sana.training import load_train_config, train

    overrides = [f"device={device}", "checkpoint.resume=latest"]
    overrides += [f"max_steps={max_steps}"] if max_steps else []
    cfg = load_train_config(CONFIGS[name], overrides)
    final = Path(cfg.run_dir) / "final"
    if max_steps or not final.is_dir():  # exports are renamed into place whole: a folder there is finished
        train(cfg)
    return final


def assemble_components(text: Path, dcae: Path, out: Path, flow_shift: float) -> Path:
    """vae/ + text_encoder/ + tokenizer/ + scheduler/ + instruction.json (+ sampling.json): what `sana cache`
    and the DiT training read; the DiT's export adds transformer/. Written beside `out`, renamed into place."""
    from sana.config import read_json
    from sana.pretrained import SchedulerSpec, write_instruction, write_sampling
    from sana.weights import write_json

    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dcae / "vae", tmp / "vae")
    shutil.copytree(text / "text_encoder", tmp / "text_encoder")
    shutil.copytree(text / "tokenizer", tmp / "tokenizer")
    spec = SchedulerSpec(flow_shift=flow_shift, **SAMPLING)
    write_json(tmp / "scheduler" / "scheduler_config.json", spec.to_dict())
    write_sampling(tmp, spec)
    write_instruction(tmp, None)  # the language model was trained on bare captions
    tokenizer_config = read_json(tmp / "tokenizer" / "tokenizer_config.json")
    index = {
        "_class_name": "SanaPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", read_json(tmp / "text_encoder" / "config.json")["architectures"][0]],
        "tokenizer": ["transformers", tokenizer_config.get("tokenizer_class", "GemmaTokenizer")],
        "vae": ["diffusers", "AutoencoderDC"],
    }
    write_json(tmp / "model_index.json", index)
    tmp.rename(out)  # whole or not at all
    return out


def make_cache(device: str) -> None:
    from sana.data.cache import build_cache
    from sana.data.loader import DataConfig
    from sana.pretrained import load_components

    if (CACHE / "index.json").is_file():
        return
    data = DataConfig(path=str(DATA / "manifest.jsonl"), resolution=256, buckets=False)
    parts = load_components(COMPONENTS, device=device, parts=("vae", "text_encoder"))  # its instruction.json: none
    report = build_cache(data, CACHE, vae=parts.vae, text_encoder=parts.text_encoder, batch_size=32)
    logger.info("cache: %s", report)


def ship(final: Path, out: Path) -> Path:
    """The trained folder in float16 (weights only; configs unchanged), loaded back as a check, then published."""
    from sana.pretrained import INSTRUCTION_FILE, load_components, save_components
    from sana.training.task import publish_folder

    parts = load_components(final)
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_components(parts, tmp, dtype=torch.float16)
    shutil.copy2(final / INSTRUCTION_FILE, tmp / INSTRUCTION_FILE)
    size = folder_bytes(tmp)
    if size > SHIPPED_BUDGET_BYTES:
        shutil.rmtree(tmp)
        raise RuntimeError(f"the shipped model would take {size / 2**20:.1f} MiB, over the 30 MiB budget")
    load_components(tmp)  # it loads as it will be shipped
    publish_folder(tmp, out)
    logger.info("shipped %s (%.1f MiB)", out, size / 2**20)
    return out


def build(n_images: int, seed: int, device: str, out: Path, dit_steps: int | None = None) -> Path:
    steps: list[tuple[str, Callable[[], object]]] = [
        ("data", lambda: make_data(n_images, seed)),
        ("text", lambda: run_training("text", device)),
        ("autoencoder", lambda: run_training("dcae", device)),
        ("components", lambda: assemble_components(TEXT_FINAL, DCAE_FINAL, COMPONENTS, _dit_shift())),
        ("cache", lambda: make_cache(_dev(device))),
        ("dit", lambda: run_training("dit", device, dit_steps)),
        ("ship", lambda: ship(DIT_FINAL, out)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        logger.info("step %s ...", name)
        step()
        logger.info("step %s done in %.0f s", name, time.perf_counter() - start)
    return out


def _dit_shift() -> float:
    from sana.training import load_train_config

    return load_train_config(CONFIGS["dit"]).flow.shift  # sampling uses the shift the DiT trains with


def _dev(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, default=Path("."), help="checkout to build in (default: here)")
    p.add_argument("--n", type=int, default=N_IMAGES, help=f"training images (default: {N_IMAGES})")
    p.add_argument("--seed", type=int, default=DATA_SEED, help=f"dataset seed (default: {DATA_SEED})")
    p.add_argument("--device", default="auto", help="torch device for training and caching (default: auto)")
    p.add_argument("--out", type=Path, default=None, help=f"where to ship it (default: {SHIPPED_MODEL_DIR})")
    p.add_argument(
        "--dit-steps", type=int, default=None, help="train the DiT on from its last checkpoint to N steps"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = (args.out or SHIPPED_MODEL_DIR).resolve()
    root = args.root.resolve()
    missing = [str(c) for c in CONFIGS.values() if not (root / c).is_file()]
    if missing:
        p.error(f"{root} is not a checkout of this repository: missing {', '.join(missing)}")
    os.chdir(root)
    print(build(args.n, args.seed, args.device, out, args.dit_steps))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
