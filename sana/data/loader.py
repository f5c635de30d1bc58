"""The training batch iterator: aspect-ratio buckets, exact resume, rank sharding, bad images skipped.

How one epoch is laid out (a pure function of the seed, the epoch number and the sample list, `epoch_plan`):

1. samples are grouped by bucket (their target (height, width));
2. each bucket's samples are shuffled with a generator seeded from (seed, epoch) and cut into *global*
   batches of `batch_size x world_size` samples; a remainder smaller than a global batch is dropped
   (`drop_last`, the default) or filled up by repeating that bucket's shuffled samples from the start;
3. the global batches of all buckets are shuffled together.

Rank r takes slots [r*B, (r+1)*B) of every global batch, so the ranks see disjoint samples, all from one
bucket, and one process with batch B*K sees exactly what K processes with batch B see, concatenated by rank.
The caption of each sample is drawn from (seed, epoch, sample index) (`captions.selection_rng`).

The iterator is infinite (epoch after epoch). Its state is two numbers, the epoch and how many batches of it
were handed out; `state_dict` / `load_state_dict` restore it exactly, also with a different number of ranks
as long as the global batch (batch_size x world_size) is the same.

Unreadable images: a file whose header cannot be read is left out when the loader is built; one that fails
to decode is replaced by the next readable sample of the same bucket (in sample order, wrapping around).
Both are logged once per file (logger "sana.data") and counted in `loader.stats`; since the replacement
depends only on which files are bad, it is the same in every process and after a resume.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from sana.config import ConfigError
from sana.data.buckets import BadImage, bucket_table, load_image, read_size, target_size
from sana.data.cached import CachedSamples
from sana.data.captions import Caption, select_caption, selection_rng
from sana.data.sources import KINDS, RawSample, detect_kind, read_samples
from sana.errors import UserError

logger = logging.getLogger("sana.data")

_SHUFFLE_STREAM = 0  # separates the shuffle generator from the caption draws (captions._CAPTION_STREAM)


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how to batch it. Unknown keys are rejected by `config_from_dict`."""

    path: str | tuple[str, ...]  # image folder, JSONL manifest, cache folder, or tar shard(s) / glob / braces
    kind: str = "auto"  # "auto" | "folder" | "jsonl" | "webdataset" | "cache"
    batch_size: int = 1  # per rank
    resolution: int = 512  # 512/1024/2048/4096: the published bucket tables; other multiples of 32: scaled
    buckets: bool = True  # False: every image is centre-cropped to resolution x resolution
    caption_temperature: float = 0.01  # tau in p ∝ exp(score / tau); scores are CLIP cosine similarities
    caption_min_score: float | None = None  # candidates scoring below are dropped (best one kept if none pass)
    shuffle: bool = True
    num_workers: int = 0  # decoding processes per rank (0: decode in the training process)
    drop_last: bool = True  # False: a bucket's last partial batch is filled with repeats from that bucket

    def __post_init__(self) -> None:
        if isinstance(self.path, list):  # built directly (not via config_from_dict): keep the config hashable
            object.__setattr__(self, "path", tuple(self.path))
        paths = (self.path,) if isinstance(self.path, str) else self.path
        if not isinstance(paths, tuple) or not paths or not all(isinstance(p, str) and p for p in paths):
            raise ConfigError(f"data path must be a non-empty string or list of shard paths, got {self.path!r}")
        if self.kind not in KINDS:
            raise ConfigError(f"data kind must be one of {KINDS}, got {self.kind!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if not isinstance(self.resolution, int) or self.resolution < 32 or self.resolution % 32:
            raise ConfigError(f"resolution must be a positive multiple of 32, got {self.resolution!r}")
        if not self.caption_temperature > 0:
            raise ConfigError(f"caption_temperature must be > 0, got {self.caption_temperature!r}")
        if not isinstance(self.num_workers, int) or self.num_workers < 0:
            raise ConfigError(f"num_workers must be >= 0, got {self.num_workers!r}")


@dataclass
class LoaderStats:
    """What went wrong with the data so far (in this process and its workers)."""

    unreadable: dict[str, str] = field(default_factory=dict)  # sample key -> reason, each file once
    substituted: int = 0  # batch slots that got a replacement because their image failed to decode

    def record_bad(self, key: str, reason: str) -> None:
        if key not in self.unreadable:
            self.unreadable[key] = reason
            logger.warning("skipping unreadable image %s: %s", key, reason)

    def __str__(self) -> str:
        return f"{len(self.unreadable)} unreadable image(s), {self.substituted} replaced batch slot(s)"


class SampleSource(Protocol):
    """What the loader needs from a dataset: per-sample key, bucket and candidate captions, and loading."""

    keys: list[str]
    buckets: list[tuple[int, int]]
    captions: list[tuple[Caption, ...]]

    def load(self, index: int, caption: int) -> dict[str, Any]:
        """One sample with its `caption`-th candidate; raises BadImage if the sample cannot be read."""
        ...

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]: ...


