"""`sana cache`: DC-AE latents and text embeddings computed once, so training skips both encoders.

Layout of a cache folder:

    index.json                 what is where (written last: a folder without it is unfinished)
    null_text.safetensors      "hidden" (1, L, C), "mask" (1, L) int64: the empty prompt, unconditional
                               path (`TextEncoder.encode_unconditional([""])`), for caption dropout
    shard-00000.safetensors    per sample j of the shard: "j.latent" (C_lat, h, w) normalised latent of the
    shard-00001.safetensors    image at its bucket size; "j.text_hidden" (n, l, C) and "j.text_mask" (n, l)
    ...                        uint8 for *every* candidate caption (so CLIP-score selection still happens at
                               training time), cut after the last position any caption attends to (l <= L);
                               in a cache with control images also "j.control" (C_lat, h, w), the normalised
                               latent of the sample's control image (ControlNet training)

Control images come from the source (a sample's `control`, sana/data/sources.py) or are made from each image by a
preprocessor (`control: edges`, sana/data/control.py; `sana cache --control edges`) after it is resized and
cropped; index.json's "control" says which ("source" or the preprocessor's name).

Samples are the raw source's, in key order, cut into shards of `shard_size`; each shard is written
atomically (a temporary file renamed into place) and records in its metadata the settings it was made with
and the keys it was planned for. A re-run reuses every shard whose settings and keys match and writes the
rest, so an interrupted run resumes where it stopped and never leaves a half-written shard behind. Images
that cannot be decoded are left out (counted, logged and listed in index.json). One writer per folder.

Reading (`DataConfig(kind="cache")`, sana/data/cached.py) yields batches
`{"latents": (B, C, h, w), "text_hidden": (B, L, C), "text_mask": (B, L) int64, "keys": [...]}` (and
"control_latents" (B, C, h, w) when the cache has control images); positions the caption does not attend to are
zeros in `text_hidden` (the DiT masks them out, so only the mask matters).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sana.config import ConfigError, config_from_dict, config_to_dict
from sana.data.buckets import BadImage
from sana.data.cached import FORMAT, NULL_TEXT, VERSION
from sana.data.loader import DataConfig, LoaderStats, RawImages
from sana.data.sources import CACHE_INDEX
from sana.errors import UserError, one_line, user_path
from sana.types import TextEmbeddings
from sana.weights import atomic_write

logger = logging.getLogger("sana.data")

_SETTINGS_KEY = "sana_cache_settings"
_PLANNED_KEY = "sana_cache_planned"
_SAMPLES_KEY = "sana_cache_samples"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


@dataclass(frozen=True)
class CacheConfig:
    """What `sana cache` reads: the raw data (only path, kind, resolution and buckets matter) and the model."""

    data: DataConfig
    model: str  # Sana model folder or Hub id: its vae/ and text_encoder/ + tokenizer/ are used
    out: str
    shard_size: int = 256
    batch_size: int = 8  # images (and captions) per encoder call
    device: str = "cpu"
    dtype: str = "fp32"  # compute and storage dtype of both encoders
    chi: bool | None = None  # the instruction prefix: None = the model folder's own (sana.pretrained), or on/off
    chi_file: str | None = None  # the instruction text, if not the model's
    control: str | None = None  # a preprocessor making each image's control image (sana/data/control.py)

    def __post_init__(self) -> None:
        if self.control is not None:
            from sana.data.control import check_preprocessor

            check_preprocessor(self.control)
        if self.shard_size < 1 or self.batch_size < 1:
            raise ConfigError(f"shard_size and batch_size must be >= 1, got {self.shard_size}, {self.batch_size}")
        if self.chi is False and self.chi_file:
            raise ConfigError("chi: false (--no-chi) and chi_file (--chi-file) contradict each other: give one")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "") -> CacheConfig:
        if not isinstance(data.get("data"), dict):
            raise ConfigError(f"cache config{' ' + source if source else ''} needs a 'data' section")
        return config_from_dict(cls, {**data, "data": config_from_dict(DataConfig, data["data"], source=source)})


@dataclass
class CacheReport:
    samples: int = 0
    shards_written: int = 0
    shards_reused: int = 0
    unreadable: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ writing


def cache_settings(
    data: DataConfig, vae: Any, text_encoder: Any, shard_size: int, control: str | None = None
) -> dict[str, Any]:
    """Everything that changes a shard's content; a shard made with other settings is never reused."""
    settings = {
        "format": FORMAT,
        "version": VERSION,
        "resolution": data.resolution,
        "buckets": data.buckets,
        "shard_size": shard_size,
        "dtype": str(next(vae.parameters()).dtype).removeprefix("torch."),
        "vae": config_to_dict(vae.config),
        "text_encoder": {
            "instruction": text_encoder.instruction,
            "max_length": text_encoder.max_length,
            "model": getattr(text_encoder.model, "transformers_class_name", type(text_encoder.model).__name__),
            "dtype": str(text_encoder.dtype).removeprefix("torch."),
        },
    }
    if control is not None:  # only then: caches without control images keep the settings they were made with
        settings["control"] = control
    return settings


