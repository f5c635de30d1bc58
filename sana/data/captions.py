"""Captions: several candidates per image, one picked per sample and epoch, and CLIP scores to guide the pick.

Selection (Sana's multi-caption training): among the candidates whose score is at least the floor, caption i
is drawn with probability

    p_i = exp(s_i / tau) / sum_j exp(s_j / tau)

so a small temperature tau almost always takes the best-matching caption and a large one is nearly uniform.
Rules at the edges:

* no candidate has a score: uniform over all of them (the floor cannot apply);
* some candidates of one image have scores and others do not: an error when the data is read
  (`parse_captions`), since no sensible probability exists for the unscored ones;
* scores exist but none reaches the floor: the single best caption (first on ties) is used, so an image is
  never dropped for having only weak captions; filter such images out of the manifest if that is wanted.

Scores are cosine similarities between CLIP image and text embeddings, in [-1, 1] (typically 0.2-0.4 for a
matching caption; note some tools report 100 x this). With such scores a temperature of 0.01 makes a 0.01
higher score e times more likely. `score_manifest` fills them with any CLIP model (`ClipScorer`), e.g. an
open_clip one from `open_clip_scorer`.

The draw for a sample is a pure function of (seed, epoch, sample index) (`selection_rng`), never of the order
in which samples happen to be loaded, so a resumed or re-sharded run picks the same captions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sana.data.caption_format import Caption
from sana.data.caption_format import parse_captions as parse_captions  # still importable from here
from sana.errors import MissingFileError, UserError, one_line, user_path

logger = logging.getLogger("sana.data")

# Distinguishes caption draws from the shuffle stream that shares the same (seed, epoch).
_CAPTION_STREAM = 1


def caption_probabilities(
    captions: Sequence[Caption], temperature: float, min_score: float | None = None
) -> np.ndarray:
    """(n,) float64 selection probabilities (see the module docstring)."""
    n = len(captions)
    if n == 0:
        raise ValueError("no captions to choose from")
    if temperature <= 0:
        raise UserError(f"caption temperature must be > 0, got {temperature}")
    if captions[0].score is None:
        return np.full(n, 1.0 / n)
    scores = np.array([c.score for c in captions], dtype=np.float64)
    keep = scores >= min_score if min_score is not None else np.ones(n, dtype=bool)
    if not keep.any():  # nothing passes the floor: fall back to the best caption
        out = np.zeros(n)
        out[int(np.argmax(scores))] = 1.0
        return out
    logits = np.where(keep, scores / temperature, -np.inf)
    weights = np.exp(logits - logits[keep].max())  # stable softmax; dropped candidates get exp(-inf) = 0
    return weights / weights.sum()


def selection_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The caption-draw generator of sample `index` in `epoch`: independent of load order and of rank."""
    return np.random.default_rng((seed, epoch, _CAPTION_STREAM, index))


def select_caption(
    captions: Sequence[Caption], temperature: float, min_score: float | None, rng: np.random.Generator
) -> int:
    """Index of the caption drawn for one sample (one uniform draw from `rng`)."""
    if len(captions) == 1:
        return 0
    probs = caption_probabilities(captions, temperature, min_score)
    cumulative = np.cumsum(probs)
    # Inverse-CDF with the last bin closed, so rounding in the cumsum can never index past the end.
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(probs) - 1)


# --------------------------------------------------------------------------------------------- CLIP scoring


