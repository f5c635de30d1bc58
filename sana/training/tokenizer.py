"""A Gemma-style BPE tokenizer trained on a caption corpus, for the small text encoder `sana train` builds.

The result is a real transformers `GemmaTokenizer` (a `PreTrainedTokenizerFast`), laid out like Gemma's:

    ids 0-4      <pad> <eos> <bos> <unk> <mask>
    ids 5-260    <0x00> ... <0xFF>      byte fallback: any character is representable, nothing is ever <unk>
    ids 261-     printable ASCII and "▁" (always present, so common characters never need bytes), then the
                 pieces BPE learned from the captions, most frequent merges first

The text is normalised by replacing " " with "▁" and no prefix space is added (Gemma's convention), <bos> is
prepended and <eos> never appended (`tokenizer("a cat")` -> [<bos>, ...]); padding goes to the right (the
tokenizer's default here, and what `TextEncoder` asks for on every call). `save_pretrained` +
`AutoTokenizer.from_pretrained` round-trip it.

Why train with a "▁"-splitting pre-tokenizer when Gemma's tokenizer runs BPE over the whole string: pieces then
never span two words ("▁" only ever starts a piece), and for such a merge table whole-string BPE and
word-by-word BPE give the same tokens, so the tokenizer at use time splits exactly as it did in training.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable

from transformers import GemmaTokenizer

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")  # Gemma's ids 0..4
BYTE_TOKENS = tuple(f"<0x{b:02X}>" for b in range(256))
ALPHABET = tuple(sorted(set(string.ascii_letters + string.digits + string.punctuation))) + ("▁",)
MIN_VOCAB = len(SPECIAL_TOKENS) + len(BYTE_TOKENS) + len(ALPHABET)


def train_tokenizer(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> GemmaTokenizer:
    """Learn a BPE vocabulary of (at most) `vocab_size` tokens from `texts` (used as given: lowercase them
    first if the encoder lowercases its prompts, as `TextEncoder` does). A pair must occur `min_frequency`
    times to be merged, so a small corpus may give fewer than `vocab_size` tokens. Deterministic for a given
    corpus."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    if vocab_size < MIN_VOCAB:
        raise ValueError(
            f"vocab_size must be at least {MIN_VOCAB} (special, byte and ASCII tokens), got {vocab_size}"
        )
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    # The byte tokens are added afterwards; the trainer's budget is what remains for characters and merges.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BYTE_TOKENS),
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(ALPHABET),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    learned = sorted(model["vocab"].items(), key=lambda item: item[1])  # trainer order: specials, chars, merges
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + BYTE_TOKENS)}
    for token in ALPHABET:
        vocab.setdefault(token, len(vocab))
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return GemmaTokenizer(
        vocab=vocab, merges=merges, add_bos_token=True, add_eos_token=False, padding_side="right"
    )
