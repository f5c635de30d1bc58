"""Tiny, offline stand-ins for the Gemma-2 text path: a Gemma-style BPE tokenizer and a random Gemma2Model.

Both are built in code (nothing is downloaded), deterministically and in well under a second, and both are the
real transformers classes, so `save_pretrained` / `AutoTokenizer.from_pretrained` / `AutoModel.from_pretrained`
and a diffusers `SanaPipeline(tokenizer=..., text_encoder=...)` accept them. A DiT built to consume these
embeddings needs `caption_channels = TINY_TEXT_HIDDEN`.
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

import torch
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

TINY_TEXT_HIDDEN = 32  # Gemma hidden size of the tiny model = the DiT's caption_channels

# Gemma's id layout for the special tokens: <pad>=0, <eos>=1, <bos>=2, <unk>=3 (then <mask>=4).
SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")

# Words that get whole-word BPE pieces; everything else falls back to single characters (or bytes), so no text
# is ever unknown, but common prompts stay short.
_CORPUS = """
a an the of in on at with and or to is are by for from under over near behind front beside its their
cat dog bird horse fish tree flower house car boat city street forest mountain river sea sky sun moon star
red green blue yellow black white orange purple pink brown gray golden silver bright dark small large big tall
photo painting drawing portrait landscape picture image style detailed realistic cartoon oil watercolor light
shadow sunset night morning rain snow cloud water fire stone wood glass metal old young man woman child people
sitting standing running flying holding wearing hat coat dress table chair window door road field garden
describe user prompt instruction enrich image generator picture scene subject details colours lighting
composition keep meaning short vague add nothing that contradicts single treat whole description if it
"""


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):  # byte-fallback pieces, as in Gemma: any character is representable
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in sorted(set(string.ascii_letters + string.digits + string.punctuation)) + ["▁", "\n"]:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []
    # Space-prefixed forms first: Gemma's normaliser turns " " into "▁" and BPE then runs over the whole string,
    # so "▁cat" must win over merging "c"+"a" first. Bare forms cover a word at the very start of the text.
    words = _CORPUS.split()
    for form in ["▁" + w for w in words] + words:
        piece = form[0]
        for ch in form[1:]:
            if piece + ch not in vocab:
                vocab[piece + ch] = len(vocab)
                merges.append((piece, ch))
            piece += ch
    return vocab, merges


def tiny_tokenizer() -> GemmaTokenizer:
    """A Gemma-style tokenizer (BPE with byte fallback, " " -> "▁", prepends <bos> only, never <eos>)."""
    vocab, merges = _vocab_and_merges()
    return GemmaTokenizer(vocab=dict(vocab), merges=list(merges), add_bos_token=True, add_eos_token=False)


def tiny_gemma_config(vocab_size: int, hidden_size: int = TINY_TEXT_HIDDEN) -> Gemma2Config:
    return Gemma2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )


def tiny_gemma(vocab_size: int, *, seed: int = 0, hidden_size: int = TINY_TEXT_HIDDEN) -> Gemma2Model:
    """A random 2-layer Gemma2Model in eval mode, identical for identical arguments."""
    torch.manual_seed(seed)
    return Gemma2Model(tiny_gemma_config(vocab_size, hidden_size)).eval()


def tiny_text_components(seed: int = 0) -> tuple[GemmaTokenizer, Gemma2Model]:
    """(tokenizer, text model) ready for `TextEncoder(model, tokenizer)` or `SanaPipeline(...)`."""
    tokenizer = tiny_tokenizer()
    return tokenizer, tiny_gemma(len(tokenizer), seed=seed)


def save_tiny_text(root: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """Save the tiny pair as `root/text_encoder` and `root/tokenizer` (the diffusers layout); returns both."""
    tokenizer, model = tiny_text_components(seed)
    model_dir, tokenizer_dir = Path(root) / "text_encoder", Path(root) / "tokenizer"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(tokenizer_dir)
    return model_dir, tokenizer_dir
