"""The caption tokenizer (sana/training/tokenizer.py): Gemma's id layout, <bos> only, right padding, byte fallback,
save/load round trip, determinism."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from sana.training.tokenizer import MIN_VOCAB, train_tokenizer

COLOURS = ["red", "green", "blue", "yellow", "purple"]
SHAPES = ["circle", "square", "triangle", "star"]
CAPTIONS = [f"a {c} {s} on a {b} background" for c in COLOURS for s in SHAPES for b in ("white", "black")]


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(CAPTIONS, 420)


def test_gemma_id_layout_and_bos_only(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id] == [
        0, 1, 2, 3,
    ]  # fmt: skip
    assert tokenizer.convert_ids_to_tokens([5, 260]) == ["<0x00>", "<0xFF>"]
    assert MIN_VOCAB <= len(tokenizer) <= 420
    ids = tokenizer("a red circle on a white background")["input_ids"]
    assert ids[0] == 2 and 1 not in ids and 0 not in ids
    # Frequent caption words are single pieces (BPE learned them); pieces never span two words.
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert "▁background" in pieces and all("▁" not in p[1:] for p in pieces)


@pytest.mark.parametrize("text", ["a blue star on a black background", "zebra crossing 42!", "ünïcode 日本 ok"])
def test_round_trip_with_byte_fallback(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_pads_right(tokenizer):
    batch = tokenizer(["a red circle", "a blue square on a black background"], padding="max_length", max_length=12)
    assert batch["input_ids"][0][0] == 2 and batch["input_ids"][0][-1] == 0
    assert batch["attention_mask"][0][:4] == [1, 1, 1, 1] and batch["attention_mask"][0][-1] == 0


def test_save_load_round_trip_and_determinism(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "GemmaTokenizer" and loaded.padding_side == "right"
    for text in CAPTIONS[:5] + ["ünïcode 日本"]:
        assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert train_tokenizer(CAPTIONS, 420).get_vocab() == tokenizer.get_vocab()
    with pytest.raises(ValueError, match="vocab_size must be at least"):
        train_tokenizer(CAPTIONS, 100)
