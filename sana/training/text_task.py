"""task: text_encoder. Train a small Gemma-2 decoder as a causal language model on captions, and its tokenizer.

    run_dir: runs/shapes-text
    max_steps: 3000
    task: text_encoder
    model:
      gemma: {hidden_size: 128, intermediate_size: 512, num_hidden_layers: 4, num_attention_heads: 4,
              num_key_value_heads: 2, head_dim: 32, query_pre_attn_scalar: 32}     # Gemma2Config fields
    tokenizer: {vocab_size: 1024}            # trained on the captions; or {path: a tokenizer folder}
    data: {path: data/shapes, batch_size: 64, max_length: 48}                       # TextDataConfig

Sana's DiT reads the last hidden state (after the final norm) of a Gemma-2 decoder; this task makes a small one
of the same architecture for a small dataset, so the shipped model needs nothing downloaded. The decoder is a
transformers `Gemma2Model`; its language-model head is its own embedding matrix (tied, as in Gemma), applied
with Gemma-2's final logit soft-capping, so the trained module is exactly the network that is exported.

Data. `data.path` is a text file with one caption per line (`.txt`, or kind: lines), or any sana.data source
(image folder, JSONL manifest, WebDataset shards), of which every caption of every sample is used and no image
is read. Captions are lowercased and stripped, as `TextEncoder` does to prompts, and each training sequence is
`<bos> caption <eos>` (the tokenizer adds <bos>; <eos> is appended here so the model learns where captions
end), cut to `max_length` tokens, right-padded with <pad> (padding is masked out and carries no loss).
Batching follows the sana.data loader contract: per epoch a permutation seeded by (seed, epoch) cut into global
batches of batch_size x world_size captions, rank r taking rows [r*b, (r+1)*b), resumable exactly.

Documents (`data.documents: true`). Each sequence is instead every caption of one sample, joined by
`data.separator` in an order drawn afresh each epoch: `<bos> a red circle; a large red circle above a blue
square; ... <eos>`. Why: a decoder's last hidden state only has to serve the next token, and after "a red" the
next word does not depend on "red", so trained on lone captions a small decoder keeps the attributes the DiT needs
as a sliver of its state (the content was 0.3 % of the hidden states' energy in our first shapes encoder, which
the DiT then barely followed). When later captions restate the scene, the state at every word must carry it.
Since every caption also comes first in some epochs, a lone prompt at inference is still in distribution.

Tokenizer. On a fresh start it is trained on the captions (sana/training/tokenizer.py) or copied from
`tokenizer.path`, and saved as `RUN/tokenizer/` before the model is built (its size is the model's vocabulary);
a resumed run reuses that folder, so the ids never change under a checkpoint.

Export: `RUN/final/text_encoder/` (the decoder alone, as `Gemma2Model`: what `TextEncoder.from_pretrained` and
a Sana folder's model_index expect) and `RUN/final/tokenizer/`.
"""

from __future__ import annotations

import difflib
import inspect
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sana.config import ConfigError
from sana.training.config import RunConfig, _check
from sana.training.distributed import barrier
from sana.training.task import (
    DataSource,
    LossOutput,
    Run,
    Task,
    publish_folder,
    sub_state,
    temporary_folder,
    trained_weights,
)
from sana.weights import parse_dtype

