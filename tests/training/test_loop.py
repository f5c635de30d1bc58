"""The training loop on a tiny model: train_step, accumulation, per-rank randomness, schedule, EMA, and one
end-to-end `sana train` run on an image folder (validation grid, loss plot, exported model that generates).

Also home of the test helpers the other training tests import: `MemoryData`, a tiny in-memory data source
that follows the sana.data loader contract (infinite, rank-sharded global batches, state_dict for resume), and
`tiny_config`.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from sana.training.ema import init_ema, update_ema
from sana.training.optim import lr_at
from sana.training.step import FlowBatch, drop_captions, make_flow_batch, step_generator, train_step
from sana.training.tasks import train_config_from_dict
from sana.types import Conditioning, TextEmbeddings

# ------------------------------------------------------------------------------------------------- helpers


class MemoryData:
    """n cached samples for the "tiny" DiT preset (4 latent channels, caption width 8).

    Follows the sana.data contract: an infinite iterator over this rank's slots [r*b, (r+1)*b) of every global
    batch; each epoch is a permutation seeded by (seed, epoch); state_dict/load_state_dict restore the position.
    `augment` flips/rolls latents with the *global* torch and python RNGs, so an exact resume also needs the RNG
    states restored. `nan_at` poisons the batch with that 0-based index.
    """

    def __init__(
        self,
        *,
        seed: int,
        rank: int,
        world_size: int,
        n: int = 16,
        batch_size: int = 2,
        augment: bool = True,
        nan_at: int | None = None,
    ) -> None:
        g = torch.Generator().manual_seed(1234)  # the same dataset on every rank
        self.latents = torch.randn(n, 4, 8, 8, generator=g)
        self.hidden = torch.randn(n, 6, 8, generator=g)
        lengths = torch.randint(1, 7, (n,), generator=g)
        self.mask = (torch.arange(6)[None] < lengths[:, None]).long()  # (n, 6)
        self.null_text = TextEmbeddings(torch.randn(1, 3, 8, generator=g), torch.tensor([[1, 0, 0]]))
        self.n, self.b, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.per_epoch = n // (batch_size * world_size)
        if self.per_epoch == 0:
            raise ValueError(f"batch larger than the dataset: {batch_size} x {world_size} > {n}")
        self.augment, self.nan_at = augment, nan_at
        self.epoch = self.position = self.served = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "served": self.served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position, self.served = state["epoch"], state["position"], state["served"]

    def __iter__(self):
        while True:
            if self.position >= self.per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
            start = self.position * self.b * self.world + self.rank * self.b
            rows = order[start : start + self.b]
            latents = self.latents[rows].clone()
            if self.augment:
                if torch.rand(()) < 0.5:
                    latents = latents.flip(-1)
                latents = latents.roll(random.randint(0, 3), dims=-2)
            if self.served == self.nan_at:
                latents[0, 0, 0, 0] = float("nan")
            self.position += 1
            self.served += 1
            yield {
                "latents": latents,
                "text_hidden": self.hidden[rows],
                "text_mask": self.mask[rows],
                "keys": [str(int(r)) for r in rows],
            }


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config_dict(run_dir: Path | str, **extra: Any) -> dict:
    base = {
        "run_dir": str(run_dir),
        "max_steps": 6,
        "device": "cpu",  # CPU tests, also on a machine with a GPU (bitwise comparisons, 2 ranks on one host)
        "model": {"preset": "tiny"},
        "optim": {"lr": 1e-3},
        "ema": {"decay": 0.9},
        "flow": {"caption_dropout": 0.3},
        "checkpoint": {"every": 3},
        "logging": {"progress": False, "tensorboard": False, "plot": False},
    }
    return _merge(base, extra)


def tiny_config(run_dir: Path | str, **extra: Any):
    return train_config_from_dict(tiny_config_dict(run_dir, **extra))


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model is far faster on one thread (and does not fight other processes for cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _tiny_model(seed: int = 0):
    from sana.models.dit import DIT_PRESETS, SanaDiT

    torch.manual_seed(seed)
    model = SanaDiT(DIT_PRESETS["tiny"])
    model.init_weights()
    return model


def _flow_batch(b: int, seed: int = 0) -> FlowBatch:
    g = torch.Generator().manual_seed(seed)
    text = TextEmbeddings(torch.randn(b, 6, 8, generator=g), torch.ones(b, 6, dtype=torch.long))
    return FlowBatch(torch.randn(b, 4, 8, 8, generator=g), text, torch.randn(b, 4, 8, 8, generator=g),
                     torch.rand(b, generator=g))  # fmt: skip


# --------------------------------------------------------------------------------------------------- tests


def test_train_step_fits_a_fixed_batch():
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _flow_batch(4)
    losses = [train_step(model, [batch], optimizer, grad_clip=1.0)["loss"] for _ in range(40)]
    assert losses[-1] < 0.5 * losses[0]
    assert all(torch.isfinite(torch.tensor(losses)))


def test_accumulation_equals_one_big_batch():
    """Two micro-batches of 2 take the same optimizer step as one batch of 4 (mean loss, averaged grads)."""
    big = _flow_batch(4)
    halves = [
        FlowBatch(big.x0[s], TextEmbeddings(big.text.hidden[s], big.text.mask[s]), big.noise[s], big.t[s])
        for s in (slice(0, 2), slice(2, 4))
    ]
    a, b = _tiny_model(), _tiny_model()
    opt_a, opt_b = torch.optim.SGD(a.parameters(), lr=0.1), torch.optim.SGD(b.parameters(), lr=0.1)
    for model in (a, b):  # leave the zero-initialised output layer, so every parameter gets a gradient
        train_step(model, [big], torch.optim.SGD(model.parameters(), lr=0.1))
    la = train_step(a, [big], opt_a)["loss"]
    lb = train_step(b, halves, opt_b)["loss"]
    assert la == pytest.approx(lb, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7)


def test_ranks_draw_slices_of_the_single_process_draw():
    """K ranks with batch b see, row for row, the noise/times/dropout of one process with batch K*b."""
    from sana.training.config import FlowConfig

    cfg = FlowConfig(caption_dropout=0.5)
    null = TextEmbeddings(torch.zeros(1, 2, 8), torch.tensor([[1, 0]]))
    whole = _flow_batch(4)
    single = make_flow_batch(whole.x0, whole.text, null, cfg, step_generator(7, 3, 0))
    for rank in (0, 1):
        rows = slice(2 * rank, 2 * rank + 2)
        text = TextEmbeddings(whole.text.hidden[rows], whole.text.mask[rows])
        part = make_flow_batch(whole.x0[rows], text, null, cfg, step_generator(7, 3, 0), rank, 2)
        torch.testing.assert_close(part.noise, single.noise[rows], rtol=0, atol=0)
        torch.testing.assert_close(part.t, single.t[rows], rtol=0, atol=0)
        torch.testing.assert_close(part.text.mask, single.text.mask[rows], rtol=0, atol=0)
    assert step_generator(7, 3, 0).initial_seed() != step_generator(7, 4, 0).initial_seed()


def test_gradient_checkpointing_gives_the_same_step():
    a, b = _tiny_model(), _tiny_model()
    b.gradient_checkpointing = True
    batch = _flow_batch(2)
    for _ in range(2):  # the second step has gradients everywhere (the output layer starts at zero)
        la = train_step(a, [batch], torch.optim.SGD(a.parameters(), lr=0.1))["loss"]
        lb = train_step(b, [batch], torch.optim.SGD(b.parameters(), lr=0.1))["loss"]
        assert la == lb
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("mixed", ["bf16", "fp16"])
def test_mixed_precision_steps(mixed):
    """Autocast forward; fp16 goes through the gradient scaler. Weights and optimizer state stay float32."""
    model = _tiny_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = torch.amp.GradScaler("cpu") if mixed == "fp16" else None
    batch = _flow_batch(4)
    losses = [train_step(model, [batch], optimizer, mixed=mixed, scaler=scaler)["loss"] for _ in range(8)]
    assert losses[-1] < losses[0]
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_caption_dropout_uses_the_empty_prompt_embedding():
    text = TextEmbeddings(torch.ones(3, 4, 8), torch.ones(3, 4, dtype=torch.long))
    null = TextEmbeddings(torch.full((1, 2, 8), 5.0), torch.tensor([[1, 0]]))
    out = drop_captions(text, null, torch.tensor([False, True, False]))
    assert torch.equal(out.hidden[0], text.hidden[0]) and torch.equal(out.hidden[2], text.hidden[2])
    assert torch.equal(out.mask[1], torch.tensor([1, 0, 0, 0]))  # padded with masked-out positions
    assert torch.equal(out.hidden[1, :2], torch.full((2, 8), 5.0)) and not out.hidden[1, 2:].any()


def test_lr_schedule_warmup_then_cosine():
    from sana.training.config import OptimConfig, ScheduleConfig

    optim = OptimConfig(lr=1.0)
    cosine = ScheduleConfig(warmup_steps=10, decay="cosine", min_lr=0.1)
    assert lr_at(5, optim, cosine, 110) == pytest.approx(0.5)
    assert lr_at(10, optim, cosine, 110) == pytest.approx(1.0)
    assert lr_at(60, optim, cosine, 110) == pytest.approx(0.55)
    assert lr_at(110, optim, cosine, 110) == pytest.approx(0.1)
    assert lr_at(50, optim, ScheduleConfig(warmup_steps=10), 110) == 1.0


def test_update_ema():
    model = torch.nn.Linear(2, 2)
    ema = init_ema(model)
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    update_ema(ema, model, decay=0.75)
    torch.testing.assert_close(ema["weight"], before + 0.25)


def test_came_optimizer_trains():
    pytest.importorskip("came_pytorch")
    from sana.training.config import OptimConfig
    from sana.training.optim import build_optimizer

    model = _tiny_model()
    optimizer = build_optimizer(model, OptimConfig(name="came", lr=1e-3))
    batch = _flow_batch(4)
    losses = [train_step(model, [batch], optimizer)["loss"] for _ in range(10)]
    assert losses[-1] < losses[0]


def test_pretrained_model_takes_config_overrides(tmp_path):
    """model.overrides on a pretrained transformer: `interpolation_scale: 1.0` switches sincos positions on in a
    NoPE model (computed, so every weight still fits); the model then reads positions (its output changes) and
    holds the changed config, which is what its export writes. A field that changes a weight's shape, or no
    such field, is refused."""
    from sana.config import ConfigError
    from sana.pretrained import save_components
    from sana.tiny import tiny_components
    from sana.training.dit_task import build_model
    from sana.weights import CheckpointError

    parts = tiny_components(seed=0)
    assert parts.transformer.config.interpolation_scale is None
    folder = save_components(parts, tmp_path / "model")
    pretrained = {"preset": None, "pretrained": str(folder)}
    model = build_model(
        tiny_config(tmp_path / "run", model={**pretrained, "overrides": {"interpolation_scale": 1.0}})
    )
    assert model.config.interpolation_scale == 1.0
    ref = parts.transformer.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.state_dict().items())
    x = torch.randn(1, parts.transformer.config.in_channels, 4, 4)
    text = Conditioning(TextEmbeddings(
        torch.randn(1, 5, parts.transformer.config.caption_channels), torch.ones(1, 5, dtype=torch.long)
    ))  # fmt: skip
    with torch.no_grad():
        moved = model.eval()(x, torch.tensor([500.0]), text) - parts.transformer.eval()(
            x, torch.tensor([500.0]), text
        )
    assert moved.abs().max() > 1e-3

    with pytest.raises(CheckpointError, match="caption_projection"):
        build_model(tiny_config(tmp_path / "run", model={**pretrained, "overrides": {"caption_channels": 7}}))
    with pytest.raises(ConfigError, match="model.overrides"):
        build_model(tiny_config(tmp_path / "run", model={**pretrained, "overrides": {"no_such_field": 1}}))


def _image_folder(root: Path, n: int = 4) -> Path:
    from PIL import Image

    colours = ["red", "blue", "green", "yellow"]
    root.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (32, 32), colours[i % 4]).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {colours[i % 4]} square")
    return root


def test_sana_train_cli_end_to_end(tmp_path, capsys):
    """configs/train/tiny.yaml via `sana train` on raw images: encoders, validation grid, CSV, loss plot, and
    an exported model folder that `SanaPipeline.from_pretrained` (so `sana generate --model`) accepts."""
    from sana.cli.main import main
    from sana.pipeline import SanaPipeline
    from sana.pretrained import save_components
    from sana.tiny import tiny_components
    from sana.training.logging import read_metrics

    model_dir = save_components(tiny_components(seed=0), tmp_path / "model")
    images = _image_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    config = Path(__file__).parents[2] / "configs" / "train" / "tiny.yaml"
    overrides = [
        f"run_dir={run_dir}", f"data.path={images}", f"model.components={model_dir}", "max_steps=4",
        "validation.every=4", "validation.steps=2", "logging.progress=false", "checkpoint.every=2",
        "schedule.warmup_steps=1",
    ]  # fmt: skip
    assert main(["train", str(config), *overrides]) == 0
    assert "final" in capsys.readouterr().out
    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (run_dir / "validation" / "step-000004.png").is_file()
    assert (run_dir / "loss.png").is_file()
    pipe = SanaPipeline.from_pretrained(run_dir / "final")
    assert pipe("a red square", steps=2, seed=0)[0].size == (64, 64)

    # Fine-tuning: the exported folder as model.pretrained (its autoencoder and text encoder come with it).
    tuned = tmp_path / "tuned"
    overrides = [
        f"run_dir={tuned}", f"data.path={images}", "model.preset=null", "model.overrides={}",
        f"model.pretrained={run_dir / 'final'}", "model.components=null", "max_steps=2", "validation.every=0",
        "logging.progress=false", "schedule.warmup_steps=0",
    ]  # fmt: skip
    assert main(["train", str(config), *overrides]) == 0
    assert "fine-tuning" in (tuned / "train.log").read_text()
    assert (tuned / "final" / "vae").is_dir()
