"""Where training images and captions come from: an image folder, a JSONL manifest, or WebDataset tar shards.

Every source becomes the same list of `RawSample`s (key, where the image bytes are, candidate captions), sorted
by key, so the same images with the same captions give the same samples whichever way they are stored:

* **folder**: every image file under the folder (recursively; .png .jpg .jpeg .webp .bmp); its caption is the
  same-name `.json` sidecar (an object with "captions" or "text", as in a manifest line) or else the `.txt`
  file (its whole stripped text is one caption). Key: the path relative to the folder, without suffix.
* **jsonl**: one JSON object per line, `{"image": "rel/or/abs.png", "captions": [...]}` where captions are
  `[{"text": ..., "score": ...}, ...]`, `["a", "b"]`, or a single `"text": "..."` instead. Relative image paths
  are relative to the manifest's folder. Optional: "key" (default: the image path without suffix, relative to
  the manifest folder when inside it), "width" and "height" (skip reading the image header).
* **webdataset**: uncompressed .tar shards (a file, a folder of them, a glob, a `{000..009}` brace range, or
  a list). Members are grouped by key (the member path up to the first "." of its file name); a sample needs
  one image member and a `.json` (as above) or `.txt` caption member. Images are read in place by offset, so
  shards are never unpacked.

A sample may also carry a control image, for ControlNet training (`task: controlnet`): in a folder the image
`NAME.control.EXT` beside `NAME.EXT` (it is not a sample of its own); in a manifest an optional "control" path
(relative like "image"); in a tar shard the member `KEY.control.EXT`.

A sample without any caption is an error naming its file (a one-line UserError) rather than a silent drop.
Unreadable images are not detected here; see `buckets.read_size` and the loader.
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from sana.data.caption_format import Caption, parse_captions
from sana.errors import UserError, read_user_file, user_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
KINDS = ("auto", "folder", "jsonl", "webdataset", "cache")
CACHE_INDEX = "index.json"  # marks a folder written by `sana cache`
CONTROL_SUFFIX = ".control"  # NAME.control.png is the control image of NAME.png (folders and tar shards)


@dataclass(frozen=True)
class ImageRef:
    """The encoded bytes of one image: a whole file, or `length` bytes at `offset` inside a tar shard."""

    path: Path
    offset: int | None = None
    length: int | None = None
    member: str | None = None

    @property
    def name(self) -> str:
        """For messages: the file, or "shard.tar:member"."""
        return f"{self.path}:{self.member}" if self.member else str(self.path)

    def read_bytes(self) -> bytes:
        if self.offset is None:
            return self.path.read_bytes()
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.length)
        if len(data) != self.length:
            raise OSError(f"{self.name}: shard ends before the member does ({len(data)} of {self.length} bytes)")
        return data


@dataclass(frozen=True)
class RawSample:
    key: str
    image: ImageRef
    captions: tuple[Caption, ...]
    size: tuple[int, int] | None = None  # (height, width) when the source states it; else read from the header
    control: ImageRef | None = None  # the sample's control image (ControlNet training), if the source has one


@dataclass
class ManifestRow:
    """One manifest line: the parsed object (kept to rewrite it), its image and its captions."""

    record: dict[str, Any]
    image: ImageRef
    captions: tuple[Caption, ...]
    key: str
    control: ImageRef | None = None


# ------------------------------------------------------------------------------------------------ kinds


def detect_kind(path: str | Sequence[str]) -> str:
    """ "folder", "jsonl", "webdataset" or "cache" for a data path (see the module docstring)."""
    if not isinstance(path, str):
        return "webdataset"
    if any(ch in path for ch in "*?[{"):
        return "webdataset"
    p = Path(path)
    if p.is_dir():
        if (p / CACHE_INDEX).is_file() or any(p.glob("shard-*.safetensors")):  # finished or not
            return "cache"
        top = [q for q in p.iterdir() if q.is_file()]
        has_tars = any(q.suffix == ".tar" for q in top)
        has_images = any(q.suffix.lower() in IMAGE_EXTENSIONS for q in top)
        return "webdataset" if has_tars and not has_images else "folder"
    if p.is_file():
        if p.suffix in (".jsonl", ".json"):
            return "jsonl"
        if p.suffix == ".tar":
            return "webdataset"
        raise UserError(f"cannot tell what kind of data {path} is: expected a folder, .jsonl or .tar")
    raise UserError(f"no such data path: {path}")


def read_samples(path: str | Sequence[str], kind: str = "auto") -> list[RawSample]:
    """All samples of a raw source, sorted by key. UserError for missing captions, duplicates or no images."""
    if kind not in KINDS or kind == "cache":
        raise ValueError(f"read_samples reads raw sources; kind must be one of {KINDS[:4]}, got {kind!r}")
    if kind == "auto":
        kind = detect_kind(path)
        if kind == "cache":
            raise UserError(f"{path} is a latent cache, not a raw source")
    if kind != "webdataset" and not isinstance(path, str):
        raise UserError(f"a list of paths is only for webdataset shards, got kind {kind!r}")
    if kind == "folder":
        samples = read_folder(path)
    elif kind == "jsonl":
        samples = [
            RawSample(r.key, r.image, r.captions, _size_of(r.record), r.control) for r in read_manifest_lines(path)
        ]
    else:
        samples = read_webdataset(path)
    if not samples:
        raise UserError(f"no images found in {path if isinstance(path, str) else list(path)}")
    samples.sort(key=lambda s: s.key)
    for a, b in zip(samples, samples[1:], strict=False):
        if a.key == b.key:
            raise UserError(f"two images share the key {a.key!r}: {a.image.name} and {b.image.name}")
    return samples


# ------------------------------------------------------------------------------------------------ folder


def read_folder(root: str | Path) -> list[RawSample]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"no such image folder: {root}")
    out = []
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_EXTENSIONS or path.name.startswith(".") or not path.is_file():
            continue
        if path.stem.endswith(CONTROL_SUFFIX):  # another image's control image
            continue
        sidecar_json, sidecar_txt = path.with_suffix(".json"), path.with_suffix(".txt")
        if sidecar_json.is_file():
            captions = _captions_from_json_text(read_user_file(sidecar_json, "caption file"), str(sidecar_json))
        elif sidecar_txt.is_file():
            captions = _captions_from_txt(read_user_file(sidecar_txt, "caption file"), str(sidecar_txt))
        else:
            raise UserError(f"{path} has no caption: add {sidecar_txt.name} (or {sidecar_json.name}) beside it")
        key = path.relative_to(root).with_suffix("").as_posix()
        controls = [path.with_name(path.stem + CONTROL_SUFFIX + e) for e in IMAGE_EXTENSIONS]
        control = next((ImageRef(c) for c in controls if c.is_file()), None)
        out.append(RawSample(key, ImageRef(path), captions, control=control))
    return out


# ------------------------------------------------------------------------------------------------ jsonl


def read_manifest_lines(manifest: str | Path) -> list[ManifestRow]:
    """Every non-blank line of a JSONL manifest, parsed and validated (UserError naming file:line)."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise UserError(f"no such manifest: {manifest}")
    base = manifest.parent
    rows = []
    # Lines end at "\n" only (universal newlines made "\r\n" one), as when iterating the file: a JSON string
    # may hold U+2028 and the like, where str.splitlines would cut.
    for lineno, line in enumerate(read_user_file(manifest, "manifest").split("\n"), 1):
        if not line.strip():
            continue
        where = f"{manifest}:{lineno}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise UserError(f'{where}: each line must be an object with an "image" path')
        image = Path(record["image"])
        path = image if image.is_absolute() else base / image
        captions = _captions_from_record(record, f"{where} ({record['image']})")
        control = record.get("control")
        if control is not None and not isinstance(control, str):
            raise UserError(f'{where}: "control" must be an image path, got {control!r}')
        control_ref = None
        if control is not None:
            control_ref = ImageRef(Path(control) if Path(control).is_absolute() else base / control)
        key = record.get("key")
        if key is None:
            try:
                key = path.relative_to(base).with_suffix("").as_posix()
            except ValueError:  # an absolute path outside the manifest's folder
                key = path.with_suffix("").as_posix()
        rows.append(ManifestRow(record, ImageRef(path), captions, str(key), control_ref))
    return rows


