"""Our Gemma-2 reader (sana.models.gemma2) and tokenizer reader (JsonTokenizer) against transformers."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, Gemma2Config, Gemma2Model

from sana.models.gemma2 import Gemma2Encoder
from sana.models.text_encoder import DEFAULT_INSTRUCTION, JsonTokenizer, TextEncoder
from sana.tiny import save_tiny_text


def _oracle(**overrides) -> Gemma2Model:
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = Gemma2Model(Gemma2Config(**{**cfg, **overrides})).eval()
    with torch.no_grad():  # norms start at 0 (scale 1 + w): perturb them so (1 + w) is really tested
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize(
    "overrides",
    [{}, {"sliding_window": 3, "attn_logit_softcapping": 2.0}, {"attention_bias": True, "rope_theta": 100.0}],
    ids=["defaults", "sliding-window-and-strong-softcap", "bias-and-rope-theta"],
)
def test_same_hidden_states_as_transformers(tmp_path, overrides):
    theirs = _oracle(**overrides)
    theirs.save_pretrained(tmp_path)
    ours = Gemma2Encoder.from_pretrained(tmp_path)
    ids = torch.randint(1, 64, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 5:] = 0  # right padding, as the text encoder pads
    mask[2, 2:] = 0
    with torch.no_grad():
        ref = theirs(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours(input_ids=ids, attention_mask=mask)[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_reads_older_and_causal_lm_folders_and_round_trips(tmp_path):
    """Older config files (rope_theta at top level, no layer_types), "model."-prefixed keys from a causal LM
    export, sharded files; save_pretrained writes a folder transformers reads back to the same numbers."""
    theirs = _oracle()
    theirs.save_pretrained(tmp_path / "a")
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "a" / "model.safetensors")
    keys = sorted(state)
    half = len(keys) // 2
    old = tmp_path / "old"
    old.mkdir()
    save_file({f"model.{k}": state[k] for k in keys[:half]}, old / "model-00001-of-00002.safetensors")
    save_file({f"model.{k}": state[k] for k in keys[half:]}, old / "model-00002-of-00002.safetensors")
    index = {f"model.{k}": f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, k in enumerate(keys)}
    (old / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    cfg = json.loads((tmp_path / "a" / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    del cfg["layer_types"]
    (old / "config.json").write_text(json.dumps(cfg))
    ours = Gemma2Encoder.from_pretrained(old)
    ours.save_pretrained(tmp_path / "b")
    back = Gemma2Model.from_pretrained(tmp_path / "b").eval()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = theirs(input_ids=ids).last_hidden_state
        torch.testing.assert_close(ours(input_ids=ids)[0], ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(back(input_ids=ids).last_hidden_state, ref, rtol=1e-5, atol=1e-5)


def test_json_tokenizer_gives_transformers_ids(tmp_path):
    _, tokenizer_dir = save_tiny_text(tmp_path)
    theirs, ours = AutoTokenizer.from_pretrained(tokenizer_dir), JsonTokenizer(tokenizer_dir)
    texts = ["a red circle", "", "Two GREEN triangles above a cat — ünïcödé", "word " * 40]
    assert ours.encode(DEFAULT_INSTRUCTION) == theirs.encode(DEFAULT_INSTRUCTION)
    kw = dict(padding="max_length", max_length=16, truncation=True, add_special_tokens=True, return_tensors="pt")
    a, b = ours(texts, padding_side="right", **kw), theirs(texts, padding_side="right", **kw)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["attention_mask"], b["attention_mask"])
    assert [bool(e.overflowing) for e in a.encodings] == [bool(e.overflowing) for e in b.encodings]
    assert [bool(e.overflowing) for e in a.encodings] == [False, False, True, True]


def test_text_encoder_takes_the_fast_path_with_the_same_embeddings(tmp_path):
    model_dir, tokenizer_dir = save_tiny_text(tmp_path)
    ours = TextEncoder.from_pretrained(model_dir, tokenizer_dir, max_length=24)
    assert isinstance(ours.model, Gemma2Encoder) and isinstance(ours.tokenizer, JsonTokenizer)
    ref = TextEncoder(Gemma2Model.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(tokenizer_dir),
                      max_length=24)  # fmt: skip
    prompts = ["a red circle above a blue square", "x"]
    for a, b in ((ours.encode(prompts), ref.encode(prompts)), (ours.encode_unconditional([""]),
                 ref.encode_unconditional([""]))):  # fmt: skip
        torch.testing.assert_close(a.hidden, b.hidden, rtol=1e-5, atol=1e-6)
        assert torch.equal(a.mask, b.mask)
