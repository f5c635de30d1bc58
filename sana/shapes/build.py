"""`python -m sana.shapes.build` (`make shapes-model`): the shipped shapes model, from nothing, in one command.

The build is a chain of steps, each with this project's own commands. A step whose result exists is skipped,
and so are the steps only it needed: with the last DiT's export in place, the build only ships it. An
interrupted build is the same command again (every training resumes from its newest checkpoint):

    step             what                                                            result
    data             `sana data shapes`: 10,000 images with scored captions, seed 0    data/shapes
    text             configs/train/shapes_text.yaml: BPE tokenizer + small Gemma-2 LM  runs/shapes-text/final
    autoencoder      configs/train/shapes_dcae.yaml: DC-AE f32c32, widths 8..128       runs/shapes-dcae/final
    components       text encoder + autoencoder as one model folder, no transformer,   runs/shapes-components
                     declaring bare captions (instruction.json) and the steps
    cache            `sana cache`: latents + caption embeddings, 256^2, no buckets     data/shapes-cache
    dit              configs/train/shapes_dit.yaml: the Linear DiT, from scratch       runs/shapes-dit/final
    base             that DiT's model folder in float16                                runs/shapes-base
  then seven fine-tunes for layouts (docs/shapes.md, experiments H, I, K, L, M, O, R), all encoding with the
  base folder; their shared settings are configs/train/common/shapes_dit_finetune.yaml:
    relation-source  `sana data shapes`: 24,000 images, seed 77                        data/shapes-relation-source
    positions-data   a manifest: data/shapes, then only the relation captions of the   data/shapes-positions
                     first 5,000 two-object scenes of relation-source
    positions-cache  `sana cache` of positions-data                                    data/shapes-positions-cache
    positions        configs/train/shapes_dit_positions.yaml: base, sincos positions   runs/shapes-dit-positions
                     switched on, trained mostly at high noise
    refine-data      `sana data shapes --kinds ...`: 20,000 images, seed 91, weighted  data/shapes-refine
                     to relation and counting scenes
    refine-cache     `sana cache` of refine-data                                       data/shapes-refine-cache
    refine           configs/train/shapes_dit_refine.yaml: positions, continued        runs/shapes-dit-refine
    binding-source   `sana data shapes --kinds relation=1`: 12,000 images, seed 78     data/shapes-binding-source
    binding-data     a manifest: only the relation captions of the two-object scenes   data/shapes-binding
                     of relation-source that positions did not take, and of
                     binding-source
    binding-cache    `sana cache` of binding-data                                      data/shapes-binding-cache
    binding          configs/train/shapes_dit_binding.yaml: refine on relations alone  runs/shapes-dit-binding
    restore          configs/train/shapes_dit_restore.yaml: binding, back on           runs/shapes-dit-restore
                     refine-data at a lower learning rate
    finish-data      `sana data shapes --kinds ...`: 12,000 images, seed 93, weighted  data/shapes-finish
                     to single objects and counts
    finish-cache     `sana cache` of finish-data                                       data/shapes-finish-cache
    finish           configs/train/shapes_dit_finish.yaml: restore, continued at a     runs/shapes-dit-finish
                     lower learning rate
    count            configs/train/shapes_dit_count.yaml: finish, continued on         runs/shapes-dit-count
                     finish-data at middle noise levels, where counts are settled
    groups-data      `sana data shapes --kinds ... --sizes ...`: 16,000 images, seed   data/shapes-groups
                     96, weighted to counts, sizes drawn smaller
    groups-cache     `sana cache` of groups-data                                       data/shapes-groups-cache
    groups           configs/train/shapes_dit_groups.yaml: count, continued on         runs/shapes-dit-groups
                     groups-data, so that groups leave room between their objects
    ship             groups' export in float16, checked to load and to fit the        sana/assets/shapes-model
                     size budget, copied into the package

All paths are relative to --root (default: the working directory, a checkout of this repository, whose
configs/train/ holds the YAML files). Any step's settings can be changed in its YAML; --device picks where the
trainings run; `--dit-steps N` trains the last DiT (groups) on from its newest checkpoint to N steps and ships
the result (the cosine schedule is then stretched to N, a warm restart).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sana.pretrained import SHIPPED_MODEL_DIR

logger = logging.getLogger("sana.shapes")

SHIPPED_BUDGET_BYTES = 30 * 2**20  # the package ships at most 30 MB of model
DATA, CACHE = Path("data/shapes"), Path("data/shapes-cache")
N_IMAGES, DATA_SEED = 10000, 0  # the base DiT's training set: scenes 0..N_IMAGES-1 of this seed
COMPONENTS, BASE = Path("runs/shapes-components"), Path("runs/shapes-base")
# The fine-tunes' data. positions: the base set plus the relation captions alone of RELATION_SCENES two-object
# scenes of a second set; refine: fresh scenes, kinds weighted (sana/shapes/world.py SCENE_KINDS) towards
# relations and counts.
RELATION_SOURCE, RELATION_SOURCE_N, RELATION_SOURCE_SEED = Path("data/shapes-relation-source"), 24000, 77
RELATION_SCENES = 5000  # two-object scenes of it whose relation captions join the base set
POSITIONS_DATA, POSITIONS_CACHE = Path("data/shapes-positions"), Path("data/shapes-positions-cache")
REFINE_DATA, REFINE_CACHE = Path("data/shapes-refine"), Path("data/shapes-refine-cache")
REFINE_N, REFINE_SEED = 20000, 91
REFINE_KINDS = {"single": 0.2, "counting": 0.3, "relation": 0.4, "mixed": 0.1}
# binding: relation captions alone, of the two-object scenes of relation-source that positions did not take and
# of a set of relation scenes only.
BINDING_SOURCE, BINDING_SOURCE_N, BINDING_SOURCE_SEED = Path("data/shapes-binding-source"), 12000, 78
BINDING_DATA, BINDING_CACHE = Path("data/shapes-binding"), Path("data/shapes-binding-cache")
# finish: fresh scenes weighted to sizes (single objects carry the size captions) and counts, with some relations
# so the side binding is rehearsed.
FINISH_DATA, FINISH_CACHE = Path("data/shapes-finish"), Path("data/shapes-finish-cache")
FINISH_N, FINISH_SEED = 12000, 93
FINISH_KINDS = {"single": 0.35, "counting": 0.45, "relation": 0.15, "mixed": 0.05}
# groups: fresh scenes, most of them counting groups, with sizes drawn smaller than the usual third each, so that
# two to four objects of a group fit with room between them instead of merging (docs/shapes.md, experiment R).
GROUPS_DATA, GROUPS_CACHE = Path("data/shapes-groups"), Path("data/shapes-groups-cache")
GROUPS_N, GROUPS_SEED = 16000, 96
GROUPS_KINDS = {"single": 0.2, "counting": 0.6, "relation": 0.15, "mixed": 0.05}
GROUPS_SIZES = {"small": 0.35, "medium": 0.45, "large": 0.2}
CONFIGS = {
    name: Path(f"configs/train/shapes_{name}.yaml")
    for name in ("text", "dcae", "dit")
    + tuple(f"dit_{n}" for n in ("positions", "refine", "binding", "restore", "finish", "count", "groups"))
}
TEXT_FINAL, DCAE_FINAL, DIT_FINAL = (Path(f"runs/shapes-{n}/final") for n in ("text", "dcae", "dit"))
POSITIONS_FINAL, REFINE_FINAL, BINDING_FINAL, RESTORE_FINAL, FINISH_FINAL, COUNT_FINAL, GROUPS_FINAL = (
    Path(f"runs/shapes-dit-{n}/final")
    for n in ("positions", "refine", "binding", "restore", "finish", "count", "groups")
)
# What `sana generate` uses with this model when a call names neither steps nor guidance; the folder declares what
# differs from the library's usual 20 steps and guidance 4.5 (sampling.json), and `ship` writes it. Both were
# measured on prompts that are not the README's; the figures are in docs/shapes.md ("How the shipped DiT was
# trained").
SAMPLING = {"steps": 20, "guidance_scale": 2.5}
_DONE = ".complete"  # written into a dataset folder after its last image


@dataclass(frozen=True)
class Step:
    """One step of the build: `run` makes its result, `done` says whether the result is there, `needs` names
    the steps whose results `run` reads."""

    name: str
    run: Callable[[], object]
    done: Callable[[], bool]
    needs: tuple[str, ...] = ()


def run_steps(steps: Sequence[Step], target: str) -> list[str]:
    """Make `target` the way `make` would: a step is run only when its result is missing, after the steps it
    needs (and only those); a finished step's inputs are never looked at. Returns the names run, in order."""
    by_name = {s.name: s for s in steps}
    ran: list[str] = []
    visited: set[str] = set()

    def make(name: str) -> None:
        if name in visited:
            return
        visited.add(name)
        step = by_name[name]
        if step.done():
            logger.info("step %s: done already", name)
            return
        for need in step.needs:
            make(need)
        start = time.perf_counter()
        logger.info("step %s ...", name)
        step.run()
        ran.append(name)
        logger.info("step %s done in %.0f s", name, time.perf_counter() - start)

    make(target)
    return ran


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def make_data(
    folder: Path, n: int, seed: int, kinds: dict[str, float] | None = None, sizes: dict[str, float] | None = None
) -> None:
    from sana.shapes.world import SCENE_KINDS, write_dataset

    stats = write_dataset(folder, n, seed, kinds=kinds or SCENE_KINDS, sizes=sizes)
    (folder / _DONE).write_text(f"{stats.images} images, seed {seed}\n")


