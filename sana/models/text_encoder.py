"""The Gemma-2 text path: prompt strings -> `TextEmbeddings` for the DiT's cross-attention.

This is the only module that knows about the "complex human instruction" (CHI) prepended to positive prompts,
the <bos> + last-tokens selection, padding side and lowercasing. It follows diffusers' SanaPipeline behaviour
step by step (see sana-facts.md §3.2) so that embeddings match it exactly:

1. lowercase and strip every prompt (the original NVlabs code only strips; diffusers is our reference);
2. positive prompts: `text = instruction + prompt` with no separator, tokenised to
   `n_instruction + max_length - 2` tokens (right padding, truncation, <bos> prepended), where `n_instruction`
   counts the instruction's own tokens including <bos>;
3. run the language model and take its last hidden state (after the final norm);
4. keep position 0 (<bos>) and the last `max_length - 1` positions of both the states and the mask.

Negative prompts skip steps 2 (no instruction) and 4: they are tokenised to exactly `max_length` tokens.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch

from sana.types import TextEmbeddings

# Our own wording. Joined lines end with the marker that the prompt is glued onto; changing the text changes
# the embeddings, so published checkpoints are best served by the instruction they were trained with (pass it
# as a file via `load_instruction`).
DEFAULT_INSTRUCTION: str = "\n".join(
    [
        "You turn short requests into rich descriptions for an image generator.",
        "Read the user's prompt and picture the single image it asks for.",
        "- Keep every subject, count, colour, attribute and relation the user names; never contradict them.",
        "- If the prompt is brief or vague, add fitting details: setting, lighting, materials, mood, style.",
        "- If the prompt is already precise, keep its meaning and wording as they are.",
        "- Describe only what is visible in the picture, in plain words.",
        "Here is the request to enrich.",
        "User Prompt: ",
    ]
)


def load_instruction(path: str | Path) -> str:
    """The instruction text stored in `path`, byte for byte (a trailing newline is part of the instruction)."""
    try:
        # newline="" keeps "\r\n" as written instead of translating it, so the text is exactly the file's.
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read instruction file {path}: {e}") from None


class TextEncoder:
    """Prompts -> `TextEmbeddings` with a decoder-only language model (Gemma-2 for the published weights).

    `instruction=None` turns the CHI off (plain prompts, `max_length` tokens, no selection). The model must
    return its last hidden state as `output[0]`, as transformers' `Gemma2Model` does.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        instruction: str | None = DEFAULT_INSTRUCTION,
        max_length: int = 300,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (<bos> plus one token), got {max_length}")
        self.model = model
        self.tokenizer = tokenizer
        self.instruction = instruction or None  # "" behaves like None, as an empty instruction list does
        self.max_length = max_length
        # Tokens of the instruction alone, <bos> included. The joined text may tokenise differently at the
        # boundary (the prompt's first word can merge with the final "▁"); the reference counts it this way.
        self._n_instruction = len(tokenizer.encode(self.instruction)) if self.instruction else 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device: torch.device | str) -> TextEncoder:
        """Move the language model (e.g. back to CPU after encoding, in low-memory mode). Returns self."""
        self.model.to(device)
        return self

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        """Positive prompts -> hidden (B, max_length, C) and mask (B, max_length), CHI applied if set."""
        texts = [_clean(p) for p in prompts]
        if self.instruction is None:
            return self._run(texts, self.max_length)
        texts = [self.instruction + t for t in texts]  # no separator: the instruction ends with "User Prompt: "
        emb = self._run(texts, self._n_instruction + self.max_length - 2)  # (B, n_instr + max_length - 2, C)
        # <bos> plus the last max_length - 1 positions: the instruction's tail, the prompt and padding.
        keep = [0, *range(-(self.max_length - 1), 0)]
        return TextEmbeddings(emb.hidden[:, keep], emb.mask[:, keep])  # (B, max_length, C), (B, max_length)

    def encode_unconditional(self, prompts: list[str]) -> TextEmbeddings:
        """Negative prompts -> (B, max_length, C): never an instruction, never a selection.

        "" gives [<bos>, <pad>, ...] with mask [1, 0, ...]; the DiT attends to the <bos> state only.
        """
        return self._run([_clean(p) for p in prompts], self.max_length)

    def _run(self, texts: list[str], length: int) -> TextEmbeddings:
        batch = self.tokenizer(
            texts,
            padding="max_length",
            max_length=length,
            truncation=True,
            add_special_tokens=True,
            padding_side="right",  # per call, so a tokenizer shared with other code is left untouched
            return_tensors="pt",
        )
        cut = self._truncated(texts, batch, length)
        if cut:  # stacklevel 4: the line that called encode() / encode_unconditional()
            msg = f"prompt(s) {cut} over the {self.max_length}-token limit were cut at the end"
            warnings.warn(msg, stacklevel=4)
        ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)  # (B, length)
        with torch.no_grad():
            hidden = self.model(input_ids=ids, attention_mask=mask)[0]  # (B, length, C), after the final norm
        return TextEmbeddings(hidden.to(self.dtype), mask.long())

    def _truncated(self, texts: list[str], batch: Any, length: int) -> list[int]:
        """Indices of the texts that truncation shortened."""
        encodings = getattr(batch, "encodings", None)
        if encodings is not None:  # fast tokenizers keep what truncation cut off, so checking costs nothing
            return [i for i, e in enumerate(encodings) if e.overflowing]
        return [i for i, ids in enumerate(self.tokenizer(texts)["input_ids"]) if len(ids) > length]

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        tokenizer_dir: str | Path,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        instruction: str | None = DEFAULT_INSTRUCTION,
        max_length: int = 300,
    ) -> TextEncoder:
        """Load a transformers model folder (e.g. a Sana repo's `text_encoder/`) and its tokenizer folder.

        Local folders are checked first so a typo fails fast with its name; any other string is handed to
        transformers as is (a Hub id works where the Hub is reachable).
        """
        from transformers import AutoModel, AutoTokenizer  # heavy import, only needed here

        model_dir, tokenizer_dir = os.path.expanduser(model_dir), os.path.expanduser(tokenizer_dir)
        for what, where in (("text encoder", model_dir), ("tokenizer", tokenizer_dir)):
            if _looks_local(where) and not Path(where).is_dir():
                raise FileNotFoundError(f"{what} folder not found: {where}")
        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
            model = AutoModel.from_pretrained(model_dir, dtype=dtype)
        except OSError as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise OSError(f"cannot load text encoder {model_dir} / tokenizer {tokenizer_dir}: {first_line}") from e
        return cls(model.to(device).eval(), tokenizer, instruction=instruction, max_length=max_length)


def _clean(prompt: str) -> str:
    # diffusers lowercases (Gemma's vocabulary is case-sensitive, so this changes the embeddings).
    return prompt.lower().strip()


def _looks_local(where: str) -> bool:
    """An existing path, or a string that cannot be a Hub id ("org/name" or "name")."""
    return os.path.exists(where) or where.startswith((".", "/", "\\")) or where.count("/") > 1 or "\\" in where
