"""Sources: folder + .txt, JSONL manifest and WebDataset tars give the same samples; bad inputs fail clearly.

Also home of the small dataset writers the other data tests use (import this module, not its names, so pytest
does not collect its tests twice).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sana.data import DataConfig, build_loader, detect_kind, read_samples
from sana.data.captions import Caption
from sana.data.sources import expand_shards

# (key, (height, width), captions): at resolution 64 these land in three buckets (64x64, 32x96, 96x32).
SPECS = [
    ("animals/cat", (50, 50), ["a cat", "a small cat on a chair"]),
    ("animals/dog", (40, 44), ["a dog"]),
    ("bird", (48, 48), ["a bird", "a blue bird"]),
    ("boat", (30, 90), ["a boat on the sea"]),
    ("car", (33, 99), ["a red car", "a car"]),
    ("flower", (52, 50), ["a flower"]),
    ("house", (45, 45), ["a house"]),
    ("moon", (90, 30), ["the moon"]),
    ("river", (28, 84), ["a river"]),
    ("tree", (96, 32), ["a tall tree", "a tree"]),
]


def make_image(key: str, size: tuple[int, int]) -> Image.Image:
    """A deterministic noisy RGB image (noise so resizing is tested on real detail)."""
    seed = sum(map(ord, key))
    array = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(array)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sidecar(captions: list[str], scores: list[float] | None = None) -> dict:
    if scores is None:
        return {"captions": captions}
    return {"captions": [{"text": t, "score": s} for t, s in zip(captions, scores, strict=True)]}


def write_folder(root: Path, specs=SPECS, scores: dict | None = None) -> Path:
    """Images as PNG; one caption -> .txt, several (or scored) -> .json sidecar."""
    for key, size, captions in specs:
        path = root / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(make_image(key, size)))
        s = (scores or {}).get(key)
        if len(captions) == 1 and s is None:
            path.with_suffix(".txt").write_text(captions[0] + "\n")
        else:
            path.with_suffix(".json").write_text(json.dumps(sidecar(captions, s)))
    return root


def write_jsonl(root: Path, specs=SPECS, scores: dict | None = None, *, sizes: bool = False) -> Path:
    """Images under root/img, manifest root/data.jsonl with relative paths."""
    lines = []
    for key, size, captions in specs:
        path = root / "img" / f"{key}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png_bytes(make_image(key, size)))
        record = {"image": f"img/{key}.png", "key": key, **sidecar(captions, (scores or {}).get(key))}
        if sizes:
            record.update(height=size[0], width=size[1])
        lines.append(json.dumps(record))
    manifest = root / "data.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def write_tars(root: Path, specs=SPECS, per_shard: int = 4, scores: dict | None = None) -> list[Path]:
    root.mkdir(parents=True, exist_ok=True)
    shards = []
    for n, start in enumerate(range(0, len(specs), per_shard)):
        shard = root / f"shard-{n:03d}.tar"
        with tarfile.open(shard, "w") as tar:
            for key, size, captions in specs[start : start + per_shard]:
                s = (scores or {}).get(key)
                members = {f"{key}.png": png_bytes(make_image(key, size))}
                if len(captions) == 1 and s is None:
                    members[f"{key}.txt"] = captions[0].encode()
                else:
                    members[f"{key}.json"] = json.dumps(sidecar(captions, s)).encode()
                for name, data in members.items():
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(shard)
    return shards


@pytest.fixture(scope="module")
def three_kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("kinds")
    folder = write_folder(root / "folder")
    manifest = write_jsonl(root / "jsonl")
    write_tars(root / "wds")
    return {
        "folder": str(folder),
        "jsonl": str(manifest),
        "webdataset": str(root / "wds" / "shard-{000..002}.tar"),
    }


def test_three_kinds_read_the_same_samples(three_kinds):
    read = {kind: read_samples(path) for kind, path in three_kinds.items()}
    expected = sorted((key, tuple(Caption(c) for c in caps)) for key, _, caps in SPECS)
    for kind, samples in read.items():
        assert [(s.key, s.captions) for s in samples] == expected, kind
        assert [s.image.read_bytes() for s in samples] == [s.image.read_bytes() for s in read["folder"]], kind


def test_three_kinds_yield_the_same_batches(three_kinds):
    def batches(path):
        cfg = DataConfig(path=path, batch_size=2, resolution=64)
        loader = build_loader(cfg, seed=3)
        return [next(it) for it in [iter(loader)] for _ in range(loader.batches_per_epoch)]

    reference = batches(three_kinds["folder"])
    for kind in ("jsonl", "webdataset"):
        for a, b in zip(reference, batches(three_kinds[kind]), strict=True):
            assert a["keys"] == b["keys"] and a["captions"] == b["captions"], kind
            assert torch.equal(a["images"], b["images"]), kind


def test_detect_kind(three_kinds, tmp_path):
    assert detect_kind(three_kinds["folder"]) == "folder"
    assert detect_kind(three_kinds["jsonl"]) == "jsonl"
    assert detect_kind(three_kinds["webdataset"]) == "webdataset"
    wds_dir = str(Path(three_kinds["jsonl"]).parent.parent / "wds")
    assert detect_kind(wds_dir) == "webdataset"  # a folder holding only shards
    assert detect_kind([wds_dir + "/shard-000.tar"]) == "webdataset"
    assert len(expand_shards(wds_dir)) == 3 and len(expand_shards(wds_dir + "/*.tar")) == 3
    with pytest.raises(ValueError, match="no such data path"):
        detect_kind(str(tmp_path / "missing"))


def test_manifest_caption_forms_keys_and_sizes(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes(make_image("x", (20, 30))))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "y.png").write_bytes(png_bytes(make_image("y", (20, 30))))
    lines = [
        {"image": "x.png", "text": " plain text "},
        {"image": "sub/y.png", "captions": ["one", "two"], "width": 30, "height": 20},
        {"image": str(tmp_path / "x.png"), "key": "again", "captions": [{"text": "s", "score": 0.3}]},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    samples = {s.key: s for s in read_samples(str(tmp_path / "m.jsonl"))}
    assert samples["x"].captions == (Caption("plain text"),)
    assert samples["sub/y"].captions == (Caption("one"), Caption("two")) and samples["sub/y"].size == (20, 30)
    assert samples["again"].captions == (Caption("s", 0.3),)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"image": "a.png"}, r"m.jsonl:1 \(a.png\): no caption"),
        ({"image": "a.png", "captions": []}, "no caption"),
        ({"image": "a.png", "text": "  "}, "empty caption"),
        ({"image": "a.png", "captions": [{"text": "a", "score": 0.1}, "b"]}, "1 of 2 captions have a score"),
        ({"captions": ["a"]}, '"image" path'),
    ],
)
def test_manifest_errors_name_the_line(tmp_path, line, message):
    (tmp_path / "m.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(ValueError, match=message):
        read_samples(str(tmp_path / "m.jsonl"))


def test_folder_and_tar_errors(tmp_path):
    write_folder(tmp_path / "f", SPECS[:2])
    (tmp_path / "f" / "animals" / "dog.txt").unlink()
    with pytest.raises(ValueError, match=r"dog.png has no caption: add dog.txt"):
        read_samples(str(tmp_path / "f"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        read_samples(str(tmp_path / "empty"), "folder")
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("k.png")
        data = png_bytes(make_image("k", (8, 8)))
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"s.tar:k.png has no caption"):
        read_samples(str(shard))
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz"):
        pass
    with pytest.raises(ValueError, match="not an uncompressed tar"):
        read_samples([str(tmp_path / "c.tar.gz")])
