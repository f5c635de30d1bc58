"""TextEncoder against the oracle: diffusers' SanaPipeline.encode_prompt with the same tiny Gemma and tokenizer."""

from __future__ import annotations

import warnings

import pytest
import torch

from sana.models.text_encoder import DEFAULT_INSTRUCTION, TextEncoder, load_instruction
from sana.tiny import TINY_TEXT_HIDDEN, save_tiny_text, tiny_text_components, tiny_tokenizer
from sana.types import TextEmbeddings

ML = 16  # a short token budget keeps the tests fast; the published value (300) is tested once


@pytest.fixture(scope="module")
def parts():
    return tiny_text_components(seed=0)


@pytest.fixture(scope="module")
def oracle(parts):
    from diffusers import SanaPipeline

    tokenizer, model = parts
    # encode_prompt needs only the tokenizer and the text encoder. diffusers sets padding_side on the tokenizer
    # it holds, so our encoders below get their own tokenizer (Gemma's default side is "left").
    return SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None)


def _encoder(parts, **kwargs) -> TextEncoder:
    return TextEncoder(parts[1], tiny_tokenizer(), **kwargs)


def _reference(oracle, prompts, *, instruction, max_length, negative: str | list[str] = ""):
    """(positive, negative) TextEmbeddings from diffusers; the instruction goes in as lines joined by "\\n"."""
    pe, pm, ne, nm = oracle.encode_prompt(
        prompts,
        do_classifier_free_guidance=True,
        negative_prompt=negative,
        max_sequence_length=max_length,
        complex_human_instruction=None if instruction is None else instruction.split("\n"),
    )
    return TextEmbeddings(pe, pm), TextEmbeddings(ne, nm)


def _quiet(fn, prompts) -> TextEmbeddings:
    with warnings.catch_warnings():  # prompts that fit must not trigger the truncation warning
        warnings.simplefilter("error")
        return fn(prompts)


def _assert_same(ours: TextEmbeddings, ref: TextEmbeddings) -> None:
    """Equal masks, and equal states at every position some row attends to. After the batch's longest text we
    leave zeros where diffusers runs Gemma over padding: no row attends there, so the DiT never sees them."""
    assert ours.hidden.dtype == ref.hidden.dtype and ours.mask.dtype == ref.mask.dtype == torch.int64
    assert ours.hidden.shape == ref.hidden.shape
    assert torch.equal(ours.mask, ref.mask)
    used = ref.mask.bool().any(dim=0)  # (L,)
    used[: int(used.nonzero().max()) + 1] = True  # up to the last used position, padded rows included
    torch.testing.assert_close(ours.hidden[:, used], ref.hidden[:, used], rtol=1e-5, atol=1e-6)
    assert not ours.hidden[:, ~used].any()


@pytest.mark.parametrize(
    "prompts",
    [
        ["a red cat"],
        ["a cat", "a red cat sitting on a wooden table near the window", "dog", "x"],
        [""],
    ],
    ids=["one", "batch-mixed-lengths", "empty"],
)
def test_instruction_on_matches_diffusers(parts, oracle, prompts):
    ours = _quiet(_encoder(parts, max_length=ML).encode, prompts)
    ref, _ = _reference(oracle, prompts, instruction=DEFAULT_INSTRUCTION, max_length=ML)
    assert ours.hidden.shape == (len(prompts), ML, TINY_TEXT_HIDDEN)
    _assert_same(ours, ref)


def test_lowercases_and_strips(parts, oracle):
    enc = _encoder(parts, max_length=ML)
    ours = _quiet(enc.encode, ["  A Red CAT \n"])
    _assert_same(ours, _reference(oracle, ["  A Red CAT \n"], instruction=DEFAULT_INSTRUCTION, max_length=ML)[0])
    _assert_same(ours, enc.encode(["a red cat"]))
    assert not torch.equal(ours.hidden, enc.encode(["a blue cat"]).hidden)  # the comparison can tell prompts apart


def test_default_max_length_300(parts, oracle):
    prompts = ["a photo of a dog", "a tall tree at sunset"]
    ours = _quiet(_encoder(parts).encode, prompts)
    ref, _ = _reference(oracle, prompts, instruction=DEFAULT_INSTRUCTION, max_length=300)
    assert ours.hidden.shape == (2, 300, TINY_TEXT_HIDDEN)
    _assert_same(ours, ref)


@pytest.mark.parametrize("off", [None, ""])
def test_instruction_off_matches_diffusers(parts, oracle, off):
    prompts = ["a cat", "A small house near the river"]
    ours = _quiet(_encoder(parts, instruction=off, max_length=ML).encode, prompts)
    ref, _ = _reference(oracle, prompts, instruction=None, max_length=ML)
    _assert_same(ours, ref)
    # An empty instruction list switches diffusers' CHI off too.
    pe, pm, *_ = oracle.encode_prompt(prompts, max_sequence_length=ML, complex_human_instruction=[])
    _assert_same(ours, TextEmbeddings(pe, pm))
    # bos + prompt tokens, no instruction in the window: the mask counts exactly the prompt's tokens.
    assert ours.mask.sum(1).tolist() == [len(tiny_tokenizer().encode(p.lower())) for p in prompts]


