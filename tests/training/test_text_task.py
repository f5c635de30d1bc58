"""task: text_encoder: a tiny Gemma-2 decoder learns the captions, resumes exactly, and exports a text_encoder/ +
tokenizer/ pair that `TextEncoder.from_pretrained` reads, giving hidden_size-wide embeddings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sana.config import ConfigError
from sana.training import train
from sana.training.logging import read_metrics
from sana.training.tasks import load_train_config
from sana.training.text_task import (
    CaptionBatches,
    TextDataConfig,
    read_captions,
    read_texts,
    tokenize_batch,
    training_sequences,
)
from tests.training.test_loop import one_thread  # noqa: F401 (fixture)

CONFIGS = Path(__file__).parents[2] / "configs" / "train"
QUIET = ["logging.progress=false", "logging.plot=false", "logging.tensorboard=false"]
CAPTIONS = [
    f"A {c} {s} on a {b} background"
    for c in ("red", "green", "blue", "yellow")
    for s in ("circle", "square", "triangle")
    for b in ("white", "black")
]  # 24 captions


@pytest.fixture(scope="module")
def captions(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "captions.txt"
    path.write_text("\n".join(CAPTIONS) + "\n\n")
    return path


@pytest.fixture(scope="module")
def cli_run(captions, tmp_path_factory) -> Path:
    """`sana train configs/train/tiny_text.yaml ...` for 20 steps: the run folder."""
    from sana.cli.main import main

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("text") / "run"
    overrides = [f"run_dir={run_dir}", f"data.path={captions}", "max_steps=20", "checkpoint.every=10"]
    assert main(["train", str(CONFIGS / "tiny_text.yaml"), *overrides, "task=text_encoder", *QUIET]) == 0
    return run_dir


def test_language_model_loss_decreases(cli_run):
    from sana.config import read_json

    losses = [row["loss"] for row in read_metrics(cli_run / "metrics.csv")]
    vocab = read_json(cli_run / "final" / "text_encoder" / "config.json")["vocab_size"]
    assert len(losses) == 20
    assert losses[0] == pytest.approx(torch.log(torch.tensor(float(vocab))).item(), rel=0.15)  # ~uniform at init
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3])


def test_export_loads_in_text_encoder(cli_run):
    from sana.config import read_json
    from sana.models.text_encoder import TextEncoder

    final = cli_run / "final"
    assert read_json(final / "text_encoder" / "config.json")["architectures"] == ["Gemma2Model"]
    encoder = TextEncoder.from_pretrained(
        final / "text_encoder", final / "tokenizer", instruction=None, max_length=16
    )
    assert encoder.model.transformers_class_name == "Gemma2Model"  # read by sana.models.gemma2, no transformers
    emb = encoder.encode(["A red circle on a white background", "a blue star"])
    assert emb.hidden.shape == (2, 16, 32) and torch.isfinite(emb.hidden).all()
    assert emb.mask[0].tolist()[:8] == [1] * 8 and emb.mask[1, -1] == 0  # <bos> + tokens, right padding
    # The exported decoder holds the EMA weights of the last step; the tokenizer is the run's.
    ema = load_file(str(cli_run / "checkpoints" / "step-000020" / "ema.safetensors"))
    for name, tensor in encoder.model.state_dict().items():
        assert torch.equal(tensor, ema[f"model.{name}"]), name
    assert (final / "tokenizer" / "tokenizer.json").read_bytes() == (
        cli_run / "tokenizer" / "tokenizer.json"
    ).read_bytes()
    # The default (CHI) instruction is text the captions never had: byte fallback still encodes it.
    chi = TextEncoder.from_pretrained(final / "text_encoder", final / "tokenizer", max_length=16)
    assert chi.encode(["a red circle"]).hidden.shape == (1, 16, 32)


def test_resume_is_exact(captions, tmp_path):
    extra = [f"data.path={captions}", "checkpoint.every=2", "optim.grad_accum_steps=2", *QUIET]
    config = CONFIGS / "tiny_text.yaml"
    straight = train(load_train_config(config, [f"run_dir={tmp_path / 'a'}", "max_steps=4", *extra]))
    first = train(load_train_config(config, [f"run_dir={tmp_path / 'b'}", "max_steps=2", *extra]))
    resume = ["checkpoint.resume=latest", f"run_dir={tmp_path / 'b'}", "max_steps=4", *extra]
    second = train(load_train_config(config, resume))
    assert first.losses + second.losses == straight.losses


def test_the_head_is_gemma2_for_causal_lm_with_tied_weights():
    """GemmaLanguageModel's loss equals transformers' Gemma2ForCausalLM's on the same weights and labels."""
    from transformers import Gemma2ForCausalLM

    from sana.tiny import tiny_gemma_config
    from sana.training.text_task import IGNORE, GemmaLanguageModel

    torch.manual_seed(0)
    config = tiny_gemma_config(300)
    ours = GemmaLanguageModel(config).eval()
    reference = Gemma2ForCausalLM(config).eval()
    reference.model.load_state_dict(ours.model.state_dict())
    reference.tie_weights()
    ids = torch.randint(5, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask, labels=labels).loss
        assert ours(ids, mask, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_tokenize_batch_bos_eos_padding_and_cut():
    from sana.tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    batch = tokenize_batch(tokenizer, ["a red cat", "a big blue dog sitting in the garden"], max_length=6)
    ids, mask, labels = batch.input_ids.tolist(), batch.attention_mask.tolist(), batch.labels.tolist()
    n = sum(mask[0])
    assert ids[0][0] == 2 and ids[0][n - 1] == 1 and ids[0][n:] == [0] * (6 - n)  # <bos> ... <eos> <pad>
    assert labels[0][n:] == [-100] * (6 - n) and labels[0][:n] == ids[0][:n]
    assert len(ids[1]) == 6 and 1 not in ids[1]  # cut at max_length: the <eos> went with the tail


def test_captions_from_an_image_folder_and_rank_sharding(tmp_path):
    from tests.training.test_dcae_task import shape_images

    folder = shape_images(tmp_path / "images", n=6, size=32)
    texts = read_texts(TextDataConfig(path=str(folder)))
    assert len(texts) == 6 and all(t == t.lower() and "background" in t for t in texts)
    lone = [(t,) for t in CAPTIONS]
    single = iter(CaptionBatches(lone, 4, seed=3))
    ranks = [iter(CaptionBatches(lone, 2, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    for _ in range(8):  # crosses the epoch boundary (6 global batches per epoch)
        assert next(single)["texts"] == next(ranks[0])["texts"] + next(ranks[1])["texts"]


def test_documents_join_each_samples_captions_in_a_fresh_order(tmp_path, captions):
    from sana.shapes.world import write_dataset

    write_dataset(tmp_path / "shapes", n=8, seed=0)
    cfg = TextDataConfig(path=str(tmp_path / "shapes" / "manifest.jsonl"), documents=True)
    groups = training_sequences(cfg)
    assert groups == read_captions(cfg) and len(groups) == 8 and max(len(g) for g in groups) > 2
    assert training_sequences(TextDataConfig(path=cfg.path)) == [(t,) for g in groups for t in g]

    stream = iter(CaptionBatches(groups, 8, seed=1, separator=cfg.separator))  # one batch per epoch
    epochs = [next(stream)["texts"] for _ in range(3)]
    orders = [CaptionBatches(groups, 8, seed=1).order(e) for e in range(3)]
    for texts, order in zip(epochs, orders, strict=True):
        for text, i in zip(texts, order, strict=True):
            assert sorted(text.split(cfg.separator)) == sorted(groups[i])  # every caption once, nothing else
    by_sample = [dict(zip(order, texts, strict=True)) for texts, order in zip(epochs, orders, strict=True)]
    assert any(len({e[i] for e in by_sample}) > 1 for i in range(8))  # the order changes between epochs
    assert [next(iter(CaptionBatches(groups, 8, seed=1)))["texts"] for _ in range(2)] == [epochs[0]] * 2

    with pytest.raises(ValueError, match="several captions"):
        training_sequences(TextDataConfig(path=str(captions), documents=True))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "model.gemma.hiden_size=8",
            r"unknown key model\.gemma\.hiden_size \(did you mean model\.gemma\.hidden_size",
        ),
        ("model.gemma.vocab_size=8", r"model\.gemma\.vocab_size is set from the tokenizer"),
        ("data.batchsize=2", r"unknown key data\.batchsize \(did you mean data\.batch_size"),
        ("loss.reconstruction=l1", r"unknown key loss: it belongs to task dcae"),
        ("tokenizer.vocab_size=10", r"tokenizer\.vocab_size must be >= 356"),
    ],
)
def test_config_errors_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(CONFIGS / "tiny_text.yaml", [override])