def _data_done(folder: Path) -> Callable[[], bool]:
    return lambda: (folder / _DONE).is_file()


def relation_manifest(
    out: Path, sources: Sequence[tuple[Path, int, int | None]], general: Path | None = None
) -> int:
    """out/manifest.jsonl: every record of `general`'s manifest (when given), then, for each `(source, skip, n)`
    in turn, the two-object scenes of `source` (those whose fullest caption states a relation) after its first
    `skip`, `n` of them (None: all the rest), with their relation captions only. Image paths are rewritten
    relative to `out`. Written whole or not at all; returns the relation scenes added."""
    from sana.shapes.world import RELATIONS

    phrases = tuple(f" {r} " for r in RELATIONS)
    out.mkdir(parents=True, exist_ok=True)

    def moved(record: dict, root: Path) -> str:
        return json.dumps({**record, "image": os.path.relpath(root / record["image"], out)})

    lines = [moved(json.loads(line), general) for line in _lines(general / "manifest.jsonl")] if general else []
    added = 0
    for source, skip, n in sources:
        seen = taken = 0
        for line in _lines(source / "manifest.jsonl"):
            if taken == n:
                break
            record = json.loads(line)
            top = max(c["score"] for c in record["captions"])
            if not any(any(p in c["text"] for p in phrases) for c in record["captions"] if c["score"] == top):
                continue  # a one-object, counting or three-or-more-object scene
            seen += 1
            if seen <= skip:
                continue
            record["captions"] = [c for c in record["captions"] if any(p in c["text"] for p in phrases)]
            lines.append(moved(record, source))
            taken += 1
        if n is not None and taken < n:
            raise ValueError(f"{source} holds only {seen} two-object scenes, {skip + n} wanted")
        added += taken
    tmp = out / ".manifest.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(out / "manifest.jsonl")
    return added


