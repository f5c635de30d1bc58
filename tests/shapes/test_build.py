"""The shipped model's build steps that are not training: assembling the encoders' folder, shipping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sana.pretrained import load_components, model_instruction, save_components, write_instruction
from sana.shapes import build
from sana.tiny import tiny_components


@pytest.fixture()
def trained(tmp_path):
    """Stand-ins for the three training runs' exports, made of the tiny model's parts."""
    parts = tiny_components(seed=0)
    full = tmp_path / "full"
    save_components(parts, full)
    return parts, full


def test_components_folder_serves_sana_cache_and_declares_bare_captions(tmp_path, trained):
    _, full = trained
    out = build.assemble_components(full, full, tmp_path / "components", flow_shift=1.0)
    parts = load_components(out, parts=("vae", "text_encoder"))
    assert parts.text_encoder.instruction is None and model_instruction(out) is None
    assert parts.scheduler.flow_shift == 1.0 and parts.scheduler.sampler == "dpm"
    index = json.loads((out / "model_index.json").read_text())
    assert "transformer" not in index and index["vae"] == ["diffusers", "AutoencoderDC"]
    assert not (tmp_path / ".tmp-components").exists()


def test_ship_writes_float16_under_budget_or_nothing(tmp_path, trained, monkeypatch):
    parts, full = trained
    write_instruction(full, None)
    out = build.ship(full, tmp_path / "shipped")
    shipped = load_components(out, dtype=torch.float32)
    for name in ("transformer", "vae"):
        ref = getattr(parts, name).state_dict()
        for k, v in getattr(shipped, name).state_dict().items():
            assert torch.equal(v, ref[k].half().float()), k
    assert shipped.text_encoder.instruction is None
    # The sampling defaults measured for the shipped DiT, over the trained folder's (the library's usual ones).
    measured = (build.SAMPLING["steps"], build.SAMPLING["guidance_scale"])
    assert (shipped.scheduler.steps, shipped.scheduler.guidance_scale) == measured
    assert (parts.scheduler.steps, parts.scheduler.guidance_scale) != measured
    assert shipped.scheduler.flow_shift == parts.scheduler.flow_shift

    monkeypatch.setattr(build, "SHIPPED_BUDGET_BYTES", 1000)
    with pytest.raises(RuntimeError, match="over the 30 MiB budget"):
        build.ship(full, tmp_path / "too-big")
    assert not (tmp_path / "too-big").exists() and not (tmp_path / ".tmp-too-big").exists()


def test_run_steps_makes_only_what_the_target_needs():
    """make's rule: a missing result is made after what it needs; a step whose result exists is skipped, and so
    are its own inputs (with the last export in place, nothing before it runs); a shared input is made once."""
    have = {"a"}
    ran_calls: list[str] = []

    def step(name, *needs):
        return build.Step(name, lambda: (ran_calls.append(name), have.add(name)), lambda: name in have, needs)

    steps = [step("a"), step("b", "a"), step("c", "a"), step("d", "b", "c"), step("e", "d"), step("ship", "e")]
    assert build.run_steps(steps, "ship") == ["b", "c", "d", "e", "ship"] == ran_calls
    have, ran_calls[:] = {"e"}, []
    assert build.run_steps(steps, "ship") == ["ship"]
    have = {"d"}
    assert build.run_steps(steps, "ship") == ["e", "ship"]


def test_relation_manifest_adds_the_relation_captions_of_two_object_scenes(tmp_path):
    from sana.data.sources import read_manifest_lines
    from sana.shapes.world import RELATIONS, Scene, spatial_relation, write_dataset

    general, source, out = tmp_path / "general", tmp_path / "source", tmp_path / "mix"
    write_dataset(general, 6, seed=0)
    write_dataset(source, 40, seed=1)
    found = build.relation_manifest(out, [(source, 0, 4)], general=general)
    rows = read_manifest_lines(out / "manifest.jsonl")
    assert found == 4 and len(rows) == 6 + 4
    general_rows = read_manifest_lines(general / "manifest.jsonl")
    for mine, theirs in zip(rows[:6], general_rows, strict=False):  # the general set whole, every caption
        assert (
            Path(mine.image.path).resolve() == Path(theirs.image.path).resolve()
            and mine.captions == theirs.captions
        )
    scenes = [Scene.from_json(json.loads(line)) for line in (source / "scenes.jsonl").read_text().splitlines()]
    # Two objects told apart by colour or shape, with a relation between them: the scenes whose captions state it.
    two_object = [
        i
        for i, s in enumerate(scenes)
        if len(s.objects) == 2
        and s.objects[0].identity != s.objects[1].identity
        and spatial_relation(*s.objects) is not None
    ]
    added = [int(Path(r.image.path).stem) for r in rows[6:]]
    assert added == two_object[:4]  # the first ones, in order
    for row in rows[6:]:
        assert Path(row.image.path).is_file()
        assert row.captions and all(any(f" {r} " in c.text for r in RELATIONS) for c in row.captions)

    # Without a general set, after skipping some, to the end of each source in turn: the binding run's data.
    rest = build.relation_manifest(tmp_path / "rest", [(source, 3, None), (source, 0, 2)])
    rest_rows = read_manifest_lines(tmp_path / "rest" / "manifest.jsonl")
    assert rest == len(two_object) - 3 + 2 == len(rest_rows)
    assert [int(Path(r.image.path).stem) for r in rest_rows] == two_object[3:] + two_object[:2]

    with pytest.raises(ValueError, match="only"):
        build.relation_manifest(tmp_path / "too-many", [(source, 0, 40)], general=general)
    assert not (tmp_path / "too-many" / "manifest.jsonl").exists()


@pytest.mark.parametrize(("name", "pretrained", "data"), [
    ("dit_positions", build.BASE, build.POSITIONS_CACHE),
    ("dit_refine", build.POSITIONS_FINAL, build.REFINE_CACHE),
    ("dit_binding", build.REFINE_FINAL, build.BINDING_CACHE),
    ("dit_restore", build.BINDING_FINAL, build.REFINE_CACHE),
    ("dit_finish", build.RESTORE_FINAL, build.FINISH_CACHE),
    ("dit_count", build.FINISH_FINAL, build.FINISH_CACHE),
    ("dit_groups", build.COUNT_FINAL, build.GROUPS_CACHE),
])  # fmt: skip
def test_fine_tune_configs_read_what_the_build_writes(name, pretrained, data):
    from sana.training import load_train_config

    root = Path(__file__).parents[2]
    cfg = load_train_config(root / build.CONFIGS[name])
    assert Path(cfg.model.pretrained) == pretrained and Path(cfg.data.path) == data
    finals = {
        "dit_positions": build.POSITIONS_FINAL,
        "dit_refine": build.REFINE_FINAL,
        "dit_binding": build.BINDING_FINAL,
        "dit_restore": build.RESTORE_FINAL,
        "dit_finish": build.FINISH_FINAL,
        "dit_count": build.COUNT_FINAL,
        "dit_groups": build.GROUPS_FINAL,
    }
    assert Path(cfg.run_dir) / "final" == finals[name]


def test_the_build_is_one_chain_to_ship(tmp_path):
    """Every step of the real build is needed for `ship`, needs only steps listed before it, and from nothing
    they run in the listed order; with the last DiT's export there, only `ship` runs."""
    from dataclasses import replace

    steps = build.build_steps(10, 0, "cpu", tmp_path / "out")
    names = [s.name for s in steps]
    assert len(set(names)) == len(names) and names[-1] == "ship"
    for i, s in enumerate(steps):
        assert set(s.needs) <= set(names[:i]), s.name
    have: set[str] = set()

    def dry(s):
        return replace(s, run=lambda: have.add(s.name), done=lambda: s.name in have)

    assert build.run_steps([dry(s) for s in steps], "ship") == names
    have = {"groups"}
    assert build.run_steps([dry(s) for s in steps], "ship") == ["ship"]


