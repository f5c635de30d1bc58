"""Reading a `sana cache` folder (cache.py writes it and documents the layout): its index, the empty-prompt
embedding stored with it, and `CachedSamples`, the loader's sample source for `DataConfig(kind="cache")`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sana.data.caption_format import Caption
from sana.data.sources import CACHE_INDEX
from sana.errors import UserError, read_user_file
from sana.types import TextEmbeddings

FORMAT = "sana-cache"
VERSION = 1
NULL_TEXT = "null_text.safetensors"


def load_null_text(folder: str | Path) -> TextEmbeddings:
    """The unconditional (empty prompt) embedding stored with a cache: hidden (1, L, C), mask (1, L)."""
    from safetensors.torch import load_file

    path = Path(folder) / NULL_TEXT
    if not path.is_file():
        raise UserError(f"{folder} has no {NULL_TEXT}; is it a finished `sana cache` folder?")
    tensors = load_file(str(path))
    return TextEmbeddings(tensors["hidden"], tensors["mask"])


def read_index(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / CACHE_INDEX
    if not path.is_file():
        raise UserError(f"{folder} has no {CACHE_INDEX}: not a cache, or `sana cache` did not finish")
    try:
        index = json.loads(read_user_file(path, "cache index"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{path} is not a version-{VERSION} {FORMAT} index")
    return index


class CachedSamples:
    """The samples of a cache folder, for the loader: `load` reads one latent and one caption's embedding."""

    _MAX_OPEN = 32  # open shard handles kept per process

    def __init__(self, folder: Path, index: dict[str, Any]) -> None:
        self.folder = folder
        self.text_length = int(index["text_length"])
        self.control: str | None = index.get("control")  # "source", a preprocessor's name, or None: no control
        self.keys: list[str] = []
        self.buckets: list[tuple[int, int]] = []
        self.captions: list[tuple[Caption, ...]] = []
        self.where: list[tuple[str, int]] = []
        entries = [(e, shard["file"]) for shard in index["shards"] for e in shard["samples"]]
        entries.sort(key=lambda pair: pair[0]["key"])  # the raw source's order
        for entry, file in entries:
            self.keys.append(entry["key"])
            self.buckets.append((int(entry["bucket"][0]), int(entry["bucket"][1])))
            self.captions.append(tuple(Caption(c["text"], c["score"]) for c in entry["captions"]))
            self.where.append((file, int(entry["slot"])))
        self.unreadable: dict[str, str] = dict(index.get("unreadable", {}))  # left out when the cache was built
        self._handles: dict[str, Any] = {}

    @classmethod
    def open(cls, cfg: Any) -> CachedSamples:
        """The cache folder of `cfg`, a sana.data.loader.DataConfig of kind cache, checked against its settings."""
        if not isinstance(cfg.path, str):
            raise UserError("a cache is one folder, not a list of paths")
        folder = Path(cfg.path)
        index = read_index(folder)
        settings = index["settings"]
        if settings["resolution"] != cfg.resolution or settings["buckets"] != cfg.buckets:
            raise UserError(
                f"{folder} was cached at resolution {settings['resolution']} with buckets={settings['buckets']}; "
                f"set resolution: {settings['resolution']} and buckets: {str(settings['buckets']).lower()}"
            )
        samples = cls(folder, index)
        if not samples.keys:
            raise UserError(f"the cache {folder} holds no samples")
        return samples

    def __getstate__(self) -> dict[str, Any]:  # shard handles do not cross into worker processes
        return {**self.__dict__, "_handles": {}}

    def _shard(self, file: str) -> Any:
        from safetensors import safe_open

        if file not in self._handles:
            if len(self._handles) >= self._MAX_OPEN:
                self._handles.pop(next(iter(self._handles)))
            path = self.folder / file
            try:
                self._handles[file] = safe_open(str(path), "pt")
            except Exception as e:  # missing or corrupt file: the cache itself is broken, not one image
                raise UserError(f"cache shard {path} cannot be read ({e}); re-run `sana cache`") from None
        return self._handles[file]

    def load(self, index: int, caption: int) -> dict[str, Any]:
        file, slot = self.where[index]
        shard = self._shard(file)
        item = {
            "latent": shard.get_tensor(f"{slot}.latent"),  # (C, h, w)
            "text_hidden": shard.get_slice(f"{slot}.text_hidden")[caption],  # (l, C)
            "text_mask": shard.get_slice(f"{slot}.text_mask")[caption],  # (l,)
            "key": self.keys[index],
        }
        if self.control is not None:
            item["control"] = shard.get_tensor(f"{slot}.control")  # (C, h, w)
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        b, length = len(items), self.text_length
        channels = items[0]["text_hidden"].shape[-1]
        hidden = torch.zeros(b, length, channels, dtype=items[0]["text_hidden"].dtype)  # (B, L, C)
        mask = torch.zeros(b, length, dtype=torch.int64)  # (B, L)
        for row, it in enumerate(items):
            n = it["text_hidden"].shape[0]
            hidden[row, :n] = it["text_hidden"]
            mask[row, :n] = it["text_mask"].long()
        batch = {
            "latents": torch.stack([it["latent"] for it in items]),  # (B, C, h, w)
            "text_hidden": hidden,
            "text_mask": mask,
            "keys": [it["key"] for it in items],
        }
        if self.control is not None:
            batch["control_latents"] = torch.stack([it["control"] for it in items])  # (B, C, h, w)
        return batch