@dataclass
class ClipScorer:
    """Any CLIP-like pair of encoders plus the image preprocessing they expect.

    `encode_images` takes (B, 3, S, S) normalised pixels and `encode_texts` a list of strings; both return
    (B, D) features (normalised or not: the score is the cosine similarity either way).
    """

    encode_images: Callable[[torch.Tensor], torch.Tensor]
    encode_texts: Callable[[list[str]], torch.Tensor]
    image_size: int | tuple[int, int] = 224
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP statistics
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    resize_mode: str = "shortest"  # open_clip's names: "shortest" (resize + centre crop), "squash", "longest"
    device: torch.device | str = "cpu"

    @torch.no_grad()
    def score(self, images: Sequence[Image.Image], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """Cosine similarity of each image with each of its own captions."""
        pixels = torch.stack(
            [clip_preprocess(im, self.image_size, self.mean, self.std, self.resize_mode) for im in images]
        )
        image_features = self.encode_images(pixels.to(self.device)).float()  # (B, D)
        flat = [text for texts in captions for text in texts]
        text_features = self.encode_texts(flat).float()  # (sum n_i, D)
        owner = torch.repeat_interleave(torch.arange(len(captions)), torch.tensor([len(c) for c in captions]))
        sims = torch.nn.functional.cosine_similarity(text_features, image_features[owner.to(self.device)], dim=-1)
        sims = sims.cpu().tolist()
        out, start = [], 0
        for texts in captions:
            out.append(sims[start : start + len(texts)])
            start += len(texts)
        return out


def clip_preprocess(
    image: Image.Image,
    size: int | tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    resize_mode: str = "shortest",
) -> torch.Tensor:
    """PIL RGB image -> (3, H, W) normalised tensor, as open_clip's eval transform does (bicubic PIL resize).

    Written here so that scoring needs no torchvision. "shortest": scale the short side to the target and
    centre-crop; "squash": resize to the target ignoring the ratio; "longest": fit inside and pad with black.
    """
    th, tw = (size, size) if isinstance(size, int) else size
    w, h = image.size
    if resize_mode == "squash":
        image = image.resize((tw, th), Image.BICUBIC)
    elif resize_mode == "shortest":
        if th == tw:  # torchvision Resize(int): short side = size, long side truncated
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(th * long / short)
            new = (th, new_long) if w <= h else (new_long, th)
        else:
            scale = max(th / h, tw / w)
            new = (round(w * scale), round(h * scale))
        image = image.resize(new, Image.BICUBIC)
        left, top = int(round((new[0] - tw) / 2.0)), int(round((new[1] - th) / 2.0))
        image = image.crop((left, top, left + tw, top + th))
    elif resize_mode == "longest":
        scale = min(th / h, tw / w)
        new = (max(1, round(w * scale)), max(1, round(h * scale)))
        canvas = Image.new("RGB", (tw, th))
        canvas.paste(image.resize(new, Image.BICUBIC), ((tw - new[0]) // 2, (th - new[1]) // 2))
        image = canvas
    else:
        raise ValueError(f"unknown resize_mode {resize_mode!r}; expected shortest, squash or longest")
    x = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)  # (3, H, W)
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def open_clip_scorer(
    model: str, pretrained: str | None = None, *, model_config: str | Path | None = None, device: str = "cpu"
) -> ClipScorer:
    """A `ClipScorer` from open_clip: `model` is an architecture name ("ViT-B-32"), "local-dir:FOLDER" or
    "hf-hub:ORG/NAME"; `pretrained` a tag ("laion2b_s34b_b79k") or a checkpoint file; `model_config` a JSON
    architecture file to register first (its file stem becomes a model name).

    open_clip imports torchvision at import time (for its own transforms, which we do not use): install a
    torchvision that matches your torch (`pip install open_clip_torch` does that on a CUDA setup).
    """
    try:
        import open_clip
    except ImportError as e:
        raise UserError(
            f"CLIP scoring needs open_clip: pip install open_clip_torch (and a torchvision matching torch) ({e})"
        ) from None
    if model_config is not None:
        if not Path(model_config).is_file():
            raise MissingFileError(f"no such open_clip model config: {model_config}")
        try:
            open_clip.add_model_config(model_config)
        except (OSError, ValueError) as e:  # unreadable, or not an architecture JSON
            raise UserError(f"cannot read the open_clip model config {model_config}: {one_line(e)}") from e
    try:
        clip = open_clip.create_model(model, pretrained=pretrained, device=device).eval()
        tokenizer = open_clip.get_tokenizer(model)
    except (RuntimeError, OSError) as e:  # unknown name, missing file, failed download
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"open_clip cannot build {model!r} with pretrained={pretrained!r}: {first}") from None
    cfg = open_clip.get_model_preprocess_cfg(clip)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        return clip.encode_text(tokenizer(texts).to(device))

    return ClipScorer(
        encode_images=clip.encode_image,
        encode_texts=encode_texts,
        image_size=cfg.get("size", 224),
        mean=tuple(cfg.get("mean", ClipScorer.mean)),
        std=tuple(cfg.get("std", ClipScorer.std)),
        resize_mode=cfg.get("resize_mode", "shortest"),
        device=device,
    )


@dataclass
class ScoreReport:
    scored: int = 0  # images whose captions got scores
    unreadable: int = 0  # images left unscored because they could not be read (logged)


def score_manifest(
    manifest: str | Path, out: str | Path, scorer: ClipScorer, *, batch_size: int = 32
) -> ScoreReport:
    """Write `out`: the JSONL manifest with every caption rewritten as {"text", "score"}.

    Other fields of each line are kept; "text" / plain-string captions become a "captions" list. Lines whose
    image cannot be read are copied unchanged, counted and logged. `out` is written atomically.
    """
    from sana.data.buckets import BadImage, open_rgb
    from sana.data.sources import read_manifest_lines
    from sana.weights import atomic_write

    manifest = Path(manifest)
    rows = read_manifest_lines(manifest)  # [(record, image path, captions)], validated
    report = ScoreReport()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        images, texts, owners = [], [], []
        for row in chunk:
            try:
                images.append(open_rgb(row.image.read_bytes()))
            except (BadImage, OSError) as e:  # OSError: missing or unreadable file
                report.unreadable += 1
                logger.warning("skipping unreadable image %s: %s", row.image.name, e)
                continue
            texts.append([c.text for c in row.captions])
            owners.append(row)
        if not images:
            continue
        for row, scores in zip(owners, scorer.score(images, texts), strict=True):
            row.record.pop("text", None)
            row.record["captions"] = [
                {"text": c.text, "score": round(s, 6)} for c, s in zip(row.captions, scores, strict=True)
            ]
            report.scored += 1
    text = "".join(json.dumps(row.record, ensure_ascii=False) + "\n" for row in rows)
    with user_path(out, "output manifest", "write"):
        atomic_write(Path(out), lambda p: p.write_text(text, encoding="utf-8"))
    return report