@pytest.mark.parametrize("negative", ["", "Blurry, UGLY photo "])
def test_unconditional_matches_diffusers_negative(parts, oracle, negative):
    ours = _quiet(_encoder(parts, max_length=ML).encode_unconditional, [negative, negative])
    _, ref = _reference(
        oracle, ["a cat", "a dog"], instruction=DEFAULT_INSTRUCTION, max_length=ML, negative=negative
    )
    assert ours.hidden.shape == (2, ML, TINY_TEXT_HIDDEN)
    _assert_same(ours, ref)
    if negative == "":
        assert ours.mask[0].tolist() == [1] + [0] * (ML - 1)  # <bos> only


@pytest.mark.parametrize("instruction", [DEFAULT_INSTRUCTION, None])
def test_long_prompt_truncated_like_diffusers_with_warning(parts, oracle, instruction):
    prompts = ["a cat", "a red cat on a table " * 8]
    with pytest.warns(UserWarning, match=r"\[1\].*cut at the end"):
        ours = _encoder(parts, instruction=instruction, max_length=ML).encode(prompts)
    _assert_same(ours, _reference(oracle, prompts, instruction=instruction, max_length=ML)[0])
    assert ours.mask[1].all()  # the long prompt fills the whole window


class _NoEncodings:
    """A tokenizer whose outputs carry no Rust encodings, like transformers' slow (Python) tokenizers."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def __call__(self, *args, **kwargs) -> dict:
        return dict(self.tokenizer(*args, **kwargs))


@pytest.mark.parametrize("wrap", [lambda t: t, _NoEncodings], ids=["fast", "no-encodings"])
def test_truncation_warning_boundary(parts, wrap):
    enc = TextEncoder(parts[1], wrap(tiny_tokenizer()), instruction=None, max_length=8)
    fits, over = "a " * 7, "a " * 8  # <bos> + 7 tokens fills max_length exactly; one more is cut
    assert len(tiny_tokenizer().encode(fits.strip())) == 8
    _quiet(enc.encode, [fits])
    _quiet(enc.encode_unconditional, [fits])
    with pytest.warns(UserWarning, match="8-token limit"):
        enc.encode_unconditional([fits, over])


def test_instruction_from_file(parts, oracle, tmp_path):
    text = "Paint what the user asks for.\r\nBe vivid.\nUser Prompt:\n"  # trailing newline, mixed line ends
    path = tmp_path / "chi.txt"
    path.write_bytes(text.encode())
    assert load_instruction(path) == text
    prompts = ["a red cat", "a small boat on the sea at night"]
    ours = _quiet(_encoder(parts, instruction=load_instruction(path), max_length=ML).encode, prompts)
    _assert_same(ours, _reference(oracle, prompts, instruction=text, max_length=ML)[0])
    assert not torch.allclose(ours.hidden, _encoder(parts, max_length=ML).encode(prompts).hidden)


def test_load_instruction_missing_file(tmp_path):
    with pytest.raises(ValueError, match="nope.txt") as info:
        load_instruction(tmp_path / "nope.txt")
    assert "\n" not in str(info.value)


def test_from_pretrained_round_trip(parts, tmp_path):
    model_dir, tokenizer_dir = save_tiny_text(tmp_path, seed=0)
    prompts = ["a red cat", ""]
    loaded = TextEncoder.from_pretrained(model_dir, tokenizer_dir, max_length=ML)
    in_memory = _encoder(parts, max_length=ML)
    _assert_same(loaded.encode(prompts), in_memory.encode(prompts))
    _assert_same(loaded.encode_unconditional(prompts), in_memory.encode_unconditional(prompts))
    # str paths work too; dtype follows the model, the mask stays int64.
    half = TextEncoder.from_pretrained(str(model_dir), str(tokenizer_dir), dtype=torch.bfloat16, max_length=ML)
    emb = half.encode(prompts)
    assert emb.hidden.dtype == torch.bfloat16 and emb.mask.dtype == torch.int64
    assert half.to("cpu") is half and half.device == torch.device("cpu")


def test_from_pretrained_missing_folder(tmp_path):
    model_dir, tokenizer_dir = save_tiny_text(tmp_path)
    cases = [((tmp_path / "gone", tokenizer_dir), "gone"), ((model_dir, str(tmp_path / "absent")), "absent")]
    for args, name in cases:
        with pytest.raises(FileNotFoundError, match=name) as info:
            TextEncoder.from_pretrained(*args)
        assert "\n" not in str(info.value)


def test_tokenizer_state_untouched_and_max_length_checked(parts):
    tokenizer = tiny_tokenizer()
    side = tokenizer.padding_side
    TextEncoder(parts[1], tokenizer, max_length=ML).encode(["a cat"])
    assert tokenizer.padding_side == side
    with pytest.raises(ValueError, match="max_length"):
        TextEncoder(parts[1], tokenizer, max_length=1)