# ------------------------------------------------------------------------------------------------ raw images


class RawImages:
    """Samples of a folder / manifest / tar source, each bound to its bucket; `load` decodes one image."""

    def __init__(self, samples: list[RawSample], targets: list[tuple[int, int]]) -> None:
        self.samples = samples
        self.keys = [s.key for s in samples]
        self.buckets = targets
        self.captions = [s.captions for s in samples]

    @classmethod
    def scan(cls, cfg: DataConfig, stats: LoaderStats) -> RawImages:
        """Read the source and every image header; unreadable headers are dropped (counted, logged)."""
        samples = read_samples(cfg.path, cfg.kind)

        def size_of(sample: RawSample) -> tuple[int, int] | str:
            if sample.size is not None:
                return sample.size
            try:
                if sample.image.offset is None:
                    return read_size(sample.image.path)
                return read_size(sample.image.read_bytes())
            except (BadImage, OSError) as e:
                return str(e)

        with ThreadPoolExecutor(max_workers=8) as pool:  # header reads are I/O bound
            sizes = list(pool.map(size_of, samples))
        table = bucket_table(cfg.resolution) if cfg.buckets else None
        good, targets = [], []
        for sample, size in zip(samples, sizes, strict=True):
            if isinstance(size, str):
                stats.record_bad(sample.key, f"{sample.image.name}: {size}")
                continue
            good.append(sample)
            targets.append(target_size(*size, cfg.resolution, cfg.buckets, table))
        if not good:
            raise UserError(f"none of the {len(samples)} images in {cfg.path} can be read")
        return cls(good, targets)

    def load(self, index: int, caption: int) -> dict[str, Any]:
        sample = self.samples[index]
        try:
            data = sample.image.read_bytes()
        except OSError as e:
            raise BadImage(f"{sample.image.name}: {e}") from None
        try:
            image = load_image(data, self.buckets[index])  # (3, H, W) in [-1, 1]
        except BadImage as e:
            raise BadImage(f"{sample.image.name}: {e}") from None
        item = {"image": image, "caption": sample.captions[caption].text, "key": sample.key}
        if sample.control is not None:  # resized and cropped as its image is, so the two stay aligned
            try:
                item["control"] = load_image(sample.control.read_bytes(), self.buckets[index])  # (3, H, W)
            except (BadImage, OSError) as e:
                raise BadImage(f"{sample.control.name}: {e}") from None
        return item

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {
            "images": torch.stack([it["image"] for it in items]),  # (B, 3, H, W)
            "captions": [it["caption"] for it in items],
            "keys": [it["key"] for it in items],
        }
        if all("control" in it for it in items):
            batch["control_images"] = torch.stack([it["control"] for it in items])  # (B, 3, H, W) in [-1, 1]
        return batch


# ------------------------------------------------------------------------------------------------ the plan