IGNORE = -100  # label of positions that carry no loss (padding)
# Gemma2Config fields a run may not set: the tokenizer fixes the vocabulary and special ids, the head is tied.
_FIXED = ("vocab_size", "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "use_cache")

# ------------------------------------------------------------------------------------------------- config


def gemma_fields() -> list[str]:
    """The architecture fields of transformers' Gemma2Config (its keyword-only constructor arguments)."""
    from transformers import Gemma2Config

    params = inspect.signature(Gemma2Config.__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _FIXED]


@dataclass(frozen=True)
class LanguageModelConfig:
    """The decoder: `gemma` holds Gemma2Config fields (hidden_size, num_hidden_layers, ...; unset ones take
    Gemma2Config's defaults, which are Gemma-2 2B's, so set the sizes). vocab_size and the special-token ids
    come from the tokenizer."""

    gemma: dict[str, Any] = field(default_factory=dict)
    dtype: Literal["fp32", "bf16"] = "fp32"  # master weights

    def __post_init__(self) -> None:
        known = gemma_fields()
        for key in self.gemma:
            if key in _FIXED:
                raise ConfigError(f"model.gemma.{key} is set from the tokenizer (see the tokenizer section)")
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f" (did you mean model.gemma.{close[0]}?)" if close else ""
                raise ConfigError(f"unknown key model.gemma.{key}{hint}")
        self.gemma_config(vocab_size=512)  # Gemma2Config's own checks, at load time

    def gemma_config(self, vocab_size: int, pad: int = 0, eos: int = 1, bos: int = 2) -> Any:
        from transformers import Gemma2Config

        try:
            return Gemma2Config(
                **self.gemma, vocab_size=vocab_size, pad_token_id=pad, eos_token_id=eos, bos_token_id=bos,
                tie_word_embeddings=True, use_cache=False,
            )  # fmt: skip
        except (TypeError, ValueError) as e:
            raise ConfigError(f"model.gemma: {e}") from None


@dataclass(frozen=True)
class TokenizerConfig:
    vocab_size: int = 1024  # at most; a small corpus may give fewer (pairs must occur min_frequency times)
    min_frequency: int = 2
    path: str | None = None  # an existing tokenizer folder to use instead of training one

    def __post_init__(self) -> None:
        from sana.training.tokenizer import MIN_VOCAB

        _check(self.vocab_size >= MIN_VOCAB, f"tokenizer.vocab_size must be >= {MIN_VOCAB}")
        _check(self.min_frequency >= 1, "tokenizer.min_frequency must be >= 1")


@dataclass(frozen=True)
class TextDataConfig:
    """Where the captions come from and how they are batched (see the module docstring)."""

    path: str | tuple[str, ...]
    kind: Literal["auto", "lines", "folder", "jsonl", "webdataset"] = "auto"  # auto: a .txt file is lines
    batch_size: int = 32  # per rank
    max_length: int = 64  # tokens per sequence, <bos> and <eos> included
    lowercase: bool = True  # as TextEncoder does to every prompt
    shuffle: bool = True
    documents: bool = False  # one sequence per sample: all its captions joined (see the module docstring)
    separator: str = "; "  # between the captions of a document

    def __post_init__(self) -> None:
        _check(bool(self.path), "data.path must name a caption file or a data source")
        _check(self.batch_size >= 1, "data.batch_size must be >= 1")
        _check(self.max_length >= 2, "data.max_length must be >= 2")
        _check(bool(self.separator.strip()), "data.separator must contain a visible character")


@dataclass(frozen=True, kw_only=True)
class TextTrainConfig(RunConfig):
    """task: text_encoder."""

    task: Literal["text_encoder"] = "text_encoder"
    model: LanguageModelConfig
    data: TextDataConfig
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.distributed.strategy == "ddp", "distributed.strategy: task text_encoder supports ddp only")


# --------------------------------------------------------------------------------------------------- data


def read_captions(cfg: TextDataConfig) -> list[tuple[str, ...]]:
    """Every sample's captions, cleaned (stripped, lowercased if asked), empty ones and empty samples dropped;
    a caption file gives one single-caption sample per line."""
    paths = (cfg.path,) if isinstance(cfg.path, str) else cfg.path
    lines = cfg.kind == "lines" or (cfg.kind == "auto" and len(paths) == 1 and Path(paths[0]).suffix == ".txt")
    if lines:
        try:
            groups = [[line] for line in Path(paths[0]).read_text(encoding="utf-8").splitlines()]
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read captions from {paths[0]}: {e}") from None
    else:
        from sana.data import read_samples

        groups = [[caption.text for caption in sample.captions] for sample in read_samples(cfg.path, cfg.kind)]
    clean = [tuple(t for t in (t.strip().lower() if cfg.lowercase else t.strip() for t in g) if t) for g in groups]
    clean = [g for g in clean if g]
    if not clean:
        raise ValueError(f"no captions in {cfg.path}")
    return clean


def read_texts(cfg: TextDataConfig) -> list[str]:
    """Every caption of the source, cleaned, in order."""
    return [t for group in read_captions(cfg) for t in group]


