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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sana.config import read_json
from sana.errors import MissingFileError, UserError, one_line, read_user_file
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
    """The instruction text stored in `path`, byte for byte (a trailing newline is part of the instruction).
    A one-line UserError if the file cannot be read."""
    # newline="" keeps "\r\n" as written instead of translating it, so the text is exactly the file's.
    return read_user_file(path, "instruction file", newline="")


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
            raise UserError(f"max_length must be at least 2 (<bos> plus one token), got {max_length}")
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
        # Padding is on the right and attention is causal, so no valid position ever sees a padded one: run
        # the model up to the batch's longest text only (a prompt fills a tenth of the 300 positions) and leave
        # zeros after it. Those positions are masked for every row, so the DiT never reads them.
        n = int(mask.sum(dim=1).max())
        with torch.no_grad():
            hidden = self.model(input_ids=ids[:, :n], attention_mask=mask[:, :n])[0]  # (B, n, C), final norm
        hidden = torch.nn.functional.pad(hidden, (0, 0, 0, length - n))  # (B, length, C)
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

        A local Gemma-2 folder with a `tokenizer.json` is read by this project's own code (`sana.models.gemma2`
        and `JsonTokenizer`, the same numbers without importing transformers, which costs seconds at start-up);
        anything else goes through transformers' Auto classes. Local folders are checked first so a typo fails
        fast with its name; any other string is handed to transformers as is (a Hub id works where the Hub is
        reachable).
        """
        model_dir, tokenizer_dir = os.path.expanduser(model_dir), os.path.expanduser(tokenizer_dir)
        for what, where in (("text encoder", model_dir), ("tokenizer", tokenizer_dir)):
            if _looks_local(where) and not Path(where).is_dir():
                raise MissingFileError(f"{what} folder not found: {where}")
        from sana.models.gemma2 import Gemma2Encoder, is_gemma2_folder

        if is_gemma2_folder(model_dir) and (Path(tokenizer_dir) / "tokenizer.json").is_file():
            model, tokenizer = Gemma2Encoder.from_pretrained(model_dir, dtype=dtype), JsonTokenizer(tokenizer_dir)
        else:
            from transformers import AutoModel, AutoTokenizer  # heavy import, only needed here

            # transformers says "missing or corrupt" with an OSError (a ValueError for a config it cannot place),
            # in several lines; name the folder on one line instead (the original stays chained, for --debug).
            what, where = "tokenizer", tokenizer_dir
            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
                what, where = "text encoder", model_dir
                model = AutoModel.from_pretrained(model_dir, dtype=dtype)
            except (OSError, ValueError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"cannot load the {what} folder {where}: {first}") from e
        return cls(model.to(device).eval(), tokenizer, instruction=instruction, max_length=max_length)


class JsonTokenizer:
    """A transformers fast tokenizer folder read with the `tokenizers` library alone (no transformers import).

    It covers what `TextEncoder` asks of a tokenizer: `encode(text)` and a call that pads on the right to
    `max_length`, truncates on the right and adds the special tokens of tokenizer.json's post-processor (Gemma's
    <bos>), returning "input_ids", "attention_mask" and the per-text `encodings` (which know what truncation
    cut off). Special tokens are those of tokenizer.json; the pad token is tokenizer_config.json's. Tested to
    give transformers' ids on Gemma-style tokenizers.
    """

    transformers_class_name = "GemmaTokenizer"  # what model_index.json names

    def __init__(self, folder: str | Path) -> None:
        from tokenizers import Tokenizer

        self.folder = Path(folder)
        path = self.folder / "tokenizer.json"
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for a missing or malformed file
            raise UserError(f"cannot read the tokenizer file {path}: {one_line(e) or type(e).__name__}") from e
        self._tok.no_padding()
        self._tok.no_truncation()
        config_path = self.folder / "tokenizer_config.json"
        config = read_json(config_path) if config_path.is_file() else {}
        pad = config.get("pad_token", "<pad>")
        pad = pad.get("content") if isinstance(pad, dict) else pad
        pad_id = self._tok.token_to_id(pad) if isinstance(pad, str) else None
        if pad_id is None:
            raise UserError(f"{self.folder}: pad token {pad!r} is not in the vocabulary")
        self.pad_token, self.pad_token_id = pad, pad_id
        self.transformers_class_name = config.get("tokenizer_class", self.transformers_class_name)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def __call__(
        self,
        texts: list[str],
        *,
        padding: str | bool = False,
        max_length: int | None = None,
        truncation: bool = False,
        add_special_tokens: bool = True,
        padding_side: str = "right",
        return_tensors: str | None = None,
    ) -> _Batch:
        if padding_side != "right" or padding not in (False, "max_length"):
            raise ValueError("JsonTokenizer pads on the right to max_length only")
        rows, masks, encodings = [], [], []
        for text in texts:
            ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
            cut = truncation and max_length is not None and len(ids) > max_length
            encodings.append(_Encoding(ids[:max_length] if cut else ids, ids[max_length:] if cut else []))
            ids = encodings[-1].ids
            n = len(ids)
            width = max_length if padding == "max_length" and max_length is not None else n
            rows.append(ids + [self.pad_token_id] * (width - n))
            masks.append([1] * n + [0] * (width - n))
        out = _Batch({"input_ids": rows, "attention_mask": masks}, encodings)
        if return_tensors == "pt":
            out.update({k: torch.tensor(v, dtype=torch.long) for k, v in list(out.items())})
        return out

    def save_pretrained(self, folder: str | Path) -> None:
        """The folder it was read from, copied (tokenizer.json and its companions)."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for f in self.folder.iterdir():
            if f.is_file():
                shutil.copy2(f, folder / f.name)


@dataclass
class _Encoding:
    ids: list[int]
    overflowing: list[int]  # what truncation cut off (transformers' encodings expose the same name)


class _Batch(dict):
    """The tokenizer's output: a dict of lists or tensors, plus the encodings (as transformers' BatchEncoding)."""

    def __init__(self, data: dict[str, Any], encodings: list[Any]) -> None:
        super().__init__(data)
        self.encodings = encodings


def _clean(prompt: str) -> str:
    # diffusers lowercases (Gemma's vocabulary is case-sensitive, so this changes the embeddings).
    return prompt.lower().strip()


def _looks_local(where: str) -> bool:
    """An existing path, or a string that cannot be a Hub id ("org/name" or "name")."""
    return os.path.exists(where) or where.startswith((".", "/", "\\")) or where.count("/") > 1 or "\\" in where
