"""The frozen encoders of a flow-matching run (the DiT and ControlNet tasks): the autoencoder and text encoder
that encode raw images and captions on the fly, and the empty-prompt embedding caption dropout trains on."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from sana.config import ConfigError
from sana.types import TextEmbeddings

_MISSING = (
    "raw images and captions need an autoencoder and text encoder: set model.components to a model folder (or "
    "model.pretrained to a full one), or train on a `sana cache` folder"
)


class Encoders:
    """The frozen autoencoder and text encoder, loaded from a model folder on first use. `missing`: the one-line
    error when raw data needs them and the run names no folder."""

    def __init__(self, folder: Path | None, device: torch.device, dtype: str, missing: str = _MISSING) -> None:
        self.folder, self.device, self.dtype, self.missing = folder, device, dtype, missing
        self._parts: tuple[nn.Module, Any] | None = None

    @property
    def available(self) -> bool:
        return self.folder is not None

    def __call__(self) -> tuple[nn.Module, Any]:
        if self._parts is None:
            if self.folder is None:
                raise ConfigError(self.missing)
            from sana.pretrained import load_components

            parts = load_components(
                self.folder, dtype=self.dtype, device=self.device, parts=("vae", "text_encoder")
            )
            parts.vae.requires_grad_(False).eval()
            parts.text_encoder.model.requires_grad_(False).eval()
            self._parts = (parts.vae, parts.text_encoder)
        return self._parts


def resolve_null_text(cfg: Any, loader: Any, encoders: Encoders) -> TextEmbeddings | None:
    """The empty-prompt embedding for caption dropout: the data source's own, a cache's null_text file, or
    computed by the text encoder. None when no caption dropout is configured. `cfg`: a run config with `flow`
    and `data` sections."""
    if cfg.flow.caption_dropout == 0:
        return None
    own = getattr(loader, "null_text", None)
    if own is not None:
        return own
    if cfg.data is not None:
        from sana.data import detect_kind, load_null_text

        kind = detect_kind(cfg.data.path) if cfg.data.kind == "auto" else cfg.data.kind
        if kind == "cache":
            return load_null_text(cfg.data.path)
    _, text_encoder = encoders()
    return text_encoder.encode_unconditional([""])
