"""task: dcae on a tiny folder of generated shape images: the loss falls, resume is exact, the exported vae/ loads
in sana and in diffusers with the same decode and unit-std latents, and the optional loss terms train the
right network."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sana.config import ConfigError
from sana.training import train
from sana.training.logging import read_metrics
from sana.training.tasks import load_train_config
from tests.training.test_loop import one_thread  # noqa: F401 (fixture)

CONFIGS = Path(__file__).parents[2] / "configs" / "train"
QUIET = ["logging.progress=false", "logging.plot=false", "logging.tensorboard=false"]


def shape_images(root: Path, n: int = 8, size: int = 32) -> Path:
    """n flat-coloured squares and circles on flat backgrounds, each with a .txt caption."""
    from PIL import Image, ImageDraw

    colours = ["red", "blue", "green", "yellow", "white", "black"]
    rng = random.Random(0)
    root.mkdir(parents=True)
    for i in range(n):
        fg, bg = rng.sample(colours, 2)
        shape = "square" if i % 2 else "circle"
        image = Image.new("RGB", (size, size), bg)
        x, y, s = rng.randint(0, size // 2), rng.randint(0, size // 2), rng.randint(size // 4, size // 2)
        draw = ImageDraw.Draw(image)
        (draw.rectangle if shape == "square" else draw.ellipse)([x, y, x + s, y + s], fill=fg)
        image.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"a {fg} {shape} on a {bg} background")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return shape_images(tmp_path_factory.mktemp("dcae") / "images")


@pytest.fixture(scope="module")
def cli_run(images, tmp_path_factory) -> Path:
    """`sana train configs/train/tiny_dcae.yaml ...` for 16 steps (L1 only, EMA on): the run folder."""
    from sana.cli.main import main

    torch.set_num_threads(1)
    run_dir = tmp_path_factory.mktemp("dcae") / "run"
    overrides = [f"run_dir={run_dir}", f"data.path={images}", "max_steps=16", "checkpoint.every=8", "task=dcae"]
    assert main(["train", str(CONFIGS / "tiny_dcae.yaml"), *overrides, *QUIET]) == 0
    return run_dir


def test_reconstruction_loss_decreases(cli_run):
    losses = [row["loss"] for row in read_metrics(cli_run / "metrics.csv")]
    assert len(losses) == 16 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])


def test_export_loads_in_sana_and_diffusers_with_the_same_decode(cli_run):
    from diffusers import AutoencoderDC

    from sana.models.dcae import DCAE
    from sana.weights import load_model

    folder = cli_run / "final" / "vae"
    ours = load_model(DCAE, folder)
    theirs = AutoencoderDC.from_pretrained(folder).eval()
    # The exported weights are the EMA of the last checkpoint.
    ema = load_file(str(cli_run / "checkpoints" / "step-000016" / "ema.safetensors"))
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, ema[f"vae.{name}"]), name
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mine = ours.decode(z)  # (2, 3, 32, 32)
        # diffusers' decode takes raw latents: its pipelines divide by scaling_factor themselves.
        reference = theirs.decode(z / theirs.config.scaling_factor).sample
    torch.testing.assert_close(mine, reference, rtol=1e-4, atol=1e-5)


def test_scaling_factor_gives_unit_std_latents(cli_run, images):
    from sana.config import read_json
    from sana.data import DataConfig, build_loader
    from sana.models.dcae import DCAE
    from sana.weights import load_model

    config = read_json(cli_run / "final" / "vae" / "config.json")
    vae = load_model(DCAE, cli_run / "final" / "vae")
    assert config["scaling_factor"] == vae.config.scaling_factor != 0.5  # measured, not the preset's
    loader = build_loader(DataConfig(path=str(images), batch_size=8, resolution=32, buckets=False), seed=0)
    with torch.no_grad():
        latents = vae.encode(next(iter(loader))["images"])  # (8, 4, 8, 8), all 8 images: the measured set
    assert latents.std().item() == pytest.approx(1.0, abs=1e-3)


def test_resume_is_exact_with_every_loss_term(images, tmp_path):
    """4 steps straight == 2 steps, resume, 2 more: same losses bit for bit and same weights, with the
    perceptual and adversarial terms on (the discriminator's state resumes too) and accumulation."""
    terms = ["loss.perceptual.enabled=true", "loss.adversarial.enabled=true", "loss.adversarial.start_step=2"]
    extra = [f"data.path={images}", *terms, "optim.grad_accum_steps=2", "checkpoint.every=2", *QUIET]
    config = CONFIGS / "tiny_dcae.yaml"
    straight = train(load_train_config(config, [f"run_dir={tmp_path / 'a'}", "max_steps=4", *extra]))
    first = train(load_train_config(config, [f"run_dir={tmp_path / 'b'}", "max_steps=2", *extra]))
    resume = ["checkpoint.resume=latest", f"run_dir={tmp_path / 'b'}", "max_steps=4", *extra]
    second = train(load_train_config(config, resume))
    assert first.losses + second.losses == straight.losses
    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-000004" / "model.safetensors"))
    assert any(k.startswith("discriminator.") for k in a) and a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decoder_only_fine_tuning_keeps_the_latent_space(cli_run, images, tmp_path):
    """Encoder weights and scaling_factor are the pretrained ones bit for bit; the decoder learned."""
    from sana.models.dcae import DCAE
    from sana.weights import load_model

    pretrained = cli_run / "final" / "vae"
    model = f"model={{pretrained: {pretrained}, decoder_only: true}}"
    overrides = [f"run_dir={tmp_path}", f"data.path={images}", model, "max_steps=3", *QUIET]
    train(load_train_config(CONFIGS / "tiny_dcae.yaml", overrides))
    before, after = load_model(DCAE, pretrained), load_model(DCAE, tmp_path / "final" / "vae")
    assert after.config == before.config  # scaling_factor included: kept, not measured again
    old, new = before.state_dict(), after.state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old if k.startswith("encoder."))
    assert not all(torch.equal(old[k], new[k]) for k in old if k.startswith("decoder."))