def _size_of(record: dict[str, Any]) -> tuple[int, int] | None:
    h, w = record.get("height"), record.get("width")
    if isinstance(h, int) and isinstance(w, int) and h > 0 and w > 0:
        return (h, w)
    return None


# ------------------------------------------------------------------------------------------------ webdataset


def expand_shards(path: str | Sequence[str]) -> list[Path]:
    """Shard files named by a file, a folder (its *.tar), a glob, a {a,b} / {000..009} brace pattern, or a list."""
    patterns = [path] if isinstance(path, str) else list(path)
    out: list[Path] = []
    for pattern in patterns:
        for expanded in _expand_braces(str(pattern)):
            p = Path(expanded)
            if p.is_dir():
                found = sorted(p.glob("*.tar"))
            elif any(ch in expanded for ch in "*?["):
                found = sorted(Path(x) for x in glob.glob(expanded))
            else:
                found = [p] if p.is_file() else []
            if not found:
                raise UserError(f"no tar shards match {expanded}")
            out.extend(found)
    return out


def _expand_braces(pattern: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.groups()
        width = len(lo) if lo.startswith("0") else 0
        choices = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        choices = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [x for c in choices for x in _expand_braces(head + c + tail)]


def read_webdataset(path: str | Sequence[str]) -> list[RawSample]:
    out = []
    for shard in expand_shards(path):
        out.extend(_read_shard(shard))
    return out


def _open_tar(shard: Path) -> tarfile.TarFile:
    try:
        with user_path(shard, "tar shard"):  # "r:" = uncompressed only: members must be addressable by offset
            return tarfile.open(shard, mode="r:")
    except tarfile.ReadError as e:
        raise UserError(f"{shard} is not an uncompressed tar shard ({e})") from None


def _read_shard(shard: Path) -> list[RawSample]:
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    with _open_tar(shard) as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = PurePosixPath(info.name)
            if name.name.startswith("."):
                continue
            stem, _, ext = name.name.partition(".")  # WebDataset: the key ends at the first dot of the file name
            key = (name.parent / stem).as_posix() if str(name.parent) != "." else stem
            groups.setdefault(key, {})["." + ext.lower()] = info
        samples = []
        for key, members in groups.items():
            image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
            if image is None:
                continue  # a key with only metadata: not a sample
            where = f"{shard}:{image.name}"
            if ".json" in members:
                captions = _captions_from_json_text(_member_text(tar, members[".json"]), f"{shard}:{key}.json")
            elif ".txt" in members:
                captions = _captions_from_txt(_member_text(tar, members[".txt"]), f"{shard}:{key}.txt")
            else:
                raise UserError(f"{where} has no caption: add {key}.txt (or {key}.json) to the shard")
            ref = ImageRef(shard, offset=image.offset_data, length=image.size, member=image.name)
            control = next((members[c] for e in IMAGE_EXTENSIONS if (c := CONTROL_SUFFIX + e) in members), None)
            control_ref = None
            if control is not None:
                control_ref = ImageRef(shard, offset=control.offset_data, length=control.size, member=control.name)
            samples.append(RawSample(key, ref, captions, control=control_ref))
    return samples


def _member_text(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    f = tar.extractfile(info)
    assert f is not None  # regular file members always have data
    try:
        return f.read().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{tar.name}:{info.name} is not UTF-8 text ({e.reason} at byte {e.start})") from None


# ------------------------------------------------------------------------------------------------ captions


def _captions_from_txt(text: str, source: str) -> tuple[Caption, ...]:
    if not text.strip():
        raise UserError(f"{source}: empty caption file")
    return (Caption(text.strip()),)


def _captions_from_json_text(text: str, source: str) -> tuple[Caption, ...]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{source}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise UserError(f'{source}: expected an object with "captions" or "text"')
    return _captions_from_record(record, source)


def _captions_from_record(record: dict[str, Any], source: str) -> tuple[Caption, ...]:
    if "captions" in record:
        return parse_captions(record["captions"], source)
    if "text" in record:
        return parse_captions(record["text"], source)
    raise UserError(f'{source}: no caption ("captions" list or "text" string)')
