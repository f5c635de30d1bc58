"""Small value types that cross module boundaries (text embeddings, the velocity-function contract)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class TextEmbeddings:
    """What the text encoder hands to the DiT: hidden states and their validity mask (1 = attend)."""

    hidden: torch.Tensor  # (B, L, C_text)
    mask: torch.Tensor  # (B, L), integer or bool

    def __post_init__(self) -> None:
        if self.hidden.ndim != 3 or self.mask.shape != self.hidden.shape[:2]:
            raise ValueError(
                f"text embeddings need hidden (B, L, C) and mask (B, L); got {tuple(self.hidden.shape)} "
                f"and {tuple(self.mask.shape)}"
            )

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> TextEmbeddings:
        return TextEmbeddings(self.hidden.to(device=device, dtype=dtype), self.mask.to(device=device))

    def repeat(self, n: int) -> TextEmbeddings:
        """Each row repeated n times consecutively (images per prompt)."""
        return TextEmbeddings(self.hidden.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))

    @staticmethod
    def cat(parts: list[TextEmbeddings]) -> TextEmbeddings:
        """Concatenate along the batch; sequences of different length are right-padded with mask 0."""
        length = max(p.hidden.shape[1] for p in parts)
        hidden, mask = [], []
        for p in parts:
            pad = length - p.hidden.shape[1]
            hidden.append(torch.nn.functional.pad(p.hidden, (0, 0, 0, pad)))
            mask.append(torch.nn.functional.pad(p.mask, (0, pad)))
        return TextEmbeddings(torch.cat(hidden), torch.cat(mask))


class VelocityFn(Protocol):
    """The one contract between samplers and models: x_t at flow time t in [0, 1] (t = 1 is noise) -> v."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