def test_groups_data_is_what_the_documented_command_writes(tmp_path):
    """The build's groups-data step and `sana data shapes --kinds ... --sizes ...` (its docstring's command)
    write the same files, and the scenes are drawn smaller than the default sets'."""
    from sana.cli.main import main

    build.make_data(tmp_path / "build", 60, build.GROUPS_SEED, build.GROUPS_KINDS, build.GROUPS_SIZES)
    kinds = ",".join(f"{k}={v}" for k, v in build.GROUPS_KINDS.items())
    sizes = ",".join(f"{k}={v}" for k, v in build.GROUPS_SIZES.items())
    argv = ["data", "shapes", "--n", "60", "--seed", str(build.GROUPS_SEED), "--kinds", kinds, "--sizes", sizes]
    assert main([*argv, "--out", str(tmp_path / "cli")]) == 0
    for name in ("manifest.jsonl", "scenes.jsonl", "images/000059.png"):
        assert (tmp_path / "build" / name).read_bytes() == (tmp_path / "cli" / name).read_bytes()
    scenes = [json.loads(line) for line in (tmp_path / "build" / "scenes.jsonl").read_text().splitlines()]
    sizes_drawn = [o["size"] for s in scenes for o in s["objects"]]
    assert sizes_drawn.count("large") < sizes_drawn.count("medium")  # 20 % against 45 % of draws
    assert sum(s["kind"] == "counting" for s in scenes) > 60 * 0.4