def build_cache(
    data: DataConfig,
    out: str | Path,
    *,
    vae: Any,
    text_encoder: Any,
    shard_size: int = 256,
    batch_size: int = 8,
    control: str | None = None,
) -> CacheReport:
    """Write (or complete) the cache of `data` in `out` with these encoders (on any device). See the module doc.

    control: a preprocessor name (sana/data/control.py) making each image's control image; None caches the
    source's own control images when every sample has one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    if data.kind == "cache":
        raise UserError("build_cache needs a raw data source, not a cache (data kind: cache)")
    if control is not None:
        from sana.data.control import check_preprocessor

        check_preprocessor(control)
    out = Path(out)
    with user_path(out, "cache folder", "create"):
        out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".shard-*.tmp"):  # left by a killed run (atomic_write cleans up on exceptions)
        stale.unlink()
    stats = LoaderStats()
    images = RawImages.scan(data, stats)
    with_control = [s.control is not None for s in images.samples]
    if control is not None and any(with_control):
        raise UserError(
            f"{data.path} has control images of its own and --control {control} would make others: choose one"
        )
    if control is None and any(with_control):
        if not all(with_control):
            missing = images.keys[with_control.index(False)]
            raise UserError(
                f"{sum(with_control)} samples have a control image but {missing} has none: give all or none"
            )
        control = "source"
    settings = cache_settings(data, vae, text_encoder, shard_size, control)
    settings_json = json.dumps(settings, sort_keys=True)
    report = CacheReport(samples=0)
    shards = []
    n_shards = math.ceil(len(images.keys) / shard_size)
    for s in range(n_shards):
        planned = list(range(s * shard_size, min((s + 1) * shard_size, len(images.keys))))
        planned_json = json.dumps([images.keys[i] for i in planned])
        path = out / shard_name(s)
        entries = None
        if path.is_file():
            try:
                with safe_open(str(path), "pt") as f:
                    meta = f.metadata() or {}
            except Exception as e:  # truncated or not safetensors: not a shard this code finished writing
                raise UserError(f"{path} is not a readable cache shard ({one_line(e)}); delete it") from e
            if meta.get(_SETTINGS_KEY) != settings_json:
                raise UserError(
                    f"{out} holds a cache made with other settings ({path.name}); use another folder or delete it"
                )
            if meta.get(_PLANNED_KEY) == planned_json:
                entries = json.loads(meta[_SAMPLES_KEY])
                report.shards_reused += 1
                for key, reason in json.loads(meta.get("sana_cache_unreadable", "{}")).items():
                    stats.record_bad(key, reason)
        if entries is None:
            tensors, entries, bad = _encode_shard(images, planned, vae, text_encoder, batch_size, stats, control)
            meta = {
                _SETTINGS_KEY: settings_json,
                _PLANNED_KEY: planned_json,
                _SAMPLES_KEY: json.dumps(entries),
                "sana_cache_unreadable": json.dumps(bad),
            }
            atomic_write(path, lambda p, t=tensors, m=meta: save_file(t, str(p), metadata=m))
            report.shards_written += 1
            logger.info("cache shard %d/%d: %d samples", s + 1, n_shards, len(entries))
        shards.append({"file": path.name, "samples": entries})
        report.samples += len(entries)
    if report.samples == 0:
        raise UserError(f"none of the images in {data.path} could be decoded; nothing to cache")
    null = text_encoder.encode_unconditional([""])  # (1, L, C), (1, L)
    null_tensors = {"hidden": null.hidden.cpu().contiguous(), "mask": null.mask.long().cpu().contiguous()}
    atomic_write(
        out / NULL_TEXT, lambda p: save_file(null_tensors, str(p), metadata={_SETTINGS_KEY: settings_json})
    )
    index = {
        "format": FORMAT,
        "version": VERSION,
        "settings": settings,
        "text_length": int(null.hidden.shape[1]),
        "text_channels": int(null.hidden.shape[2]),
        "latent_channels": int(vae.config.latent_channels),
        "control": control,
        "shards": shards,
        "unreadable": stats.unreadable,
    }
    atomic_write(out / CACHE_INDEX, lambda p: p.write_text(json.dumps(index, indent=1) + "\n"))
    report.unreadable = dict(stats.unreadable)
    return report


@torch.no_grad()
def _encode_shard(
    images: RawImages,
    planned: list[int],
    vae: Any,
    text_encoder: Any,
    batch_size: int,
    stats: LoaderStats,
    control: str | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], dict[str, str]]:
    param = next(vae.parameters())
    pixels: dict[int, torch.Tensor] = {}
    controls: dict[int, torch.Tensor] = {}
    bad: dict[str, str] = {}
    for i in planned:
        try:
            item = images.load(i, 0)
        except BadImage as e:
            bad[images.keys[i]] = str(e)
            stats.record_bad(images.keys[i], str(e))
            continue
        pixels[i] = item["image"]  # (3, H, W)
        if control == "source":
            controls[i] = item["control"]  # (3, H, W), resized and cropped as the image
        elif control is not None:
            from sana.data.control import apply_to_tensor

            controls[i] = apply_to_tensor(control, item["image"])
    good = [i for i in planned if i in pixels]
    # Latents: one encoder call per bucket chunk (same size within a bucket).
    latents: dict[int, torch.Tensor] = {}
    control_latents: dict[int, torch.Tensor] = {}
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i in good:
        by_bucket.setdefault(images.buckets[i], []).append(i)
    for members in by_bucket.values():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            for source, target in ((pixels, latents), (controls, control_latents)):
                if source:
                    x = torch.stack([source[i] for i in chunk]).to(param.device, param.dtype)  # (b, 3, H, W)
                    z = vae.encode(x).cpu()  # (b, C_lat, H/f, W/f)
                    target.update(zip(chunk, z, strict=True))
    # Text: every candidate caption of every sample.
    texts = [(i, c.text) for i in good for c in images.captions[i]]
    hidden: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    for start in range(0, len(texts), batch_size):
        emb: TextEmbeddings = text_encoder.encode([t for _, t in texts[start : start + batch_size]])
        hidden.extend(emb.hidden.cpu())  # each (L, C)
        masks.extend(emb.mask.cpu())  # each (L,)
    tensors: dict[str, torch.Tensor] = {}
    entries = []
    cursor = 0
    for slot, i in enumerate(good):
        n = len(images.captions[i])
        h = torch.stack(hidden[cursor : cursor + n])  # (n, L, C)
        m = torch.stack(masks[cursor : cursor + n])  # (n, L)
        cursor += n
        attended = m.any(0).nonzero()
        keep = int(attended.max()) + 1 if len(attended) else 1  # positions after the last attended one are dropped
        tensors[f"{slot}.latent"] = latents[i].contiguous()
        if control is not None:
            tensors[f"{slot}.control"] = control_latents[i].contiguous()
        # Zero what each caption does not attend to (a shorter candidate's tail): the DiT ignores it anyway.
        tensors[f"{slot}.text_hidden"] = (h[:, :keep] * m[:, :keep, None].to(h.dtype)).contiguous()
        tensors[f"{slot}.text_mask"] = m[:, :keep].to(torch.uint8).contiguous()
        entries.append(
            {
                "key": images.keys[i],
                "slot": slot,
                "bucket": list(images.buckets[i]),
                "captions": [{"text": c.text, "score": c.score} for c in images.captions[i]],
            }
        )
    return tensors, entries, bad


def load_encoders(cfg: CacheConfig) -> tuple[Any, Any]:
    """The (vae, text_encoder) of `cfg.model` on `cfg.device` in `cfg.dtype`."""
    from sana.models.text_encoder import DEFAULT_INSTRUCTION, load_instruction
    from sana.pretrained import MODEL_INSTRUCTION, load_components

    if cfg.chi is False:
        instruction = None
    elif cfg.chi_file:
        instruction = load_instruction(cfg.chi_file)
    else:  # explicitly on: the default text, whatever the folder declares; unset: the folder's own
        instruction = DEFAULT_INSTRUCTION if cfg.chi else MODEL_INSTRUCTION
    parts = load_components(
        cfg.model, dtype=cfg.dtype, device=cfg.device, parts=("vae", "text_encoder"), instruction=instruction
    )
    return parts.vae, parts.text_encoder
