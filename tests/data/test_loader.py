"""The loader: one bucket per batch, exact resume, rank sharding, bad images skipped, clear build-time errors."""

from __future__ import annotations

import itertools
import logging

import pytest
import torch

from sana.aspect_ratios import nearest_bucket
from sana.config import ConfigError, config_from_dict
from sana.data import DataConfig, build_loader
from sana.data.buckets import bucket_table
from tests.data import test_sources as src

SIZES = {key: size for key, size, _ in src.SPECS}
CAPTIONS = {key: captions for key, _, captions in src.SPECS}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(src.write_folder(tmp_path_factory.mktemp("loader")))


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def same(a, b):
    return a["keys"] == b["keys"] and a["captions"] == b["captions"] and torch.equal(a["images"], b["images"])


def test_batches_are_single_bucket_and_cover_the_epoch(folder):
    # buckets at 64: 64x64 holds 5 images, 32x96 holds 3, 96x32 holds 2; batches of 2 drop one of 64x64 and 32x96
    loader = build_loader(DataConfig(path=folder, batch_size=2, resolution=64), seed=0)
    assert loader.batches_per_epoch == len(loader) == 2 + 1 + 1
    table = bucket_table(64)
    seen = []
    for batch in take(loader, loader.batches_per_epoch):
        assert batch["images"].shape[0] == 2 and batch["images"].dtype == torch.float32
        for key in batch["keys"]:
            assert tuple(batch["images"].shape[-2:]) == nearest_bucket(*SIZES[key], table)
        assert all(c in CAPTIONS[k] for k, c in zip(batch["keys"], batch["captions"], strict=True))
        seen += batch["keys"]
    assert len(seen) == len(set(seen)) == 8
    assert loader.state_dict()["epoch"] == 1 and loader.state_dict()["position"] == 0


def test_epochs_reshuffle_and_drop_last_false_uses_everything(folder):
    loader = build_loader(DataConfig(path=folder, batch_size=2, resolution=64, drop_last=False), seed=0)
    assert loader.batches_per_epoch == 3 + 2 + 1
    epochs = [[k for b in take(loader, 6) for k in b["keys"]] for _ in range(2)]
    assert set(epochs[0]) == set(epochs[1]) == set(SIZES)  # the odd buckets are filled with repeats
    assert epochs[0] != epochs[1]
    ordered = build_loader(DataConfig(path=folder, batch_size=2, resolution=64, shuffle=False), seed=0)
    assert [b["keys"] for b in take(ordered, 4)] == [b["keys"] for b in take(ordered, 4)]