def test_loss_terms_move_only_their_own_network():
    """The generator term reaches the autoencoder only, the discriminator loss the discriminator only; the
    perceptual term is a differentiable distance that is 0 between equal images."""
    from sana.models.dcae import DCAE, DCAE_PRESETS
    from sana.training.dcae_task import (
        AutoencoderTrainer,
        PatchDiscriminator,
        RandomFeatures,
        perceptual_distance,
    )

    torch.manual_seed(0)
    model = AutoencoderTrainer(DCAE(DCAE_PRESETS["tiny"]), PatchDiscriminator(channels=8, layers=2))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, generator, disc = model(images, adversarial=True)
    generator.backward(retain_graph=True)
    assert all(p.grad is None for p in model.discriminator.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vae.parameters())
    model.zero_grad(set_to_none=True)
    disc.backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is not None for p in model.discriminator.parameters())
    _, off, disc_only = model(images, adversarial=False)
    assert off is None and disc_only is not None  # the discriminator trains before start_step
    net = RandomFeatures((8, 16))
    assert perceptual_distance(net, images, images).item() == 0
    recon = recon.detach().requires_grad_(True)
    perceptual_distance(net, recon, images).backward()
    assert recon.grad.abs().sum() > 0 and all(p.grad is None for p in net.parameters())


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "loss.adversarial.wieght=1",
            r"unknown key loss\.adversarial\.wieght \(did you mean loss\.adversarial\.weight",
        ),
        ("model.overrides={latent_chanels: 8}", r"unknown key model\.overrides\.latent_chanels"),
        ("model.preset=nope", r"model\.preset 'nope' is not one of .*shapes-f32c32"),
        ("flow.shift=3", r"unknown key flow: it belongs to task dit, and this run has task: dcae"),
        ("loss.reconstruction=l3", r"loss\.reconstruction must be one of 'l1', 'mse'"),
        ("distributed.strategy=fsdp", r"task dcae supports ddp only"),
        ("model.decoder_only=true", r"model\.decoder_only needs model\.pretrained"),
    ],
)
def test_config_errors_name_the_dotted_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(CONFIGS / "tiny_dcae.yaml", [override])


def test_shapes_preset_compresses_256_to_8x8x32():
    from sana.models.dcae import DCAE

    cfg = load_train_config(CONFIGS / "shapes_dcae.yaml")
    config = cfg.model.dcae_config()
    assert config.spatial_compression == 32 and config.latent_channels == 32
    vae = DCAE(config)
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 256, 256)).shape == (1, 32, 8, 8)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_training_config_loads(path):
    load_train_config(path)  # every key known, every value valid: a YAML in configs/ is never stale
