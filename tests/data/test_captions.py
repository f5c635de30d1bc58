"""Caption selection p ∝ exp(score / tau) with a floor, its sampling statistics, and CLIP scoring of a manifest."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sana.data.captions import (
    Caption,
    ClipScorer,
    caption_probabilities,
    clip_preprocess,
    parse_captions,
    score_manifest,
    select_caption,
    selection_rng,
)

SCORED = (Caption("a", 0.30), Caption("b", 0.32), Caption("c", 0.25), Caption("d", 0.31))


def test_probabilities_formula_floor_and_fallback():
    tau = 0.02
    scores = np.array([c.score for c in SCORED])
    expected = np.exp(scores / tau) / np.exp(scores / tau).sum()
    np.testing.assert_allclose(caption_probabilities(SCORED, tau), expected, rtol=1e-12)
    floored = caption_probabilities(SCORED, tau, min_score=0.305)  # drops a (0.30) and c (0.25)
    e = np.exp(np.array([0.32, 0.31]) / tau)
    np.testing.assert_allclose(floored, [0, e[0] / e.sum(), 0, e[1] / e.sum()], rtol=1e-12)
    np.testing.assert_array_equal(caption_probabilities(SCORED, tau, min_score=0.9), [0, 1, 0, 0])  # best one
    np.testing.assert_allclose(caption_probabilities([Caption("x"), Caption("y")], tau, 0.9), [0.5, 0.5])
    assert caption_probabilities(SCORED, 1e-6).argmax() == 1  # tiny tau: (numerically) the best only
    with pytest.raises(ValueError, match="temperature"):
        caption_probabilities(SCORED, 0.0)


@pytest.mark.parametrize("min_score", [None, 0.28])
def test_draws_follow_the_distribution(min_score):
    """Chi-square goodness of fit over 8000 draws from the per-sample generators the loader uses."""
    tau, n = 0.02, 8_000
    probs = caption_probabilities(SCORED, tau, min_score)
    draws = [select_caption(SCORED, tau, min_score, selection_rng(7, epoch=i % 5, index=i)) for i in range(n)]
    counts = np.bincount(draws, minlength=len(SCORED))
    kept = probs > 0
    assert counts[~kept].sum() == 0  # nothing under the floor is ever drawn
    chi2 = (((counts - n * probs) ** 2)[kept] / (n * probs[kept])).sum()
    # df = kept - 1 <= 3; the 0.999 quantile of chi2(3) is 16.3, so a correct sampler fails < 0.1% of seeds.
    assert chi2 < 16.3, (counts, n * probs)


def test_draws_are_a_function_of_seed_epoch_and_index():
    def draw(seed, epoch, index):
        return select_caption(SCORED, 0.05, None, selection_rng(seed, epoch, index))

    first = [draw(1, 0, i) for i in range(50)]
    assert first == [draw(1, 0, i) for i in range(50)]
    assert first != [draw(1, 1, i) for i in range(50)] and first != [draw(2, 0, i) for i in range(50)]
    assert len(set(first)) > 1


def test_parse_captions():
    assert parse_captions("x", "s") == (Caption("x"),)
    assert parse_captions([{"text": "x", "score": 1}], "s") == (Caption("x", 1.0),)
    for bad in ([], [3], [{"text": "x", "score": "high"}], [{"score": 0.1}]):
        with pytest.raises(ValueError, match="^s: "):
            parse_captions(bad, "s")


# ------------------------------------------------------------------------------------------------ scoring

COLOURS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}


def colour_clip() -> ClipScorer:
    """A CLIP-like pair with known answers: the image feature is its mean RGB, a word's feature its colour."""
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def encode_images(pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) normalised -> (B, 3) mean RGB
        return pixels.mean((2, 3)) * torch.tensor(std) + torch.tensor(mean)

    def encode_texts(texts: list[str]) -> torch.Tensor:
        vecs = [
            torch.tensor([sum(COLOURS[w][c] for w in t.split() if w in COLOURS) for c in range(3)]) for t in texts
        ]
        return torch.stack(vecs).float() + 1e-3  # (n, 3)

    return ClipScorer(encode_images, encode_texts, image_size=16, mean=mean, std=std)