def group_by_bucket(buckets: Sequence[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """bucket -> ascending sample indices, buckets in sorted order."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        groups.setdefault(tuple(b), []).append(i)
    return {b: np.asarray(groups[b], dtype=np.int64) for b in sorted(groups)}


def batches_in(group_sizes: Sequence[int], global_batch: int, drop_last: bool) -> int:
    if drop_last:
        return sum(n // global_batch for n in group_sizes)
    return sum(-(-n // global_batch) for n in group_sizes)


def epoch_plan(
    groups: Sequence[np.ndarray], global_batch: int, *, seed: int, epoch: int, shuffle: bool, drop_last: bool
) -> np.ndarray:
    """(batches, global_batch) sample indices of one epoch; every row lies within one group."""
    rng = np.random.default_rng((seed, epoch, _SHUFFLE_STREAM))
    rows = []
    for members in groups:
        order = rng.permutation(members) if shuffle else members
        remainder = len(order) % global_batch
        if remainder and not drop_last:  # fill the last batch by repeating this bucket's samples cyclically
            order = np.concatenate([order, np.resize(order, global_batch - remainder)])
        usable = len(order) // global_batch * global_batch
        rows.append(order[:usable].reshape(-1, global_batch))  # (n_batches, global_batch)
    plan = np.concatenate(rows) if rows else np.zeros((0, global_batch), dtype=np.int64)
    return plan[rng.permutation(len(plan))] if shuffle else plan


class BatchMaker(torch.utils.data.Dataset):
    """(epoch, position) -> (this rank's batch, what went wrong). Picklable, for DataLoader workers."""

    def __init__(self, source: SampleSource, cfg: DataConfig, *, seed: int, rank: int, world_size: int) -> None:
        self.source = source
        self.cfg = cfg
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_batch = cfg.batch_size * world_size
        self.groups = group_by_bucket(source.buckets)
        self._plan: tuple[int, np.ndarray] | None = None
        self._bad: set[int] = set()  # indices known to fail in this process

    def plan(self, epoch: int) -> np.ndarray:
        if self._plan is None or self._plan[0] != epoch:
            plan = epoch_plan(
                list(self.groups.values()),
                self.global_batch,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.cfg.shuffle,
                drop_last=self.cfg.drop_last,
            )
            self._plan = (epoch, plan)
        return self._plan[1]

    def __len__(self) -> int:  # DataLoader wants it; the sampler, not this, decides what is fetched
        return batches_in([len(g) for g in self.groups.values()], self.global_batch, self.cfg.drop_last)

    def __getitem__(self, where: tuple[int, int]) -> tuple[dict[str, Any], list[tuple[str, str]], int]:
        epoch, position = where
        b = self.cfg.batch_size
        indices = self.plan(epoch)[position, self.rank * b : (self.rank + 1) * b]
        items, bad, substituted = [], [], 0
        for index in indices.tolist():
            item, failed = self._load_or_substitute(index, epoch)
            bad.extend(failed)
            substituted += item["_substituted"]
            items.append(item)
        for item in items:
            del item["_substituted"]
        return self.source.collate(items), bad, substituted

    def _load_or_substitute(self, index: int, epoch: int) -> tuple[dict[str, Any], list[tuple[str, str]]]:
        members = self.groups[tuple(self.source.buckets[index])]
        start = int(np.searchsorted(members, index))
        failed = []
        for step in range(len(members)):
            candidate = int(members[(start + step) % len(members)])
            if candidate in self._bad:
                continue
            captions = self.source.captions[candidate]
            rng = selection_rng(self.seed, epoch, candidate)
            choice = select_caption(captions, self.cfg.caption_temperature, self.cfg.caption_min_score, rng)
            try:
                item = self.source.load(candidate, choice)
            except BadImage as e:
                self._bad.add(candidate)
                failed.append((self.source.keys[candidate], str(e)))
                continue
            item["_substituted"] = int(step > 0)
            return item, failed
        h, w = self.source.buckets[index]
        raise RuntimeError(f"every one of the {len(members)} images in the {h}x{w} bucket is unreadable")


def _identity(x: Any) -> Any:
    return x


class _Positions(torch.utils.data.Sampler):
    """(epoch, position) pairs from a starting point on, forever."""

    def __init__(self, epoch: int, position: int, per_epoch: int) -> None:
        self.epoch, self.position, self.per_epoch = epoch, position, per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, position = self.epoch, self.position
        while True:
            if position >= self.per_epoch:
                epoch, position = epoch + 1, 0
            yield epoch, position
            position += 1


class Loader:
    """Infinite iterator over this rank's batches, resumable. Build it with `build_loader`.

    One iteration at a time: each `iter()` continues from the current state (batches handed out so far).
    """

    def __init__(
        self,
        source: SampleSource,
        cfg: DataConfig,
        *,
        seed: int,
        rank: int,
        world_size: int,
        stats: LoaderStats | None = None,
    ) -> None:
        self.cfg = cfg
        self.source = source
        self.stats = stats if stats is not None else LoaderStats()
        self._maker = BatchMaker(source, cfg, seed=seed, rank=rank, world_size=world_size)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_per_epoch = len(self._maker)
        self.epoch = 0  # the epoch of the next batch
        self.position = 0  # batches of that epoch already handed out
        keys_and_buckets = "\n".join(f"{k} {h}x{w}" for k, (h, w) in zip(source.keys, source.buckets, strict=True))
        self._fingerprint = hashlib.sha1(keys_and_buckets.encode()).hexdigest()

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def num_samples(self) -> int:
        return len(self.source.keys)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "global_batch": self._maker.global_batch,
            "samples": self._fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` left off. UserError if it came from a different data order."""
        mismatch = [
            f"{name} {state.get(name)!r} != {mine!r}"
            for name, mine in (("seed", self.seed), ("global_batch", self._maker.global_batch))
            if state.get(name) != mine
        ]
        if state.get("samples") != self._fingerprint:
            mismatch.append("the samples or their buckets changed")
        if mismatch:
            raise UserError(f"cannot resume the data loader exactly: {'; '.join(mismatch)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        if self.cfg.num_workers == 0:
            positions = iter(_Positions(self.epoch, self.position, self.batches_per_epoch))
            fetched = (self._maker[where] for where in positions)
        else:
            fetched = iter(
                torch.utils.data.DataLoader(
                    self._maker,
                    batch_size=None,
                    sampler=_Positions(self.epoch, self.position, self.batches_per_epoch),
                    num_workers=self.cfg.num_workers,
                    collate_fn=_identity,
                )
            )
        for batch, bad, substituted in fetched:
            for key, reason in bad:
                self.stats.record_bad(key, reason)
            self.stats.substituted += substituted
            self.position += 1
            if self.position >= self.batches_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            yield batch


def build_loader(cfg: DataConfig, *, seed: int, rank: int = 0, world_size: int = 1) -> Loader:
    """The batch iterator of `cfg` for one rank (see the module docstring). Fails early, with one line, on
    missing captions, an empty dataset or a batch the data cannot fill."""
    if not isinstance(seed, int) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
    kind = detect_kind(cfg.path) if cfg.kind == "auto" else cfg.kind
    stats = LoaderStats()
    if kind == "cache":
        cached = CachedSamples.open(cfg)
        stats.unreadable.update(cached.unreadable)  # left out (and logged) by `sana cache`
        source: SampleSource = cached
    else:
        source = RawImages.scan(cfg, stats)
    global_batch = cfg.batch_size * world_size
    _check_batch_fits(source, cfg, global_batch, world_size)
    return Loader(source, cfg, seed=seed, rank=rank, world_size=world_size, stats=stats)


def _check_batch_fits(source: SampleSource, cfg: DataConfig, global_batch: int, world_size: int) -> None:
    n = len(source.keys)
    what = f"batch_size {cfg.batch_size}" + (f" x world_size {world_size}" if world_size > 1 else "")
    if global_batch > n:
        raise UserError(
            f"batch larger than the dataset: {what} = {global_batch} but {cfg.path} has {n} usable images"
        )
    sizes = {b: len(g) for b, g in group_by_bucket(source.buckets).items()}
    if batches_in(list(sizes.values()), global_batch, cfg.drop_last) == 0:
        (h, w), largest = max(sizes.items(), key=lambda kv: kv[1])
        raise UserError(
            f"no aspect-ratio bucket holds a full batch: {what} = {global_batch} but the largest bucket ({h}x{w}) "
            f"has {largest} images; lower batch_size, or set drop_last: false or buckets: false"
        )
    unused = [(b, m) for b, m in sizes.items() if m < global_batch] if cfg.drop_last else []
    if unused:
        logger.warning(
            "%d image(s) in %d bucket(s) smaller than a batch of %d are never used (drop_last): %s",
            sum(m for _, m in unused),
            len(unused),
            global_batch,
            ", ".join(f"{h}x{w}: {m}" for (h, w), m in unused),
        )