def training_sequences(cfg: TextDataConfig) -> list[tuple[str, ...]]:
    """What one training sequence is made of: each caption alone, or (documents) each sample's captions."""
    groups = read_captions(cfg)
    if not cfg.documents:
        return [(t,) for group in groups for t in group]
    if max(len(g) for g in groups) == 1:
        raise ValueError(f"data.documents needs samples with several captions; every sample of {cfg.path} has one")
    return groups


class CaptionBatches:
    """This rank's infinite stream of batches {"texts": [...]}, resumable (state_dict: the epoch and how many
    global batches of it were served). Each text is one entry of `sequences`, its captions joined by `separator`
    in an order seeded by (seed, epoch, index) when shuffling. Entries left over after the last whole global
    batch of an epoch wait for a later epoch's permutation."""

    def __init__(
        self, sequences: list[tuple[str, ...]], batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
        shuffle: bool = True, separator: str = "; ",
    ) -> None:  # fmt: skip
        self.sequences, self.b, self.seed, self.rank, self.world = sequences, batch_size, seed, rank, world_size
        self.shuffle, self.separator = shuffle, separator
        self.per_epoch = len(sequences) // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(
                f"{len(sequences)} sequences are fewer than one global batch ({batch_size} x {world_size} ranks)"
            )
        self.epoch = self.position = 0

    def __len__(self) -> int:
        return self.per_epoch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "captions": len(self.sequences)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("captions", len(self.sequences)) != len(self.sequences):
            raise ValueError(
                f"the checkpoint was trained on {state['captions']} sequences, the data has {len(self.sequences)}"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def order(self, epoch: int) -> np.ndarray:
        n = len(self.sequences)
        return np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)

    def text(self, index: int, epoch: int) -> str:
        parts = self.sequences[index]
        if self.shuffle and len(parts) > 1:
            parts = [parts[i] for i in np.random.default_rng([self.seed, epoch, index]).permutation(len(parts))]
        return self.separator.join(parts)

    def __iter__(self):
        while True:
            if self.position >= self.per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            start = (self.position * self.world + self.rank) * self.b
            rows = self.order(self.epoch)[start : start + self.b]
            self.position += 1
            yield {"texts": [self.text(int(i), self.epoch) for i in rows]}


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor  # (B, L) <bos> caption <eos> <pad>...
    attention_mask: torch.Tensor  # (B, L) 1 on tokens, 0 on padding
    labels: torch.Tensor  # (B, L) input_ids with padding set to IGNORE