def test_resume_gives_the_identical_following_batches(folder):
    cfg = DataConfig(path=folder, batch_size=2, resolution=64, drop_last=False)
    first = build_loader(cfg, seed=5)
    take(first, 4)  # mid-epoch (6 batches per epoch)
    state = first.state_dict()
    expected = take(first, 5)  # crosses into the next epoch
    resumed = build_loader(cfg, seed=5)
    resumed.load_state_dict(state)
    for a, b in zip(expected, take(resumed, 5), strict=True):
        assert same(a, b)
    with pytest.raises(ValueError, match="seed 5 != 6"):
        build_loader(cfg, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch"):
        build_loader(DataConfig(path=folder, batch_size=1, resolution=64), seed=5).load_state_dict(state)


def test_two_ranks_concatenated_equal_one_rank_with_double_batch(folder):
    one = build_loader(DataConfig(path=folder, batch_size=4, resolution=64, drop_last=False), seed=1)
    half = DataConfig(path=folder, batch_size=2, resolution=64, drop_last=False)
    ranks = [build_loader(half, seed=1, rank=r, world_size=2) for r in range(2)]
    assert one.batches_per_epoch == ranks[0].batches_per_epoch == ranks[1].batches_per_epoch
    n = one.batches_per_epoch + 2
    for big, r0, r1 in zip(take(one, n), take(ranks[0], n), take(ranks[1], n), strict=True):
        assert big["keys"] == r0["keys"] + r1["keys"] and big["captions"] == r0["captions"] + r1["captions"]
        assert torch.equal(big["images"], torch.cat([r0["images"], r1["images"]]))
    # A resumed state moves between world sizes with the same global batch.
    state = one.state_dict()
    ranks[0].load_state_dict(state)
    assert take(ranks[0], 1)[0]["keys"] == take(one, 1)[0]["keys"][:2]


def test_unreadable_images_are_skipped_counted_and_logged(tmp_path, caplog):
    specs = src.SPECS[:3] + [("boat", (30, 90), ["a boat"]), ("car", (33, 99), ["a car"])]
    root = src.write_folder(tmp_path, specs)
    good = (root / "bird.png").read_bytes()
    (root / "bird.png").write_bytes(good[: len(good) // 2])  # truncated PNG: header fine, pixels cut
    (root / "fake.jpg").write_text("plain text, not a JPEG")
    (root / "fake.txt").write_text("a caption for a file that is not an image")
    cfg = DataConfig(path=str(root), batch_size=1, resolution=64, shuffle=False)
    with caplog.at_level(logging.WARNING, logger="sana.data"):
        loader = build_loader(cfg, seed=0)
        assert list(loader.stats.unreadable) == ["fake"]  # found from the header, when the loader is built
        batches = take(loader, 2 * loader.batches_per_epoch)
    keys = [b["keys"][0] for b in batches]
    assert "bird" not in keys and "fake" not in keys
    assert sorted(loader.stats.unreadable) == ["bird", "fake"]
    assert loader.stats.substituted == 2  # bird's slot, once per epoch, got the next 64x64 image
    assert keys.count("animals/cat") == 4  # bird is replaced by the next image of its bucket, wrapping around
    logged = [r.getMessage() for r in caplog.records]
    assert sum("bird" in m for m in logged) == 1 and sum("fake" in m for m in logged) == 1


def test_workers_match_in_process_and_report_bad_images(tmp_path):
    root = src.write_folder(tmp_path, src.SPECS[:4])
    data = (root / "bird.png").read_bytes()
    (root / "bird.png").write_bytes(data[:100])
    cfg = DataConfig(path=str(root), batch_size=1, resolution=64, drop_last=False)
    inline = build_loader(cfg, seed=2)
    workers = build_loader(DataConfig(**{**cfg.__dict__, "num_workers": 1}), seed=2)
    for a, b in zip(take(inline, 5), take(workers, 5), strict=True):
        assert same(a, b)
    assert workers.stats.unreadable.keys() == inline.stats.unreadable.keys() == {"bird"}
    assert workers.stats.substituted == inline.stats.substituted > 0


def test_build_time_errors_are_one_line(tmp_path, folder):
    def error(cfg, **kw):
        with pytest.raises(ValueError) as info:
            build_loader(cfg, seed=0, **kw)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "batch larger than the dataset: batch_size 11 = 11 but" in error(DataConfig(path=folder, batch_size=11))
    assert "has 10 usable images" in error(DataConfig(path=folder, batch_size=6, resolution=64), world_size=2)
    msg = error(DataConfig(path=folder, batch_size=6, resolution=64))
    assert "no aspect-ratio bucket holds a full batch" in msg and "(64x64) has 5 images" in msg
    build_loader(DataConfig(path=folder, batch_size=6, resolution=64, buckets=False), seed=0)  # one square bucket
    (tmp_path / "e").mkdir()
    assert "no images found" in error(DataConfig(path=str(tmp_path / "e"), kind="folder"))
    (tmp_path / "e" / "lonely.png").write_bytes(src.png_bytes(src.make_image("l", (8, 8))))
    assert "lonely.png has no caption" in error(DataConfig(path=str(tmp_path / "e")))
    (tmp_path / "e" / "lonely.txt").write_text("x")
    (tmp_path / "e" / "lonely.png").write_text("not a png")
    assert "none of the 1 images" in error(DataConfig(path=str(tmp_path / "e")))


def test_config_is_strict():
    cfg = config_from_dict(DataConfig, {"path": ["a.tar", "b.tar"], "batch_size": 2})
    assert cfg.path == ("a.tar", "b.tar")
    with pytest.raises(ConfigError, match="unknown field"):
        config_from_dict(DataConfig, {"path": "x", "batchsize": 2})
    for bad in ({"kind": "csv"}, {"batch_size": 0}, {"resolution": 500}, {"caption_temperature": 0}):
        with pytest.raises(ConfigError):
            DataConfig(path="x", **bad)