def test_score_manifest_fills_cosine_scores(tmp_path):
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 30), rgb).save(tmp_path / f"{name}.png")
    (tmp_path / "broken.png").write_text("not an image")
    lines = [
        {"image": "red.png", "captions": ["red", "green"], "extra": 1},
        {"image": "green.png", "text": "green"},
        {"image": "blue.png", "captions": [{"text": "red blue", "score": 0.9}]},
        {"image": "broken.png", "text": "red"},
    ]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    report = score_manifest(tmp_path / "m.jsonl", tmp_path / "out.jsonl", colour_clip(), batch_size=2)
    assert (report.scored, report.unreadable) == (3, 1)
    out = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["extra"] == 1 and "text" not in out[1]
    assert [c["score"] for c in out[0]["captions"]] == pytest.approx([1.0, 0.0], abs=1e-4)
    assert out[1]["captions"] == [{"text": "green", "score": pytest.approx(1.0, abs=1e-4)}]
    assert out[2]["captions"][0]["score"] == pytest.approx(1 / 2**0.5, abs=1e-4)  # old score replaced
    assert out[3] == lines[3]  # unreadable: copied unchanged


def test_clip_preprocess_matches_shortest_side_resize_and_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 50, 3), dtype=np.uint8))
    x = clip_preprocess(image, 16, (0, 0, 0), (1, 1, 1))
    # torchvision: Resize(16) -> 26x16 (long side truncated), CenterCrop(16) -> left round(5.0) = 5
    ref = np.asarray(image.resize((26, 16), Image.BICUBIC).crop((5, 0, 21, 16)), dtype=np.float32) / 255
    torch.testing.assert_close(x, torch.from_numpy(ref).permute(2, 0, 1))


# ------------------------------------------------------------------------------------------------ open_clip

_STUB = """
class _Meta(type):
    def __getattr__(cls, name): return _Anything
class _Anything(metaclass=_Meta):
    def __init__(self, *a, **k): pass
    def __call__(self, *a, **k): return self
    def __getattr__(self, name): return _Anything()
def __getattr__(name): return _Anything
"""

_SCRIPT = """
import json, sys, torch, open_clip
from safetensors.torch import save_file
from sana.cli.main import main
from sana.data.captions import clip_preprocess
from PIL import Image
root = sys.argv[1]
open_clip.add_model_config(root + "/tinyclip.json")
model = open_clip.create_model("tinyclip").eval()
save_file(model.state_dict(), root + "/tinyclip.safetensors")
code = main(["captions", "score", root + "/m.jsonl", "--out", root + "/out.jsonl", "--model", "tinyclip",
             "--model-config", root + "/tinyclip.json", "--pretrained", root + "/tinyclip.safetensors"])
assert code == 0, code
got = [c["score"] for line in open(root + "/out.jsonl") for c in json.loads(line)["captions"]]
tok = open_clip.get_tokenizer("tinyclip")
cfg = open_clip.get_model_preprocess_cfg(model)
with torch.no_grad():
    pixels = clip_preprocess(Image.open(root + "/a.png").convert("RGB"), cfg["size"], cfg["mean"], cfg["std"])
    img = model.encode_image(pixels[None])
    txt = model.encode_text(tok(["a red square", "a dog"]))
want = torch.nn.functional.cosine_similarity(txt, img).tolist()
assert all(abs(g - w) < 1e-5 for g, w in zip(got, want)), (got, want)
print("OK", got)
"""


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip_torch is not installed")
def test_open_clip_scorer_end_to_end(tmp_path):
    """`sana captions score` with a tiny random open_clip CLIP (nothing downloaded).

    open_clip imports torchvision for its own transforms, which this scorer never uses; where no working
    torchvision is installed (the CPU torch here has none), the subprocess gets an inert stand-in module.
    """
    env = dict(os.environ)
    if importlib.util.find_spec("torchvision") is None:
        for sub in ("torchvision", "torchvision/transforms", "torchvision/ops"):
            (tmp_path / "stub" / sub).mkdir(parents=True)
            (tmp_path / "stub" / sub / "__init__.py").write_text(_STUB)
        for mod in ("torchvision/transforms/functional.py", "torchvision/ops/misc.py"):
            (tmp_path / "stub" / mod).write_text(_STUB)
        env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "stub"), str(Path.cwd()), env.get("PYTHONPATH", "")])
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tinyclip.json").write_text(json.dumps(config))
    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "a.png")
    (tmp_path / "m.jsonl").write_text(json.dumps({"image": "a.png", "captions": ["a red square", "a dog"]}) + "\n")
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK" in result.stdout
