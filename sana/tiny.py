"""A tiny random-weight Sana, built in code: the same architecture at toy widths, nothing downloaded.

Used by the tests (fixtures that also feed diffusers' SanaPipeline, the oracle) and by `sana demo` to show
the whole path working offline. The text side is a Gemma-style BPE tokenizer and a random Gemma2Model,
both real transformers classes, so `save_pretrained` / `AutoTokenizer.from_pretrained` /
`AutoModel.from_pretrained` accept them. A DiT built to consume these embeddings needs
`caption_channels = TINY_TEXT_HIDDEN`. Construction is seeded without touching the global RNG.
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
    with torch.random.fork_rng(devices=[]):
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


def tiny_components(seed: int = 0, *, sample_size: int = 16):
    """Random tiny SanaComponents: DiT (2 blocks, width 16), DC-AE (4x compression), Gemma (width 32).

    `sample_size` is the DiT's native latent side; 16 or 32 select the published 512/1024 aspect-ratio tables
    (as in diffusers), so the tiny model bins sizes like the real ones.
    """
    import dataclasses

    from sana.models.dcae import DCAE, DCAE_PRESETS
    from sana.models.dit import DIT_PRESETS, SanaDiT
    from sana.models.text_encoder import TextEncoder
    from sana.pretrained import SanaComponents, SchedulerSpec

    vae_config = DCAE_PRESETS["tiny"]
    dit_config = dataclasses.replace(
        DIT_PRESETS["tiny"],
        in_channels=vae_config.latent_channels,
        out_channels=vae_config.latent_channels,
        caption_channels=TINY_TEXT_HIDDEN,
        sample_size=sample_size,
    )
    tokenizer, gemma = tiny_text_components(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = SanaDiT(dit_config), DCAE(vae_config)
        transformer.init_weights()
        with torch.no_grad():  # init_weights zeroes the output path; a random demo model should draw something
            for p in transformer.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    return SanaComponents(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=TextEncoder(gemma, tokenizer),
        scheduler=SchedulerSpec(),
    )
