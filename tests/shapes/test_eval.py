"""The shapes benchmark: an oracle scores 100%, a random tiny Sana runs through the same plumbing, prompts are
seeded, and `sana eval shapes` writes the report and the grid."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from sana.cli.main import main
from sana.pipeline import SanaPipeline
from sana.pretrained import save_components
from sana.shapes.evaluate import autoencoder_generator, evaluate_shapes, make_prompts, oracle_generator
from sana.shapes.world import CATEGORIES
from sana.tiny import tiny_components


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-model")
    save_components(tiny_components(seed=0), root)  # a random 64 px model
    return root


def test_an_oracle_renderer_scores_100_percent(tmp_path):
    report = evaluate_shapes(oracle_generator(), n_per_category=4, seed=3, background_prob=0.5, out_dir=tmp_path)
    assert report.overall == 1.0 and report.accuracy == dict.fromkeys(CATEGORIES, 1.0)
    assert all(v == 1.0 for checks in report.checks.values() for v in checks.values())
    assert json.loads((tmp_path / "report.json").read_text())["overall"] == 1.0
    assert Image.open(tmp_path / "grid.png").size == (8 * 168, 4 * 208)
    assert "overall" in report.summary() and "counting" in report.summary()


def test_a_random_tiny_model_runs_through_the_benchmark(model_dir, tmp_path):
    pipe = SanaPipeline.from_pretrained(model_dir, instruction=None)  # short prompts: a faster test
    report = evaluate_shapes(
        pipe, n_per_category=1, seed=5, steps=2, guidance_scale=1.0, batch_size=3, out_dir=tmp_path,
        save_images=True,
    )  # fmt: skip
    assert set(report.accuracy) == set(CATEGORIES) and all(0 <= a <= 1 for a in report.accuracy.values())
    assert 0 <= report.overall <= 1
    data = json.loads((tmp_path / "report.json").read_text())
    assert set(data) == {"overall", "accuracy", "checks", "settings", "records"}
    assert data["settings"]["steps"] == 2 and data["settings"]["guidance_scale"] == 1.0
    records = data["records"]
    assert [r["seed"] for r in records] == [5, 6, 7, 8] and [r["category"] for r in records] == list(CATEGORIES)
    assert all(r["analysis"]["width"] == pipe.default_size for r in records)
    assert (tmp_path / "grid.png").is_file() and len(list((tmp_path / "images").glob("*.png"))) == 4


def test_the_autoencoder_ceiling_is_the_truth_through_encode_and_decode(model_dir):
    """A 256 px truth through the shipped autoencoder keeps its scene (colours, objects) closely; a random
    autoencoder's pictures are not scenes at all. Either way: one image per prompt, the truth's size."""
    import numpy as np
    import torch

    from sana.models.dcae import DCAE
    from sana.pretrained import SHIPPED_MODEL_DIR
    from sana.weights import load_model

    prompts, seeds = ["a red circle above a blue square", "two green triangles"], [0, 1]
    truth = oracle_generator()(prompts, seeds)
    shipped = autoencoder_generator(load_model(DCAE, SHIPPED_MODEL_DIR / "vae"))(prompts, seeds)
    random_vae = DCAE(load_model(DCAE, SHIPPED_MODEL_DIR / "vae").config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        random_vae.init_weights()
    scrambled = autoencoder_generator(random_vae.eval())(prompts, seeds)
    error = lambda a, b: np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()  # noqa: E731
    for t, good, bad in zip(truth, shipped, scrambled, strict=True):
        assert good.size == bad.size == t.size == (256, 256)
        assert error(good, t) < 8 < 40 < error(bad, t)
    report = evaluate_shapes(autoencoder_generator(load_model(DCAE, SHIPPED_MODEL_DIR / "vae")), n_per_category=2)
    assert report.accuracy["single"] == 1.0


def test_prompts_are_seeded_per_category():
    a, b = make_prompts(6, seed=0), make_prompts(6, seed=0)
    assert a == b and len(a) == 24 and [p.category for p in a[::6]] == list(CATEGORIES)
    assert make_prompts(6, seed=1) != a
    assert make_prompts(6, seed=0, categories=["counting"]) == a[18:]
    with pytest.raises(ValueError, match="unknown category"):
        make_prompts(1, seed=0, categories=["colour"])


def test_sampling_settings_need_a_pipeline_and_image_counts_must_match():
    with pytest.raises(ValueError, match="apply to a SanaPipeline"):
        evaluate_shapes(oracle_generator(), n_per_category=1, steps=4)
    with pytest.raises(ValueError, match="returned 0 images"):
        evaluate_shapes(lambda prompts, seeds: [], n_per_category=1)


def test_cli_prints_the_table_and_writes_the_report(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "shapes", "--model", str(model_dir), "--n-per-category", "1", "--steps", "1",
                 "--guidance", "1", "--no-chi", "--batch-size", "4", "--out", str(out), "--quiet"])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "single" in printed and "overall" in printed
    assert (out / "report.json").is_file() and (out / "grid.png").is_file()
    assert main(["eval", "shapes", "--model", str(model_dir), "--save-images"]) == 2


def test_cli_scores_only_the_categories_asked_for(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["eval", "shapes", "--model", str(model_dir), "--n-per-category", "2", "--steps", "1",
                 "--guidance", "1", "--no-chi", "--categories", "counting,single", "--out", str(out),
                 "--quiet"])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["categories"] == ["counting", "single"]
    assert [r["category"] for r in report["records"]] == ["counting"] * 2 + ["single"] * 2
    assert set(report["accuracy"]) == {"counting", "single"}
    capsys.readouterr()
    for bad in ("count", "single,single", ","):
        assert main(["eval", "shapes", "--model", str(tmp_path / "none"), "--categories", bad]) == 2
        assert capsys.readouterr().err.startswith("sana eval: error: --categories takes")