def _lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


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
    """vae/ + text_encoder/ + tokenizer/ + scheduler/ + instruction.json: what `sana cache` and the DiT training
    read; the DiT's export adds transformer/, and `ship` the sampling defaults. Written beside `out`, renamed into
    place."""
    from sana.config import read_json
    from sana.pretrained import SchedulerSpec, write_instruction
    from sana.weights import write_json

    if (out / "model_index.json").is_file():
        return out
    tmp = out.with_name(f".tmp-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(dcae / "vae", tmp / "vae")
    shutil.copytree(text / "text_encoder", tmp / "text_encoder")
    shutil.copytree(text / "tokenizer", tmp / "tokenizer")
    spec = SchedulerSpec(flow_shift=flow_shift)
    write_json(tmp / "scheduler" / "scheduler_config.json", spec.to_dict())
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


def make_cache(manifest: Path, out: Path, components: Path, device: str) -> None:
    """`sana cache` of `manifest` at 256^2 without buckets, encoded with `components`' autoencoder and text
    encoder (its instruction.json: none)."""
    from sana.data.cache import build_cache
    from sana.data.loader import DataConfig
    from sana.pretrained import load_components

    data = DataConfig(path=str(manifest), resolution=256, buckets=False)
    parts = load_components(components, device=device, parts=("vae", "text_encoder"))
    report = build_cache(data, out, vae=parts.vae, text_encoder=parts.text_encoder, batch_size=32)
    logger.info("cache: %s", report)


def _cache_done(folder: Path) -> Callable[[], bool]:
    return lambda: (folder / "index.json").is_file()


def _final_done(final: Path) -> Callable[[], bool]:
    return lambda: final.is_dir()  # exports are renamed into place whole: a folder there is finished


def ship(final: Path, out: Path) -> Path:
    """The trained folder in float16 (weights only; configs unchanged but for the sampling defaults chosen for it,
    SAMPLING), loaded back as a check, then published."""
    from dataclasses import replace

    from sana.pretrained import INSTRUCTION_FILE, load_components, save_components
    from sana.training.task import publish_folder

    parts = load_components(final)
    parts = replace(parts, scheduler=replace(parts.scheduler, **SAMPLING))
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


def build_steps(n_images: int, seed: int, device: str, out: Path, dit_steps: int | None = None) -> list[Step]:
    dev = _dev(device)
    return [
        Step("data", lambda: make_data(DATA, n_images, seed), _data_done(DATA)),
        Step("text", lambda: run_training("text", device), _final_done(TEXT_FINAL)),
        Step("autoencoder", lambda: run_training("dcae", device), _final_done(DCAE_FINAL)),
        Step(
            "components",
            lambda: assemble_components(TEXT_FINAL, DCAE_FINAL, COMPONENTS, _dit_shift()),
            lambda: (COMPONENTS / "model_index.json").is_file(),
            needs=("text", "autoencoder"),
        ),
        Step(
            "cache",
            lambda: make_cache(DATA / "manifest.jsonl", CACHE, COMPONENTS, dev),
            _cache_done(CACHE),
            needs=("data", "components"),
        ),
        Step("dit", lambda: run_training("dit", device), _final_done(DIT_FINAL), needs=("cache",)),
        # The fine-tunes start from, and encode with, the float16 folder: the encoders that ship, and what the
        # hand-run fine-tunes started from (docs/shapes.md).
        Step("base", lambda: ship(DIT_FINAL, BASE.resolve()), _final_done(BASE), needs=("dit",)),
        Step(
            "relation-source",
            lambda: make_data(RELATION_SOURCE, RELATION_SOURCE_N, RELATION_SOURCE_SEED),
            _data_done(RELATION_SOURCE),
        ),
        Step(
            "positions-data",
            lambda: relation_manifest(POSITIONS_DATA, [(RELATION_SOURCE, 0, RELATION_SCENES)], general=DATA),
            lambda: (POSITIONS_DATA / "manifest.jsonl").is_file(),
            needs=("data", "relation-source"),
        ),
        Step(
            "positions-cache",
            lambda: make_cache(POSITIONS_DATA / "manifest.jsonl", POSITIONS_CACHE, BASE, dev),
            _cache_done(POSITIONS_CACHE),
            needs=("base", "positions-data"),
        ),
        Step(
            "positions",
            lambda: run_training("dit_positions", device),
            _final_done(POSITIONS_FINAL),
            needs=("base", "positions-cache"),
        ),
        Step(
            "refine-data",
            lambda: make_data(REFINE_DATA, REFINE_N, REFINE_SEED, REFINE_KINDS),
            _data_done(REFINE_DATA),
        ),
        Step(
            "refine-cache",
            lambda: make_cache(REFINE_DATA / "manifest.jsonl", REFINE_CACHE, BASE, dev),
            _cache_done(REFINE_CACHE),
            needs=("base", "refine-data"),
        ),
        Step(
            "refine",
            lambda: run_training("dit_refine", device),
            _final_done(REFINE_FINAL),
            needs=("positions", "refine-cache"),
        ),
        Step(
            "binding-source",
            lambda: make_data(BINDING_SOURCE, BINDING_SOURCE_N, BINDING_SOURCE_SEED, {"relation": 1.0}),
            _data_done(BINDING_SOURCE),
        ),
        Step(
            "binding-data",
            lambda: relation_manifest(
                BINDING_DATA, [(RELATION_SOURCE, RELATION_SCENES, None), (BINDING_SOURCE, 0, None)]
            ),
            lambda: (BINDING_DATA / "manifest.jsonl").is_file(),
            needs=("relation-source", "binding-source"),
        ),
        Step(
            "binding-cache",
            lambda: make_cache(BINDING_DATA / "manifest.jsonl", BINDING_CACHE, BASE, dev),
            _cache_done(BINDING_CACHE),
            needs=("base", "binding-data"),
        ),
        Step(
            "binding",
            lambda: run_training("dit_binding", device),
            _final_done(BINDING_FINAL),
            needs=("refine", "binding-cache"),
        ),
        Step(
            "restore",
            lambda: run_training("dit_restore", device),
            _final_done(RESTORE_FINAL),
            needs=("binding", "refine-cache"),
        ),
        Step(
            "finish-data",
            lambda: make_data(FINISH_DATA, FINISH_N, FINISH_SEED, FINISH_KINDS),
            _data_done(FINISH_DATA),
        ),
        Step(
            "finish-cache",
            lambda: make_cache(FINISH_DATA / "manifest.jsonl", FINISH_CACHE, BASE, dev),
            _cache_done(FINISH_CACHE),
            needs=("base", "finish-data"),
        ),
        Step(
            "finish",
            lambda: run_training("dit_finish", device),
            _final_done(FINISH_FINAL),
            needs=("restore", "finish-cache"),
        ),
        Step(
            "count",
            lambda: run_training("dit_count", device),
            _final_done(COUNT_FINAL),
            needs=("finish", "finish-cache"),
        ),
        Step(
            "groups-data",
            lambda: make_data(GROUPS_DATA, GROUPS_N, GROUPS_SEED, GROUPS_KINDS, GROUPS_SIZES),
            _data_done(GROUPS_DATA),
        ),
        Step(
            "groups-cache",
            lambda: make_cache(GROUPS_DATA / "manifest.jsonl", GROUPS_CACHE, BASE, dev),
            _cache_done(GROUPS_CACHE),
            needs=("base", "groups-data"),
        ),
        Step(
            "groups",
            lambda: run_training("dit_groups", device, dit_steps),
            lambda: dit_steps is None and GROUPS_FINAL.is_dir(),
            needs=("count", "groups-cache"),
        ),
        Step("ship", lambda: ship(GROUPS_FINAL, out), lambda: False, needs=("groups",)),
    ]


def build(n_images: int, seed: int, device: str, out: Path, dit_steps: int | None = None) -> Path:
    run_steps(build_steps(n_images, seed, device, out, dit_steps), "ship")
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
        "--dit-steps",
        type=int,
        default=None,
        help="train the last DiT (groups) on from its last checkpoint to N steps",
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