def tokenize_batch(tokenizer: Any, texts: list[str], max_length: int) -> TokenBatch:
    """Right-padded `<bos> text <eos>` sequences, cut to max_length (a cut caption loses its <eos>)."""
    ids = [seq + [tokenizer.eos_token_id] for seq in tokenizer(texts, add_special_tokens=True)["input_ids"]]
    ids = [seq[:max_length] for seq in ids]
    width = max(len(seq) for seq in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, seq in enumerate(ids):
        input_ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    return TokenBatch(input_ids, mask, input_ids.masked_fill(mask == 0, IGNORE))


# -------------------------------------------------------------------------------------------------- model


class GemmaLanguageModel(nn.Module):
    """A `Gemma2Model` with its language-model head tied to its embedding (Gemma's own tie, written out so that
    the module holds every weight once: checkpoints need no shared tensors). forward -> the mean next-token
    cross-entropy over non-padding targets, on Gemma-2's soft-capped logits (what Gemma2ForCausalLM computes)."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import Gemma2Model

        self.model = Gemma2Model(config)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]  # (B, L, C)
        logits = F.linear(hidden, self.model.embed_tokens.weight).float()  # (B, L, V); unscaled embedding
        cap = self.model.config.final_logit_softcapping
        if cap:
            logits = torch.tanh(logits / cap) * cap
        # Position i predicts token i + 1.
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE)


# --------------------------------------------------------------------------------------------------- task


class TextTask(Task):
    cfg: TextTrainConfig

    def __init__(self, cfg: TextTrainConfig, ctx: Any, resume: Path | None = None) -> None:
        super().__init__(cfg, ctx, resume)
        self.sequences: list[tuple[str, ...]] | None = None
        self.tokenizer: Any = None
        self.gemma_config: Any = None

    @property
    def tokenizer_dir(self) -> Path:
        return Path(self.cfg.run_dir) / "tokenizer"

    def build_data(self, data: DataSource | None) -> Any:
        cfg = self.cfg
        self.sequences = training_sequences(cfg.data)
        if data is not None:
            return data(seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size)
        return CaptionBatches(
            self.sequences, cfg.data.batch_size, seed=cfg.seed, rank=self.ctx.rank, world_size=self.ctx.world_size,
            shuffle=cfg.data.shuffle, separator=cfg.data.separator,
        )  # fmt: skip

    def build_model(self) -> GemmaLanguageModel:
        self.tokenizer = self.prepare_tokenizer()
        t = self.tokenizer
        self.gemma_config = self.cfg.model.gemma_config(len(t), t.pad_token_id, t.eos_token_id, t.bos_token_id)
        with torch.random.fork_rng(devices=[]):  # identical on every rank, the global RNG untouched
            torch.manual_seed(self.cfg.seed)
            model = GemmaLanguageModel(self.gemma_config)
        return model.to(parse_dtype(self.cfg.model.dtype)).train().requires_grad_(True)

    def prepare_tokenizer(self) -> Any:
        """RUN/tokenizer: kept when resuming, else trained on the captions (or copied from tokenizer.path) by
        rank 0 and written atomically; every rank then loads it from there."""
        from transformers import AutoTokenizer

        folder, t = self.tokenizer_dir, self.cfg.tokenizer
        if self.resume is not None:
            if not folder.is_dir():
                raise ConfigError(f"cannot resume: {folder} (the run's tokenizer) is missing")
        elif self.ctx.is_main:
            tmp = temporary_folder(folder)
            if t.path is not None:
                AutoTokenizer.from_pretrained(t.path).save_pretrained(tmp)
            else:
                from sana.training.tokenizer import train_tokenizer

                texts = [self.cfg.data.separator.join(seq) for seq in self.sequences]  # the separator too
                train_tokenizer(texts, t.vocab_size, min_frequency=t.min_frequency).save_pretrained(tmp)
            publish_folder(tmp, folder)
        barrier(self.ctx)
        return AutoTokenizer.from_pretrained(folder)

    def describe(self) -> str:
        g = self.gemma_config
        where = f"resumed from {self.resume}" if self.resume else "from scratch"
        unit = "documents" if self.cfg.data.documents else "captions"
        return (
            f"{where}: Gemma-2 {g.num_hidden_layers} layers x {g.hidden_size}, vocabulary {g.vocab_size}, "
            f"{len(self.sequences)} {unit}"
        )

    def micro_batch(self, batch: dict[str, Any], step: int, micro: int) -> TokenBatch:
        if "texts" not in batch:
            raise ValueError(f"task text_encoder trains on caption batches ('texts'); got keys {sorted(batch)}")
        tokens = tokenize_batch(self.tokenizer, list(batch["texts"]), self.cfg.data.max_length)
        device = self.ctx.device
        return TokenBatch(tokens.input_ids.to(device), tokens.attention_mask.to(device), tokens.labels.to(device))

    def batch_size(self, micro_batch: TokenBatch) -> int:
        return micro_batch.input_ids.shape[0]

    def loss(self, model: nn.Module, micro_batch: TokenBatch, dtype: torch.dtype) -> LossOutput:
        loss = model(micro_batch.input_ids, micro_batch.attention_mask, micro_batch.labels)
        return loss, {}

    def export(self, run: Run) -> dict[str, Path | None]:
        weights = trained_weights(run.core, run.ema, self.cfg.checkpoint.export_ema)
        if not self.ctx.is_main:
            return {"final_model": None}
        from transformers import Gemma2Model

        with torch.random.fork_rng(devices=[]):
            decoder = Gemma2Model(self.gemma_config)  # its random init is overwritten whole just below
        decoder.load_state_dict({k: v.float() for k, v in sub_state(weights, "model").items()}, strict=True)
        final = Path(self.cfg.run_dir) / "final"
        tmp = temporary_folder(final)
        decoder.eval().save_pretrained(tmp / "text_encoder")
        shutil.copytree(self.tokenizer_dir, tmp / "tokenizer")
        publish_folder(tmp, final)
        run.logger.info(f"final text encoder -> {final / 'text_encoder'}, tokenizer -> {final / 'tokenizer'}")
        return {"final_model": final}


CONFIG = TextTrainConfig  # the registry's names for this module's pieces (sana/training/tasks.py)
TASK = TextTask
