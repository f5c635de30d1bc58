"""The edge ControlNet benchmark (`sana eval shapes --control`): box IoU and matching against closed forms, the
recoloured captions disagree with the scene on every object, an oracle that draws the edges' scene scores IoU 1
and a blank one 0, a ControlNet that adds nothing scores as no control, and the shipped ControlNet is small,
loads in diffusers and puts objects where the edges are."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from sana.cli.main import main
from sana.models.controlnet import SanaControlNet
from sana.pretrained import SHIPPED_MODEL_DIR, load_components, shipped_controlnet
from sana.shapes.evaluate_control import box_iou, edge_map, evaluate_control, match_objects, recoloured
from sana.shapes.world import BACKGROUNDS, captions, render, scene_for_index
from sana.weights import save_model


def test_box_iou_and_greedy_matching():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 10, 10), (10, 0, 20, 10)) == 0.0  # x1 is exclusive: touching boxes share nothing
    truth = [(0, 0, 10, 10), (20, 20, 30, 30), (50, 50, 60, 60)]
    drawn = [(21, 20, 31, 30), (1, 0, 11, 10), (0, 0, 9, 10)]
    # (0,0,9,10) overlaps the first truth best (0.9) and takes it; (1,0,11,10) overlaps nothing else; the third
    # true box has no drawn box at all.
    assert match_objects(truth, drawn) == [2, 0, None]


def test_recoloured_captions_disagree_with_the_scene_on_every_object():
    for i in range(40):
        scene = scene_for_index(11, i)
        changed = recoloured(scene, np.random.default_rng(i))
        assert [o.bbox for o in changed.objects] == [o.bbox for o in scene.objects]
        assert all(a.colour != b.colour for a, b in zip(scene.objects, changed.objects, strict=True))
        assert all(o.colour != scene.background for o in changed.objects)
        mapping = {a.colour: b.colour for a, b in zip(scene.objects, changed.objects, strict=True)}
        assert len(set(mapping.values())) == len(mapping)  # distinct colours stay distinct
        assert captions(changed)[0][0] != captions(scene)[0][0]


def _oracle(seed: int):
    """Draws the edges' scene exactly when given edge maps, and an empty background without them."""

    def draw(prompts, controls, seeds):
        if controls is None:
            return [Image.new("RGB", (256, 256), BACKGROUNDS["gray"]) for _ in prompts]
        return [render(scene_for_index(seed, s - seed)) for s in seeds]

    return draw


def test_an_oracle_of_the_edges_scores_iou_1_and_a_blank_drawer_0(tmp_path):
    report = evaluate_control(_oracle(40), n_scenes=6, seed=40, batch_size=4, out_dir=tmp_path)
    rows = report.rows
    assert rows["with control"]["mean_iou"] == pytest.approx(1.0, abs=0.02)
    assert rows["with control"]["all_placed"] == 1.0 and rows["with control"]["colour"] == 1.0
    assert rows["without control"]["mean_iou"] == 0.0 and rows["without control"]["all_placed"] == 0.0
    # The oracle ignores the caption: with the colours changed it keeps the scene's, and the report says so.
    assert rows["colours changed"]["colour"] == 0.0 and rows["colours changed"]["scene_colour"] == 1.0
    assert rows["colours changed"]["all_placed"] == 1.0
    objects = sum(len(scene_for_index(40, i).objects) for i in range(6))
    assert rows["with control"]["objects"] == objects and rows["with control"]["images"] == 6
    saved = json.loads((tmp_path / "report.json").read_text())
    assert [r["seed"] for r in saved["records"]] == list(range(40, 46))
    assert Image.open(tmp_path / "grid.png").size == (4 * 132, 16 + 6 * 132)
    assert "goal with control" in report.summary()


def test_the_edge_map_outlines_every_object_and_nothing_else():
    """Every colour step of the rendering is on a line (also yellow on white, where grey-scale Canny sees none)
    but for a triangle's apex pixel, and every line pixel lies within the widening (3 px) of a step."""
    import cv2

    for i in range(12):
        scene = scene_for_index(3, i)
        pixels = np.asarray(render(scene)).astype(int)
        step = np.zeros(pixels.shape[:2], bool)
        step[:, 1:] |= (pixels[:, 1:] != pixels[:, :-1]).any(-1)
        step[1:, :] |= (pixels[1:] != pixels[:-1]).any(-1)
        edges = np.asarray(edge_map(scene))
        assert edges.shape == (256, 256, 3) and set(np.unique(edges)) <= {0, 255}
        lines = edges[:, :, 0] > 0
        near = cv2.dilate(step.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
        assert lines[step].mean() > 0.99 and near[lines].all(), i


def test_cli_with_a_controlnet_that_adds_nothing_scores_as_no_control(tmp_path, capsys):
    dit = load_components(SHIPPED_MODEL_DIR, parts=("transformer",)).transformer
    save_model(SanaControlNet.from_transformer(dit, 2), tmp_path / "zero")
    out = tmp_path / "out"
    argv = ["eval", "shapes", "--control", "--controlnet", str(tmp_path / "zero"), "--n-scenes", "3",
            "--steps", "2", "--seed", "7", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "with control" in printed and "autoencoder ceiling" in printed
    rows = json.loads((out / "report.json").read_text())["rows"]
    assert rows["with control"] == {**rows["without control"], "name": "with control"}
    assert rows["autoencoder ceiling"]["mean_iou"] > 0.85  # the truth through the shipped autoencoder
    assert main(["eval", "shapes", "--control", "--height", "512"]) == 2
    assert "do not apply to --control" in capsys.readouterr().err
    assert main(["eval", "shapes", "--n-scenes", "4"]) == 2
    assert "belong to --control" in capsys.readouterr().err


def test_the_shipped_controlnet_is_small_loads_in_diffusers_and_follows_the_edges():
    from diffusers import SanaControlNetModel
    from safetensors.torch import load_file

    from sana.pipeline import SanaPipeline
    from sana.shapes.evaluate_control import pipeline_drawer

    folder = shipped_controlnet()
    assert folder is not None, "sana/assets/shapes-controlnet is missing"
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", weights.name]
    assert weights.stat().st_size <= 10_000_000
    ours = load_file(str(weights))
    assert all(v.dtype == torch.float16 for v in ours.values())
    theirs = SanaControlNetModel.from_pretrained(folder, torch_dtype=torch.float16).state_dict()
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)

    pipe = SanaPipeline.from_pretrained(SHIPPED_MODEL_DIR, controlnet=folder)
    report = evaluate_control(pipeline_drawer(pipe, steps=10), n_scenes=8, seed=4000, batch_size=8)
    with_control, without = report.rows["with control"], report.rows["without control"]
    assert with_control["mean_iou"] > 0.7 and with_control["mean_iou"] > without["mean_iou"] + 0.3
    assert report.rows["colours changed"]["colour"] > 0.8  # the caption's colour, in the edges' place
    assert report.rows["colours changed"]["mean_iou"] > 0.7
