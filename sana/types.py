"""Value types that cross module boundaries: text embeddings, the DiT's conditioning, the velocity contract."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
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


@dataclass(frozen=True)
class AttentionPerturbation:
    """Self-attention replaced by the identity map (out = to_out(to_v(x))) in `blocks`, for the batch rows where
    `rows` is True: the perturbed branch of perturbed-attention guidance (Ahn et al. 2024). The guidance
    arithmetic itself lives in sana/samplers/guidance.py, not in the model."""

    blocks: frozenset[int]
    rows: torch.Tensor  # (B,) bool


@dataclass(frozen=True)
class Conditioning:
    """Everything the DiT is conditioned on besides the noisy latent and its time, one row per batch row.

    text          caption states and mask (B, L, C_text) / (B, L)
    guidance      (B,) the value a guidance-embedding model (Sana-Sprint) embeds, already scaled; None otherwise
    perturbation  rows whose self-attention is perturbed, and in which blocks (PAG); None: no row is
    residuals     per-block additions to the token stream, (B, N, C) each: residuals[k] is added to the tokens
                  after block k + 1 (the first block's output receives none), diffusers' ControlNet convention
    control       (B, C, h, w) a ControlNet's input, the control image's latent; None without one. The DiT
                  never reads it: a ControlNet turns it into `residuals` (generation.controlled_model)

    Guidance runs several conditionings in one batch; `stack` concatenates them field by field, so a new
    field only needs its case there and the branch order is decided in one place (samplers/guidance.py).
    """

    text: TextEmbeddings
    guidance: torch.Tensor | None = None
    perturbation: AttentionPerturbation | None = None
    residuals: tuple[torch.Tensor, ...] = ()
    control: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n = len(self.text)
        if self.guidance is not None and self.guidance.shape != (n,):
            raise ValueError(f"guidance must be ({n},) for {n} rows, got {tuple(self.guidance.shape)}")
        if self.perturbation is not None and self.perturbation.rows.shape != (n,):
            raise ValueError(f"perturbation rows must be ({n},), got {tuple(self.perturbation.rows.shape)}")
        if any(r.ndim != 3 or r.shape[0] != n for r in self.residuals):
            raise ValueError(f"residuals must be (B={n}, N, C) tensors")
        if self.control is not None and (self.control.ndim != 4 or self.control.shape[0] != n):
            raise ValueError(f"control must be a (B={n}, C, h, w) latent, got {tuple(self.control.shape)}")

    def __len__(self) -> int:
        return len(self.text)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """On `device`; text states, residuals and the control latent in `dtype` (masks, rows and the guidance
        value keep theirs)."""
        perturbation = self.perturbation
        if perturbation is not None:
            perturbation = replace(perturbation, rows=perturbation.rows.to(device))
        return Conditioning(
            self.text.to(device, dtype),
            None if self.guidance is None else self.guidance.to(device),
            perturbation,
            tuple(r.to(device=device, dtype=dtype) for r in self.residuals),
            None if self.control is None else self.control.to(device=device, dtype=dtype),
        )

    def perturbed(self, blocks: Sequence[int]) -> Conditioning:
        """This conditioning with every row's self-attention perturbed in `blocks` (the PAG branch)."""
        rows = torch.ones(len(self), dtype=torch.bool, device=self.text.hidden.device)
        return replace(self, perturbation=AttentionPerturbation(frozenset(blocks), rows))

    @staticmethod
    def stack(branches: Sequence[Conditioning]) -> Conditioning:
        """Concatenate branches along the batch, every field: text (padded to the longest, mask 0), guidance,
        the perturbed rows (False for a branch without perturbation), each block's residual and the control
        latent (the pipeline gives every branch the same control image, as diffusers' ControlNet pipeline does)."""
        if not branches:
            raise ValueError("need at least one conditioning to stack")
        if len(branches) == 1:
            return branches[0]
        guidance = [b.guidance for b in branches]
        if any(g is None for g in guidance) and any(g is not None for g in guidance):
            raise ValueError("either every branch has a guidance value or none has")
        blocks = {b.perturbation.blocks for b in branches if b.perturbation is not None}
        if len(blocks) > 1:
            raise ValueError(f"branches perturb different blocks: {sorted(map(sorted, blocks))}")
        perturbation = None
        if blocks:
            rows = [
                b.perturbation.rows
                if b.perturbation is not None
                else torch.zeros(len(b), dtype=torch.bool, device=b.text.hidden.device)
                for b in branches
            ]
            perturbation = AttentionPerturbation(blocks.pop(), torch.cat(rows))
        depth = {len(b.residuals) for b in branches}
        if len(depth) > 1:
            raise ValueError(f"branches carry different numbers of residuals: {sorted(depth)}")
        controls = [b.control for b in branches]
        if any(c is None for c in controls) and any(c is not None for c in controls):
            raise ValueError("either every branch has a control latent or none has")
        return Conditioning(
            TextEmbeddings.cat([b.text for b in branches]),
            None if guidance[0] is None else torch.cat(guidance),
            perturbation,
            tuple(torch.cat(level) for level in zip(*(b.residuals for b in branches), strict=True)),
            None if controls[0] is None else torch.cat(controls),
        )


class VelocityFn(Protocol):
    """The one contract between samplers and models: x_t at flow time t in [0, 1] (t = 1 is noise) -> v."""

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
