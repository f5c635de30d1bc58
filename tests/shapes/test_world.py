"""The shapes world: deterministic files, scene constraints, caption phrasings and scores, the grammar, and a
manifest that sana.data trains from."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from sana.cli.main import main
from sana.data import DataConfig, build_loader, read_samples
from sana.shapes.analyzer import analyze, check
from sana.shapes.world import (
    BACKGROUNDS,
    CATEGORIES,
    COLOURS,
    RELATIONS,
    SCENE_KINDS,
    SHAPES,
    SIZE_CLASSES,
    PromptSpec,
    Thing,
    all_prompts,
    captions,
    kind_weights,
    parse_prompt,
    render,
    render_prompt,
    sample_prompts,
    scene_for_index,
    size_weights,
    spatial_relation,
    write_dataset,
)

COLOUR = "|".join(COLOURS)
SHAPE = "|".join(SHAPES)
THING = rf"an? (?:{COLOUR}) (?:{SHAPE})"


def files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_image_i_depends_only_on_seed_and_i(tmp_path):
    write_dataset(tmp_path / "a", 10, seed=0)
    write_dataset(tmp_path / "b", 10, seed=0)
    write_dataset(tmp_path / "c", 10, seed=1)
    write_dataset(tmp_path / "d", 4, seed=0)
    a, b, c, d = (files(tmp_path / x) for x in "abcd")
    assert a == b and len(a) == 12  # 10 images + manifest + scenes
    assert all(a[k] != c[k] for k in a if k.startswith("images/"))
    assert all(d[k] == a[k] for k in d if k.startswith("images/"))
    assert d["manifest.jsonl"].splitlines() == a["manifest.jsonl"].splitlines()[:4]


def test_kind_weights_pick_the_scene_kinds_and_the_default_draws_the_same_scenes():
    assert kind_weights(SCENE_KINDS) == SCENE_KINDS  # so default datasets are unchanged by the option
    assert kind_weights({"relation": 3, "single": 1}) == {
        "single": 0.25,
        "counting": 0.0,
        "relation": 0.75,
        "mixed": 0.0,
    }
    only_relations = [scene_for_index(9, i, kinds=kind_weights({"relation": 1})) for i in range(40)]
    assert {s.kind for s in only_relations} == {"relation"}
    # every one is captioned with its relation, the phrasing a relation-heavy training set is for
    assert all(any(r in t for r in RELATIONS for t, _ in captions(s)) for s in only_relations)
    halves = [scene_for_index(9, i, kinds=kind_weights({"single": 1, "counting": 1})).kind for i in range(200)]
    assert set(halves) == {"single", "counting"} and 70 < halves.count("single") < 130
    for bad in ({"relations": 1.0}, {"single": -1.0}, {"single": 0.0}, {"single": float("inf")}):
        with pytest.raises(ValueError, match="scene kind"):
            kind_weights(bad)


def test_size_weights_choose_how_often_each_size_is_drawn():
    assert size_weights({"large": 1, "small": 3}) == {"small": 0.75, "medium": 0.0, "large": 0.25}
    only = {"counting": 1.0, "single": 0.0, "relation": 0.0, "mixed": 0.0}
    small = [scene_for_index(4, i, kinds=only, sizes=size_weights({"small": 1})) for i in range(30)]
    assert {o.size for s in small for o in s.objects} == {"small"}
    # no large objects at all, and the two sizes drawn about equally often
    no_large = [
        scene_for_index(4, i, kinds=only, sizes=size_weights({"small": 1, "medium": 1})) for i in range(200)
    ]
    drawn = [o.size for s in no_large for o in s.objects]
    assert set(drawn) == {"small", "medium"} and 0.3 < drawn.count("small") / len(drawn) < 0.7
    for bad in ({"huge": 1.0}, {"small": -1.0}, {"medium": 0.0}):
        with pytest.raises(ValueError, match="size class"):
            size_weights(bad)


def test_scenes_obey_the_world_rules():
    kinds = set()
    for i in range(300):
        scene = scene_for_index(7, i)
        kinds.add(scene.kind)
        side = scene.image_size
        assert 1 <= len(scene.objects) <= 4 and scene.background in BACKGROUNDS
        for j, obj in enumerate(scene.objects):
            assert obj.colour in COLOURS and obj.colour != scene.background and obj.shape in SHAPES
            x0, y0, x1, y1 = obj.bbox
            assert 0 <= x0 < x1 <= side and 0 <= y0 < y1 <= side
            lo, hi = SIZE_CLASSES[obj.size]
            assert lo <= max(x1 - x0, y1 - y0) / side < hi
            for other in scene.objects[j + 1 :]:  # boxes apart, so the objects cannot touch
                a, b = obj.bbox, other.bbox
                assert a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1]
        if scene.kind == "counting":
            assert len({o.identity for o in scene.objects}) == 1 and len(scene.objects) >= 2
        if scene.kind == "relation":
            a, b = scene.objects
            assert a.identity != b.identity and spatial_relation(a, b) is not None
    assert kinds == {"single", "counting", "relation", "mixed"}


def test_rendering_draws_each_object_exactly_in_its_box():
    for i in range(20):
        scene = scene_for_index(3, i)
        pixels = np.asarray(render(scene))  # (H, W, 3)
        inside = np.zeros(pixels.shape[:2], dtype=bool)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            inside[y0:y1, x0:x1] = True
            box = pixels[y0:y1, x0:x1]
            ys, xs = np.nonzero((box == COLOURS[obj.colour]).all(-1))
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (0, 0, x1 - x0, y1 - y0)
        assert (pixels[~inside] == BACKGROUNDS[scene.background]).all()


def test_captions_cover_every_phrasing_and_the_full_description_scores_highest():
    texts, n_scenes = [], 150
    for i in range(n_scenes):
        caps = captions(scene_for_index(11, i))
        scores = dict(caps)
        assert len(scores) == len(caps) >= 2 and max(scores.values()) == 1.0
        assert all(0 < s <= 1 for s in scores.values())
        for text, score in caps:  # saying more (here: the background) never scores less
            for bg in BACKGROUNDS:
                longer = f"{text} on a {bg} background"
                if longer in scores:
                    assert scores[longer] > score
        texts += list(scores)
    kinds = {
        "single": rf"{THING}",
        "sized": rf"an? (?:small|large) (?:{COLOUR}) (?:{SHAPE})",
        "counting": rf"(?:two|three|four) (?:{COLOUR}) (?:{SHAPE})s",
        **{rel: rf"{THING} {rel} {THING}" for rel in RELATIONS},
    }
    for kind, pattern in kinds.items():
        assert any(re.fullmatch(pattern, t) for t in texts), kind
        assert any(re.fullmatch(pattern + r" on a (?:white|gray|black) background", t) for t in texts), kind
    assert any("an orange" in t for t in texts) and not any("a orange" in t for t in texts)


def test_captions_in_the_prompt_grammar_are_true_of_their_image():
    judged = 0
    for i in range(60):
        scene = scene_for_index(5, i)
        analysis = analyze(render(scene))
        for text, _ in captions(scene):
            try:
                spec = parse_prompt(text)
            except ValueError:  # listings like "a red circle and a blue square" are not benchmark prompts
                continue
            assert check(spec, analysis)["correct"], (text, scene)
            judged += 1
    assert judged > 60


def test_grammar_round_trips_and_sampling_covers_each_category():
    for category in CATEGORIES:
        pool = all_prompts(category)
        assert all(parse_prompt(p.text) == p for p in pool)
        drawn = sample_prompts(category, len(pool), np.random.default_rng(0))
        assert sorted(p.text for p in drawn) == sorted(p.text for p in pool)  # without replacement
    assert len(all_prompts("relation")) == 24 * 23 * 4
    spec = PromptSpec("relation", Thing("orange", "circle"), relation="above", other=Thing("red", "square"),
                      background="black")  # fmt: skip
    assert spec.text == "an orange circle above a red square on a black background"
    assert parse_prompt("  Two Green Triangles ") == PromptSpec("counting", Thing("green", "triangle"), 2)
    assert parse_prompt("a small blue square").subject == Thing("blue", "square", "small")
    for bad in ("a medium red circle", "a red circle and a blue square", "five red circles", "a pink circle"):
        with pytest.raises(ValueError, match="not a shapes-world prompt"):
            parse_prompt(bad)
    with pytest.raises(ValueError, match="background colour"):
        PromptSpec("single", Thing("white", "circle"), background="white")
    rng = np.random.default_rng(1)
    for spec in sample_prompts("relation", 200, rng, background_prob=1.0):
        assert spec.background not in {t.colour for t in spec.things}


def test_render_prompt_satisfies_the_prompt():
    rng = np.random.default_rng(0)
    for category in CATEGORIES:
        for spec in sample_prompts(category, 30, rng):
            scene = render_prompt(spec, rng)
            if category == "relation":
                a, b = scene.objects
                assert spatial_relation(a, b) == spec.relation
            assert len(scene.objects) == spec.count if category == "counting" else True
            if category == "sized":
                assert scene.objects[0].size == spec.subject.size


def test_manifest_trains_with_sana_data(tmp_path):
    write_dataset(tmp_path, 6, seed=2)
    samples = read_samples(str(tmp_path / "manifest.jsonl"))
    assert len(samples) == 6 and all(c.score is not None for s in samples for c in s.captions)
    scenes = [json.loads(line) for line in (tmp_path / "scenes.jsonl").read_text().splitlines()]
    assert [s["image"] for s in scenes] == [f"images/{i:06d}.png" for i in range(6)]
    loader = build_loader(
        DataConfig(path=str(tmp_path / "manifest.jsonl"), batch_size=2, resolution=64, caption_temperature=0.2),
        seed=0,
    )
    batch = next(iter(loader))
    assert batch["images"].shape == (2, 3, 64, 64) and batch["images"].dtype == torch.float32
    by_key = {s.key: {c.text for c in s.captions} for s in samples}
    assert all(c in by_key[k] for k, c in zip(batch["keys"], batch["captions"], strict=True))


def test_cli_writes_a_dataset_and_refuses_to_overwrite(tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--n", "3", "--seed", "4", "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000000.png", "000001.png", "000002.png"]
    assert main(["data", "shapes", "--n", "3", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["data", "shapes", "--n", "2", "--out", str(out), "--overwrite"]) == 0
    assert main(["data", "shapes", "--n", "4", "--out", str(out), "--overwrite", "--kinds", "counting=1"]) == 0
    scenes = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert [s["kind"] for s in scenes] == ["counting"] * 4
    capsys.readouterr()
    for bad, message in (
        ("counting:1", "NAME=WEIGHT"),
        ("squares=1", "unknown scene kind"),
        ("single=1,single=2", "twice"),
    ):
        assert main(["data", "shapes", "--n", "2", "--out", str(tmp_path / "x"), "--kinds", bad]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "x").exists()  # refused before anything is written
    assert main(["data", "shapes", "--n", "2", "--out", str(tmp_path / "x"), "--sizes", "huge=1"]) == 2
    assert "unknown size class" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["data", "shapes", "--n", "3", "--out", str(out), "--overwrite", "--sizes", "small=1"]) == 0
    scenes = [json.loads(line) for line in (out / "scenes.jsonl").read_text().splitlines()]
    assert {o["size"] for s in scenes for o in s["objects"]} == {"small"}
